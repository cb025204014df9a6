"""The `harness` command. `main(argv)` returns the exit code (see errors.py)."""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

from harness import __version__
from harness.errors import EXIT_BAD_INPUT, BadInput, HarnessError, Terminated
from harness.paths import GUEST_TESTS_DIR
from harness.probe import HostCaps
from harness.profiles import available

DEFAULT_PROFILE = "emulated"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise BadInput(f"{self.prog}: {message}")


def _add_launch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernel", default=None,
                   help="bzImage, build artifact dir, build spec YAML, or debian:<linux-image package> "
                        "(default: $HARNESS_KERNEL, else kernels/coco-sample.yaml)")
    p.add_argument("--profile", default=DEFAULT_PROFILE,
                   help=f"QEMU profile from qemu_cmdlines/ (default {DEFAULT_PROFILE}; available: "
                        f"{', '.join(available())})")
    p.add_argument("--append", default="", metavar="ARGS", help="extra kernel command-line arguments")
    p.add_argument("--qemu-arg", action="append", default=[], metavar="ARG",
                   help="extra QEMU argument (repeat for each), appended after the profile's")
    p.add_argument("--boot-timeout", type=float, default=None, metavar="S",
                   help="seconds to reach userspace (default: the profile's timeouts.boot)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="profile parameter (memory, smp, cbitpos, firmware, host_bdf, ...); repeatable")
    p.add_argument("--params", type=Path, default=None, metavar="FILE.yaml",
                   help="profile parameters from a YAML mapping (--param wins)")
    p.add_argument("--strict", action="store_true",
                   help="exit 3 instead of falling back when the host lacks the profile's hardware")
    p.add_argument("--force", action="store_true",
                   help="launch the requested profile even where the probe says the host lacks what it needs")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="harness", description="Linux kernel test harness for confidential-computing guests")
    parser.add_argument("--version", action="version", version=f"harness {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("probe", help="host capabilities: KVM, SEV/SNP/TDX, IOMMU, vfio, QEMU, firmware")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-cache", action="store_true", help="re-run the KVM probe guest")
    p.add_argument("--check-argv", action="store_true",
                   help="also start each profile's capable-host argv with -S and report QEMU's verdict")

    p = sub.add_parser("run", help="boot a kernel under a profile and run the guest tests",
                       epilog="Other arguments (-k EXPR, -n N, -x ...) are passed to pytest; "
                              "so is everything after --.")
    _add_launch_args(p)
    p.add_argument("--results", type=Path, default=Path("results"), help="results root (default results/)")
    p.add_argument("--tests", type=Path, default=GUEST_TESTS_DIR, help="guest test directory")
    p.add_argument("--timeout", type=float, default=1800.0, help="deadline for all guest tests, seconds")
    p.add_argument("--dry-run", action="store_true", help="print the launch plan, start nothing")
    p.add_argument("--channel", choices=("serial", "ssh"), default="serial",
                   help="command channel to our guest: its second serial port, or SSH (dropbear, per-run keys)")
    p.add_argument("--target", default=None, metavar="ssh://USER@HOST[:PORT]",
                   help="run the guest tests on an existing machine over SSH instead of booting one")
    p.add_argument("--identity", type=Path, default=None, help="private key for --target")
    p.add_argument("--known-hosts", type=Path, default=None,
                   help="known_hosts file pinning --target's host key (default: ~/.ssh/known_hosts)")
    p.add_argument("--json", action="store_true", help="with --dry-run: the plan as JSON")

    p = sub.add_parser("build", help="build a kernel: source + patch series + config fragments, cached")
    p.add_argument("specs", nargs="*", type=Path, metavar="SPEC.yaml",
                   help="build spec files {source, series, configs}")
    p.add_argument("--source", help="kernel tarball, git work tree[@ref] or unpacked tree")
    p.add_argument("--series", help="mbox, directory of *.patch (quilt series file honoured), or a message-id (b4)")
    p.add_argument("--config", action="append", default=[], metavar="FRAGMENT",
                   help="config fragment from kconfigs/ by name, or a path; repeatable, merged in order")
    p.add_argument("--per-patch", action="store_true", help="build after each patch; report build/warnings per patch")
    p.add_argument("--allow-dropped", action="store_true", help="build even if requested options did not survive")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("boot", help="boot and attach the terminal to the guest console (Ctrl-] leaves)")
    _add_launch_args(p)
    p.add_argument("--results", type=Path, default=Path("results"))

    p = sub.add_parser("compare", help="compare runs across kernel versions (transitions, dmesg ids, deltas)")
    p.add_argument("runs", nargs="*", type=Path, metavar="RESULT", help="results/<run-id> directories")
    p.add_argument("--format", choices=("text", "json", "html"), default="text")
    p.add_argument("--output", type=Path, default=None, help="write the report here instead of stdout")
    p.add_argument("--last", type=int, default=None, metavar="N", help="the last N runs from the run index")
    p.add_argument("--test", default=None, help="with --last: this test's status in each run")
    p.add_argument("--results", type=Path, default=Path("results"), help="results root holding index.sqlite")

    p = sub.add_parser("nightly", help="kernels x profiles x suites into one results tree, JUnit, exit code")
    p.add_argument("matrix", nargs="?", type=Path, help="MATRIX.yaml")
    p.add_argument("--results", type=Path, default=Path("results"), help="results root (default results/)")
    p.add_argument("--shard", default=None, metavar="I/N", help="run every N-th entry starting at I (1-based)")
    p.add_argument("--jobs", type=int, default=None, help="entries at a time (default: half the cores)")
    p.add_argument("--merge", type=Path, nargs="+", default=None, metavar="NIGHT",
                   help="merge shard trees (nightly-*/ directories) into --results instead of running")

    p = sub.add_parser("host-state", help="host bindings harness runs hold (vfio-pci, driver_override, "
                                          "module parameters), and putting them back")
    p.add_argument("--restore", action="store_true",
                   help="put back what runs that died (SIGKILL) left bound; runs still going keep theirs")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("reproduce", help="re-run a recorded run exactly")
    p.add_argument("result", type=Path, help="a results/<run-id> directory, or results/<run-id>/tests/<name>")
    p.add_argument("--results", type=Path, default=None, help="results root (default: beside RESULT)")
    p.add_argument("--shell", action="store_true",
                   help="boot it exactly as recorded and hand over the guest console instead of running tests")
    return parser


