"""The KCIDB objects of one run: its checkout, its build, a test per guest test
(and the stand-ins for a nightly entry that left no run directory)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.dmesg import errors, scan
from harness.kcidb.ids import kcidb_path, object_id, patchset_hash
from harness.kcidb.run import STATUS, RunView, TestResult
from harness.results import TestRecord

EXCERPT_MAX = 16384               # the schema's maxLength for log_excerpt
BUILD_LOG_LINES = 40


def checkout_object(origin: str, run: RunView) -> dict[str, Any]:
    """The kernel source the run's kernel came from: its identity and patchset hash make the id."""
    art = run.artifact
    misc: dict[str, Any] = {"kernel_spec": run.kernel_spec}
    obj: dict[str, Any] = {"origin": origin, "valid": True}
    if art is not None:
        hashes = [p.get("sha256", "") for p in art.patches]
        identity, patches = art.source_identity, patchset_hash(hashes)
        obj["patchset_hash"] = patches
        m = re.fullmatch(r"git:([0-9a-f]{40})", identity)
        if m:
            obj["git_commit_hash"] = m.group(1)
        n = len(art.patches)
        obj["comment"] = f"{Path(art.source_spec).name or art.source_spec}" + (
            f" + {n} patch{'es' if n != 1 else ''}: " + "; ".join(p.get("subject", "") for p in art.patches)
            if n else "")
        misc.update(source=art.source_spec, source_identity=identity, patches=art.patches)
    elif run.package:
        identity, patches = f"debian:{run.package}:{run.image_sha256}", ""
        obj.update(tree_name="debian", comment=f"Debian package {run.package}", patchset_hash="")
        misc.update(package=run.package)
    elif run.image_sha256:
        identity, patches = f"image:{run.image_sha256}", ""
        obj.update(comment=f"prebuilt image {Path(run.image).name or run.kernel_spec}", patchset_hash="")
    else:
        # A remote target's kernel: all that is known is its release, on that machine.
        identity, patches = f"release:{run.release}@{run.target or run.kernel_spec}", ""
        obj.update(comment=f"kernel {run.release} of {run.target or 'an unknown machine'}", patchset_hash="")
    misc["source_identity"] = identity
    obj.update(id=object_id(origin, "checkout", identity, patches), misc=misc)
    return obj


def build_id(origin: str, checkout_id: str, run: RunView) -> str:
    return object_id(origin, "build", checkout_id, run.image_sha256 or run.kernel_spec)


def build_object(origin: str, build_id: str, checkout_id: str, run: RunView) -> dict[str, Any]:
    """The kernel image: a harness build (fragments, compiler, duration, log tail) or a prebuilt one."""
    art = run.artifact
    misc: dict[str, Any] = {"release": run.release, "image_sha256": run.image_sha256,
                            "kernel_spec": run.kernel_spec}
    if run.features:
        misc["reports"] = run.features
    obj: dict[str, Any] = {"id": build_id, "origin": origin, "checkout_id": checkout_id,
                           "architecture": "x86_64", "status": "PASS"}
    if art is not None:
        obj["config_name"] = "+".join(Path(f).stem for f in art.fragments) or "default"
        if art.toolchain.get("gcc"):
            obj["compiler"] = art.toolchain["gcc"]
        if isinstance(art.seconds, (int, float)):
            obj["duration"] = float(art.seconds)
        obj["comment"] = f"{run.release} built by the harness"
        log = art.path / "build.log"
        excerpt = _tail(log, BUILD_LOG_LINES)
        if excerpt:
            obj["log_excerpt"] = excerpt
        misc.update(artifact=str(art.path), fragments=art.fragments, toolchain=art.toolchain,
                    dropped_options=art.dropped, log_path=str(log), config_path=str(art.path / "config"))
    else:
        if run.package:
            obj["config_name"] = _debian_flavour(run.release)
            obj["comment"] = f"{run.release} from Debian package {run.package}"
            config = Path(run.image).parent / f"config-{run.release}"
            if config.is_file():
                misc["config_path"] = str(config)
        else:
            obj["comment"] = f"{run.release} prebuilt image"
        if run.banner is not None:
            obj["compiler"] = run.banner[2].split(", ")[0]
            misc["built_by"] = run.banner[1]
    return {**obj, "misc": misc}