def parse_params(pairs: list[str], file: Path | None) -> dict[str, str]:
    """--params FILE.yaml then --param KEY=VALUE (later wins). Raises BadInput."""
    params: dict[str, str] = {}
    if file is not None:
        from harness.paths import load_yaml

        data = load_yaml(file, "params file")
        if not isinstance(data, dict):
            raise BadInput(f"params file {file}: expected a mapping of parameter: value")
        for key, value in data.items():
            if isinstance(value, (dict, list)) or value is None:
                raise BadInput(f"params file {file}: key {key!r}: expected a string or a number")
            params[str(key)] = str(value).lower() if isinstance(value, bool) else str(value)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise BadInput(f"--param {pair!r}: expected KEY=VALUE")
        params[key] = value
    return params


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Terminated(signum)


def main(argv: list[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _dispatch(args_list)
    except HarnessError as e:
        print(f"harness: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("harness: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except Terminated as e:
        print(f"harness: {e}", file=sys.stderr)
        return 128 + e.signum
    finally:
        signal.signal(signal.SIGTERM, previous)


def _dispatch(argv: list[str]) -> int:
    parser = build_parser()
    passthrough: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, passthrough = argv[:i], argv[i + 1:]
    try:
        args, extra = parser.parse_known_args(argv)
    except SystemExit as e:  # --help and --version
        return int(e.code or 0)
    if extra and args.command != "run":
        raise BadInput(f"harness {args.command}: unrecognized arguments: {' '.join(extra)}")
    if args.command == "probe":
        return _probe(args)
    if args.command == "run":
        return _run(args, [*extra, *passthrough], argv)
    if args.command == "boot":
        return _boot(args)
    if args.command == "build":
        return _build(args)
    if args.command == "reproduce":
        return _reproduce(args)
    if args.command == "compare":
        return _compare(args)
    if args.command == "nightly":
        return _nightly(args)
    if args.command == "host-state":
        from harness.hoststate import report

        return report(args.restore, args.json)
    return EXIT_BAD_INPUT


def _probe(args: argparse.Namespace) -> int:
    from harness.probe import probe_host

    caps = probe_host(use_cache=not args.no_cache)
    table = profile_table(caps, args.check_argv)
    if args.json:
        print(json.dumps({**caps.to_json(), "profiles": table}, indent=2))
        return 0
    rows = [("kvm", caps.kvm), ("qemu", caps.qemu), ("qemu version", caps.qemu_version),
            ("qemu coco objects", caps.qemu_objects), ("sev", caps.sev), ("sev-es", caps.sev_es),
            ("sev-snp", caps.sev_snp), ("tdx", caps.tdx), ("c-bit position", caps.cbitpos),
            ("iommu", caps.iommu), ("vfio-pci", caps.vfio_pci), ("vfio-pci tio flag", caps.vfio_tio)]
    rows += [(f"firmware {name}", fact) for name, fact in caps.firmware.items()]
    for name, fact in rows:
        value = fact.value
        if isinstance(value, str):
            shown = value or "none"
        elif isinstance(value, bool) or value is None:
            shown = {True: "yes", False: "no", None: "-"}[value]
        else:
            shown = str(value)
        if name == "kvm":
            shown = fact.evidence
        print(f"{name:20} {shown:34} {'' if name == 'kvm' else fact.evidence}".rstrip())
    print(f"\nguests here run under {'KVM' if caps.kvm_usable else 'TCG (software emulation)'}\n")
    width = max(len(row["profile"]) for row in table)
    for row in table:
        verdict = row["verdict"] + (f" -> {row['effective']}" if row["verdict"] == "falls back" else "")
        print(f"{row['profile']:{width}}  {verdict:30} {'; '.join(row['reasons'])}".rstrip())
        if "qemu_check" in row:
            print(f"{'':{width}}  qemu argv check: {row['qemu_check']}: {row['qemu_message']}")
    return 0


def profile_table(caps: HostCaps, check_argv: bool = False) -> list[dict[str, Any]]:
    """Each profile: runs for real here / falls back to its twin / cannot run, and why."""
    from harness.plan import choose_profile
    from harness.qemu_check import check_profile_argv

    rows: list[dict[str, Any]] = []
    for name in available():
        try:
            choice = choose_profile(name, {}, caps)
        except HarnessError as e:
            rows.append({"profile": name, "verdict": "cannot run", "effective": name, "reasons": [str(e)]})
            continue
        row: dict[str, Any] = {"profile": name, "verdict": choice.verdict, "effective": choice.effective.name,
                                  "reasons": list(choice.reasons)}
        if check_argv:
            verdict = check_profile_argv(choice.requested, caps)
            row.update(qemu_check=verdict.verdict, qemu_message=verdict.message)
        rows.append(row)
    return rows


def _run(args: argparse.Namespace, pytest_args: list[str], argv: list[str]) -> int:
    from harness.runner import RunRequest, run

    if args.json and not args.dry_run:
        raise BadInput("harness run: --json needs --dry-run")
    req = RunRequest(kernel=args.kernel, profile=args.profile, append=args.append, results=args.results,
                     tests=args.tests, pytest_args=pytest_args, qemu_args=args.qemu_arg,
                     timeout=args.timeout, boot_timeout=args.boot_timeout, dry_run=args.dry_run,
                     json=args.json, params=parse_params(args.param, args.params), strict=args.strict,
                     force=args.force, channel=args.channel, target=args.target, identity=args.identity,
                     known_hosts=args.known_hosts)
    return run(req, argv)


def _build(args: argparse.Namespace) -> int:
    from harness.build import BuildFailed, BuildSpec, build, load_spec

    specs = [load_spec(p) for p in args.specs]
    if args.source:
        specs.append(BuildSpec(source=args.source, series=args.series, configs=args.config or ["base"]))
    elif args.series or args.config:
        raise BadInput("harness build: --series/--config need --source (or give SPEC.yaml files)")
    if not specs:
        raise BadInput("harness build: give SPEC.yaml files or --source")
    results = []
    for spec in specs:
        try:
            result = build(spec, per_patch=args.per_patch, allow_dropped=args.allow_dropped)
        except BuildFailed as e:
            if e.steps:
                _print_steps(e.steps)
            raise
        results.append(result)
        if args.json:
            continue
        if result.steps:
            _print_steps(result.steps)
        print(f"{result.artifact}/bzImage  {result.release}  "
              f"({'cache hit' if result.cached else 'built'} in {result.seconds:.1f}s)")
    if args.json:
        print(json.dumps([r.to_json() for r in results], indent=2))
    return 0


def _print_steps(steps: list[Any]) -> None:
    for s in steps:
        extra = f"  {len(s.new_warnings)} new warning(s): {s.new_warnings[0][:100]}" if s.new_warnings else ""
        extra += f"  {s.errors[0][:120]}" if s.errors else ""
        print(f"patch {s.index:2}  {s.status:6}  {s.seconds:6.1f}s  {s.subject}{extra}", file=sys.stderr)


def _boot(args: argparse.Namespace) -> int:
    from harness.runner import RunRequest

    return interactive_boot(RunRequest(kernel=args.kernel, profile=args.profile, append=args.append,
                                       qemu_args=args.qemu_arg, boot_timeout=args.boot_timeout,
                                       params=parse_params(args.param, args.params), strict=args.strict,
                                       force=args.force), args.results)


def interactive_boot(req: Any, results: Path) -> int:
    """Boot a RunRequest's plan with the console on this terminal (Ctrl-] leaves)."""
    from harness.console_tty import attach, write_through
    from harness.machine import Machine
    from harness.results import new_run_id
    from harness.runner import make_plan, sweep_stale

    plan, _ = make_plan(req)
    sweep_stale()
    log_dir = results.resolve() / ("boot-" + new_run_id(plan.kernel.release, plan.profile.name))
    print(f"booting {plan.kernel.release} under {plan.profile.name} ({plan.accel}); "
          f"console log {log_dir}/console.log; Ctrl-] leaves", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="harness-") as socks, \
            Machine(plan, log_dir, name="harness-boot", sock_parent=Path(socks),
                    console_sink=write_through) as machine:
        status = attach(machine)
    print(f"\r\nharness: guest stopped; console log {log_dir}/console.log", file=sys.stderr)
    return 0 if status == 0 else 1


def _nightly(args: argparse.Namespace) -> int:
    from harness.nightly import jobs_default, merge_nights, run_nightly

    if args.merge:
        return merge_nights(args.merge, args.results)
    if args.matrix is None:
        raise BadInput("harness nightly: give MATRIX.yaml (or --merge NIGHT...)")
    _, code = run_nightly(args.matrix, args.results, args.shard, args.jobs or jobs_default())
    return code


def _compare(args: argparse.Namespace) -> int:
    from harness.compare import compare, history, load_run, render_history, render_html, render_text

    if args.last is not None:
        if args.last < 1:
            raise BadInput("harness compare: --last takes a positive number")
        rows = history(args.results, args.last, args.test)
        text = json.dumps(rows, indent=2) if args.format == "json" else render_history(rows, args.test)
    else:
        if not args.runs:
            raise BadInput("harness compare: give RESULT directories, or --last N")
        comparison = compare([load_run(p) for p in args.runs])
        if args.format == "json":
            text = json.dumps(comparison.to_json(), indent=2)
        elif args.format == "html":
            text = render_html(comparison)
        else:
            text = render_text(comparison)
    if args.output:
        args.output.write_text(text if text.endswith("\n") else text + "\n")
        print(f"wrote {args.output}")
    else:
        print(text)
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from harness.kernel import file_sha256
    from harness.results import read_meta
    from harness.runner import RunRequest, run

    result = args.result.resolve()
    selection: list[str] = []
    if result.parent.name == "tests" and (result.parent.parent / "meta.json").is_file():
        # RESULT/tests/<name>: that one test, by the node id the run recorded for it.
        from harness.results import read_records

        run_dir = result.parent.parent
        match = [r.nodeid for r in read_records(run_dir) if r.dirname == result.name]
        if not match:
            raise BadInput(f"{args.result}: no test of run {run_dir.name} is recorded under that name")
        selection, result = match, run_dir
    if not (result / "meta.json").is_file():
        raise BadInput(f"{args.result}: not a run directory (no meta.json)")
    meta = read_meta(result)
    inv = meta.get("invocation")
    if not isinstance(inv, dict):
        raise BadInput(f"{result}/meta.json: no 'invocation' key to reproduce from")
    image = Path(meta["kernel"]["image"])
    if not image.is_file() or file_sha256(image) != meta["kernel"]["sha256"]:
        raise BadInput(f"kernel {image} of run {meta['run_id']} is missing or changed since (sha256)")
    if "target" in inv:
        raise BadInput(f"{result}: a remote-target run is reproduced by running it again on its target")
    tests_dir = Path(inv["tests"])
    pytest_args = [str(tests_dir / n) for n in selection] if selection else list(inv["pytest_args"])
    req = RunRequest(kernel=str(image), profile=inv["profile"], append=inv["append"],
                     results=args.results or result.parent, tests=tests_dir,
                     pytest_args=pytest_args, qemu_args=list(inv["qemu_args"]),
                     timeout=float(inv["timeout"]), boot_timeout=inv.get("boot_timeout"),
                     params=dict(inv.get("params") or {}), strict=bool(inv.get("strict")),
                     force=bool(inv.get("force")), channel=str(inv.get("channel", "serial")),
                     reproduces=meta["run_id"])
    if args.shell:
        print(f"booting {meta['run_id']} as recorded; the guest console is yours (Ctrl-] leaves)", flush=True)
        return interactive_boot(req, req.results)
    what = f"{selection[0]} of " if selection else ""
    print(f"reproducing {what}{meta['run_id']}: {shlex.join(meta['command'])}", flush=True)
    start = time.monotonic()
    code = run(req, ["reproduce", str(result)])
    print(f"reproduce of {meta['run_id']}: exit {code} (recorded exit {meta.get('exit_code')}) "
          f"in {time.monotonic() - start:.1f}s")
    return code