def guest_test_object(origin: str, build_id: str, run: RunView, test: TestResult, root: Path,
                url: Callable[[Path], str | None], entry: str | None, repeat: int | None) -> dict[str, Any]:
    """One guest test of one run; `url` makes a published file's URL (None: not published)."""
    record = TestRecord(test.nodeid)  # the writer's own names for the JUnit case and the test's folder
    profile = run.profile_requested
    env_comment = profile if profile == run.profile_effective else f"{profile} -> {run.profile_effective}"
    if run.fallback_reasons:
        env_comment += f" (fallback: {'; '.join(run.fallback_reasons)})"
    env_misc: dict[str, Any] = {"requested_profile": profile, "effective_profile": run.profile_effective,
                                "fallback_reasons": run.fallback_reasons, "accel": run.accel,
                                "qemu_version": run.qemu_version, "worker": test.worker}
    if run.target:
        env_misc["target"] = run.target
    misc: dict[str, Any] = {
        "nodeid": test.nodeid, "run_id": run.run_id, "kernel_release": run.release,
        "junit": {"classname": record.classname, "name": record.name},
    }
    if entry is not None:
        misc.update(nightly_entry=entry, repeat=repeat)
    folder = run.path / "tests" / record.dirname
    ids = [str(i) for i in test.properties.get("dmesg_error_ids") or []]
    if ids:
        misc["dmesg_error_ids"] = ids
    figures = {k: v for k, v in test.properties.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if figures:
        misc["figures"] = figures
    obj: dict[str, Any] = {
        "id": object_id(origin, "test", build_id, run.run_id, test.nodeid), "origin": origin,
        "build_id": build_id, "path": kcidb_path(test.nodeid),
        "status": STATUS[test.status], "duration": round(test.seconds, 3),
        "environment": {"comment": env_comment, "misc": env_misc}, "misc": misc,
    }
    if run.started:
        obj["start_time"] = run.started    # the run's: a test's own start is not recorded
    rate = next(((k, v) for k, v in figures.items() if k.endswith("_MBps")), None)
    if rate is not None:
        obj["number"] = {"value": float(rate[1]), "unit": "MB/s", "prefix": "metric"}
        misc["number_is"] = rate[0]
    excerpt = _test_excerpt(test, folder, run)
    if excerpt:
        obj["log_excerpt"] = excerpt
    log_url = url(folder / "log.txt")
    if log_url:
        obj["log_url"] = log_url
    outputs = [{"name": name, "url": u} for name, p in (("dmesg.txt", folder / "dmesg.txt"),
                                                         ("console.log", run.path / "console.log"),
                                                         ("meta.json", run.path / "meta.json"))
               if (u := url(p))]
    if outputs:
        obj["output_files"] = outputs
    misc["run_dir"] = os.path.relpath(run.path.resolve(), root.resolve())
    return obj


def missing_run_objects(origin: str, outcome: dict[str, Any]) -> tuple[dict[str, Any], ...]:
    """Checkout, build and an ERROR test for a nightly entry that left no run directory:
    the merged JUnit has one error case for it, so has KCIDB."""
    kernel, entry = str(outcome.get("kernel")), str(outcome.get("entry"))
    checkout_id = object_id(origin, "checkout", f"spec:{kernel}", "")
    checkout = {
        "id": checkout_id, "origin": origin, "patchset_hash": "",
        "comment": f"kernel {kernel} (no run started, so nothing more is known)",
        "misc": {"kernel_spec": kernel}}
    build_id = object_id(origin, "build", checkout_id, kernel)
    build = {
        "id": build_id, "origin": origin, "checkout_id": checkout_id, "architecture": "x86_64",
        "comment": f"kernel {kernel}", "misc": {"kernel_spec": kernel}}
    repeat = int(outcome.get("repeat") or 1)
    message = str(outcome.get("message") or outcome.get("status") or "")
    test = {
        "id": object_id(origin, "test", build_id, f"{entry}#{repeat}", "harness_run"), "origin": origin,
        "build_id": build_id, "path": "coco.harness_run",
        "status": "ERROR", "duration": float(outcome.get("seconds") or 0.0),
        "comment": f"nightly entry {entry} left no run directory",
        "environment": {"comment": str(outcome.get("profile")),
                        "misc": {"requested_profile": str(outcome.get("profile"))}},
        "log_excerpt": _clip(message),
        "misc": {"nightly_entry": entry, "repeat": repeat, "exit_code": outcome.get("exit_code"),
                 "junit": {"classname": entry, "name": "harness_run"}}}
    return checkout, build, test


def _debian_flavour(release: str) -> str:
    """`6.1.0-56-cloud-amd64` -> `debian-cloud-amd64`: the configuration Debian built it with."""
    m = re.match(r"^\d+\.\d+(?:\.\d+)*(?:\+deb\d+)?(?:-\d+)?-(.+)$", release)
    return f"debian-{m.group(1)}" if m else "debian"


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return _clip("\n".join(text.rstrip("\n").splitlines()[-lines:]), keep="tail")


def _clip(text: str, keep: str = "head") -> str:
    text = text.replace("\0", "")
    if len(text) <= EXCERPT_MAX:
        return text
    mark = "\n[... cut ...]\n"
    room = EXCERPT_MAX - len(mark)
    return text[:room] + mark if keep == "head" else mark + text[-room:]


def _test_excerpt(test: TestResult, folder: Path, run: RunView) -> str:
    """What a person reads first: the message, the kernel lines that failed it, the traceback."""
    if test.status == "passed":
        return ""
    parts = [test.message.strip()] if test.message.strip() else []
    dmesg = folder / "dmesg.txt"
    if dmesg.is_file():
        bad = errors(scan(dmesg.read_text(errors="replace").splitlines()))
        if bad:
            parts.append("kernel log:\n" + "\n".join(f"{h.error_id}: {h.line}" for h in bad[:20]))
    if run.boot_failure and test.status != "skipped":
        if run.boot_failure not in test.message:
            parts.append(f"boot: {run.boot_failure}")
        if run.boot_lines:
            parts.append("console before the boot failed:\n" + "\n".join(run.boot_lines))
    if test.details.strip() and test.status != "skipped":
        parts.append(test.details.strip())
    return _clip("\n\n".join(parts))
