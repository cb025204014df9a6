"""KCIDB export: real runs of the real harness exported and checked by kcidb-io,
with every test's status held against the verdict junit.xml gives it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from junitparser import JUnitXml
from kcidb_io.schema import LATEST

from harness.errors import BadInput
from harness.kcidb import Exporter, export, kcidb_path, patchset_hash, rfc3339
from harness.paths import REPO, SAMPLE_KERNEL
from harness.results import TestRecord, write_records
from tests.conftest import Cli, write_meta_json

# A guest suite with one test of each verdict, one of them failed by the kernel's own log.
VERDICTS_SUITE = '''
import pytest
from harness.errors import InfraError


def test_passes(guest):
    assert guest.check("echo ok").strip() == "ok"


def test_fails(guest):
    assert guest.check("cat /proc/sys/kernel/ostype").strip() == "FreeBSD", "this is not the kernel we expected"


def test_skips(guest):
    pytest.skip("needs a TDX module: not on this host")


@pytest.fixture
def rig():
    raise InfraError("the DMA rig did not answer")


def test_errors(guest, rig):
    pass


def test_kernel_complains(guest):
    guest.check("echo '<3>swiotlb buffer is full (sz: 4096 bytes), total 32768 (slots)' > /dev/kmsg")
'''


def validated(doc: dict[str, Any]) -> dict[str, Any]:
    """kcidb-io's own verdict, for the newest schema version it knows."""
    LATEST.validate_exactly(doc)
    assert (doc["version"]["major"], doc["version"]["minor"]) == (LATEST.major, LATEST.minor)
    return doc


def junit_verdicts(path: Path, night: bool = False) -> dict[tuple[str, str, str], str]:
    """(suite of a night or "", classname, name) -> PASS/FAIL/ERROR/SKIP, read from JUnit alone."""
    out = {}
    for suite in JUnitXml.fromfile(str(path)):
        for case in suite:
            kinds = {type(r).__name__ for r in case.result}
            verdict = ("FAIL" if "Failure" in kinds else "ERROR" if "Error" in kinds
                       else "SKIP" if "Skipped" in kinds else "PASS")
            out[(suite.name if night else "", case.classname, case.name)] = verdict
    return out


def kcidb_verdicts(doc: dict[str, Any], night: bool = False) -> dict[tuple[str, str, str], str]:
    out = {}
    for t in doc["tests"]:
        suite = f"{t['misc']['nightly_entry']}#{t['misc']['repeat']}" if night else ""
        key = (suite, t["misc"]["junit"]["classname"], t["misc"]["junit"]["name"])
        assert key not in out, f"two KCIDB tests for one JUnit case {key}"
        out[key] = t["status"]
    return out


def shell_patchset_hash(patches: list[Path]) -> str:
    """The schema's own recipe: sha256sum *.patch | cut -c-64 | sha256sum | cut -c-64."""
    sums = subprocess.run(["sha256sum", *map(str, patches)], capture_output=True, text=True, check=True,
                          timeout=60).stdout
    listing = "".join(line[:64] + "\n" for line in sums.splitlines())
    return subprocess.run(["sha256sum"], input=listing, capture_output=True, text=True, check=True,
                          timeout=60).stdout[:64]


# -- pieces -------------------------------------------------------------------------------


@pytest.mark.parametrize(("nodeid", "path"), [
    ("test_dma.py::test_dma_stress_verifies[4-nvme]", "coco.dma.stress_verifies.4-nvme"),
    ("test_boot.py::test_reached_userspace", "coco.boot.reached_userspace"),
    ("sub/test_hp.py::TestSlots::test_hp_cycle[a.b c]", "coco.sub.hp.Slots.cycle.a_b_c"),
])
def test_node_ids_become_kcidb_paths(nodeid: str, path: str) -> None:
    assert kcidb_path(nodeid) == path


def test_patchset_hash_is_the_schemas_recipe() -> None:
    folder = REPO / "kernels" / "coco-sample"
    order = [folder / line.split()[0] for line in (folder / "series").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    import hashlib

    assert patchset_hash([hashlib.sha256(p.read_bytes()).hexdigest() for p in order]) == shell_patchset_hash(order)
    assert patchset_hash([]) == ""


def test_times_become_rfc3339() -> None:
    assert rfc3339("2026-11-01T09:48:55+0000") == "2026-11-01T09:48:55+00:00"
    assert rfc3339("2026-11-01T09:48:55-0130") == "2026-11-01T09:48:55-01:30"
    assert rfc3339("yesterday") is None and rfc3339(None) is None


def test_bad_input_names_the_thing(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match=f"{tmp_path}: not a run directory"):
        export([tmp_path])
    with pytest.raises(BadInput, match="--origin 'My Lab'"):
        Exporter("My Lab")
    with pytest.raises(BadInput, match="--log-url 'artifacts/'"):
        Exporter("lab", "artifacts/")
    (tmp_path / "meta.json").write_text("{")
    with pytest.raises(BadInput, match="meta.json: not JSON"):
        export([tmp_path])


def test_a_remote_targets_kernel_is_known_by_release_and_machine(tmp_path: Path) -> None:
    """meta.json as `harness run --target` writes it: no image, no hash; two machines stay apart."""
    for name, target in (("r1", "ssh://root@lab-a"), ("r2", "ssh://root@lab-b")):
        run = tmp_path / name
        run.mkdir()
        write_meta_json(run, {"run_id": name, "status": "passed", "started": "2026-11-01T00:00:00+0000",
                         "target": target, "kernel": {"release": "6.12.9", "spec": None},
                         "profile": {"requested": "remote", "effective": "remote", "reasons": [], "accel": None}})
        write_records(run, [TestRecord("test_boot.py::test_reached_userspace", "passed", seconds=0.2)])
    doc = validated(export([tmp_path / "r1", tmp_path / "r2"]))
    assert len(doc["checkouts"]) == len(doc["builds"]) == 2
    assert sorted(c["comment"] for c in doc["checkouts"]) == ["kernel 6.12.9 of ssh://root@lab-a",
                                                             "kernel 6.12.9 of ssh://root@lab-b"]
    assert {t["environment"]["misc"]["target"] for t in doc["tests"]} == {"ssh://root@lab-a", "ssh://root@lab-b"}


# -- real runs ------------------------------------------------------------------------------


def test_a_passing_run(cli: Cli) -> None:
    proc = cli("run", "--results", str(cli.results), "-k", "test_boot or 4-nvme")
    assert proc.returncode == 0, proc.stdout[-2000:]
    run = cli.only_run()
    base = "https://ci.example.org/jobs/7/artifacts"
    doc = validated(export([run], origin="lab_a", log_url=base))
    assert kcidb_verdicts(doc) == junit_verdicts(run / "junit.xml")
    assert {t["status"] for t in doc["tests"]} == {"PASS"} and len(doc["tests"]) == 8
    # Ids: origin-prefixed, and the same on a second export (a re-submission updates).
    again = export([run], origin="lab_a", log_url=base)
    assert [t["id"] for t in again["tests"]] == [t["id"] for t in doc["tests"]]
    assert all(o["id"].startswith("lab_a:") for kind in ("checkouts", "builds", "tests") for o in doc[kind])
    assert len({t["id"] for t in doc["tests"]}) == 8
    (checkout,), (build,) = doc["checkouts"], doc["builds"]
    assert checkout["tree_name"] == "debian" and checkout["patchset_hash"] == ""
    assert build["checkout_id"] == checkout["id"] and build["compiler"].startswith("gcc")
    assert build["config_name"].endswith("cloud-amd64")
    dma = next(t for t in doc["tests"] if t["path"] == "coco.dma.stress_verifies.4-nvme")
    assert dma["number"]["unit"] == "MB/s" and dma["number"]["value"] > 0
    assert dma["environment"]["comment"] == "emulated"
    # Every URL is the published path of a file that exists in the run.
    for t in doc["tests"]:
        for url in [t["log_url"], *(f["url"] for f in t.get("output_files", []))]:
            assert url.startswith(base + "/") and (cli.results / url[len(base) + 1:]).is_file(), url


def test_a_failing_run_keeps_every_verdict(cli: Cli, tmp_path: Path) -> None:
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_verdicts.py").write_text(VERDICTS_SUITE)
    proc = cli("run", "--results", str(cli.results), "--tests", str(suite))
    assert proc.returncode == 1, proc.stdout[-3000:]
    run = cli.only_run()
    doc = validated(export([run]))
    verdicts = kcidb_verdicts(doc)
    assert verdicts == junit_verdicts(run / "junit.xml")
    assert sorted(verdicts.values()) == ["ERROR", "FAIL", "FAIL", "PASS", "SKIP"]
    tests = {t["path"]: t for t in doc["tests"]}
    assert tests["coco.verdicts.fails"]["status"] == "FAIL"
    assert "this is not the kernel we expected" in tests["coco.verdicts.fails"]["log_excerpt"]
    complaint = tests["coco.verdicts.kernel_complains"]
    (error_id,) = complaint["misc"]["dmesg_error_ids"]
    assert error_id.startswith("swiotlb-full-") and complaint["status"] == "FAIL"
    assert f"{error_id}: " in complaint["log_excerpt"] and "swiotlb buffer is full" in complaint["log_excerpt"]
    assert tests["coco.verdicts.errors"]["status"] == "ERROR"
    assert "the DMA rig did not answer" in tests["coco.verdicts.errors"]["log_excerpt"]
    assert tests["coco.verdicts.skips"]["log_excerpt"] == "needs a TDX module: not on this host"
    assert "log_excerpt" not in tests["coco.verdicts.passes"]
    # Without --log-url nothing claims a URL; the run's place is in misc.
    assert not any("log_url" in t or "output_files" in t for t in doc["tests"])
    assert {t["misc"]["run_dir"] for t in doc["tests"]} == {run.name}


def test_a_built_kernel_has_its_source_patchset_and_build(cli: Cli) -> None:
    proc = cli("run", "--kernel", str(SAMPLE_KERNEL), "--results", str(cli.results),
               "-k", "test_series or test_reached_userspace", timeout=3000)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = validated(export([cli.only_run()], origin="lab_b"))
    (checkout,), (build,) = doc["checkouts"], doc["builds"]
    folder = REPO / "kernels" / "coco-sample"
    series = [folder / line.split()[0] for line in (folder / "series").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert checkout["patchset_hash"] == shell_patchset_hash(series)
    assert checkout["misc"]["source_identity"].startswith("tar:") and len(checkout["misc"]["patches"]) == 3
    assert "linux-source-6.12.tar.xz + 3 patches" in checkout["comment"]
    assert build["config_name"] == "base+virtio-channel"
    assert build["compiler"].startswith("gcc") and build["duration"] > 0
    assert build["log_excerpt"].strip() and Path(build["misc"]["log_path"]).is_file()
    assert {t["path"] for t in doc["tests"]} >= {"coco.series.sample_series_boot_message",
                                                 "coco.boot.reached_userspace"}
    assert {t["status"] for t in doc["tests"]} == {"PASS"}


# -- the commands ---------------------------------------------------------------------------


def test_export_command_bad_input_is_exit_2(cli: Cli, tmp_path: Path) -> None:
    for args, message in [((str(tmp_path),), f"{tmp_path}: not a run directory (meta.json) or a nightly tree"),
                          ((), "give RESULT directories or a NIGHT directory"),
                          ((str(tmp_path), "--origin", "Lab-1"), "--origin 'Lab-1'")]:
        proc = cli("export", "--kcidb", *args)
        assert proc.returncode == 2 and proc.stderr.strip() == f"harness: {message}" or message in proc.stderr, (
            proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert cli("export", str(tmp_path)).returncode == 2  # --kcidb is the format, and required
    assert cli("nightly", "nightly/example.yaml", "--origin", "x").returncode == 2  # --origin goes with --kcidb


def test_a_night_with_a_fallback_a_failure_and_an_entry_that_never_ran(cli: Cli, tmp_path: Path) -> None:
    kernel = "debian:linux-image-6.1.0-56-cloud-amd64"
    matrix = tmp_path / "matrix.yaml"
    matrix.write_text(json.dumps({
        "kernels": [kernel], "profiles": ["snp"], "timeout": 300, "retries": 0,
        "suites": {"boot": ["-k", "test_reached_userspace or test_memory_encryption_banner or test_swiotlb_pool"]},
        "entries": [{"name": "no-init", "kernel": kernel, "profile": "emulated", "append": "rdinit=/does-not-exist"},
                    {"name": "no-kernel", "kernel": str(tmp_path / "missing" / "bzImage"), "profile": "emulated"}],
    }))
    out = tmp_path / "night.kcidb.json"
    proc = cli("nightly", str(matrix), "--results", str(cli.results), "--jobs", "2", "--kcidb", str(out),
               "--origin", "lab_night", timeout=1200)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    night = next(cli.results.glob("nightly-*"))
    doc = validated(json.loads(out.read_text()))
    assert kcidb_verdicts(doc, night=True) == junit_verdicts(night / "junit.xml", night=True)
    by_entry: dict[str, list[dict[str, Any]]] = {}
    for t in doc["tests"]:
        by_entry.setdefault(t["misc"]["nightly_entry"], []).append(t)
    snp = by_entry[next(e for e in by_entry if e.endswith("--snp--boot"))]
    assert {t["environment"]["comment"].split(" (")[0] for t in snp} == {"snp -> coco-emulated"}
    assert all(t["environment"]["misc"]["fallback_reasons"] for t in snp)
    assert {t["path"]: t["status"] for t in snp}["coco.coco.memory_encryption_banner_matches_profile"] == "SKIP"
    # The kernel that never reached userspace: every test FAIL, the boot failure in the excerpt.
    assert {t["status"] for t in by_entry["no-init"]} == {"FAIL"}
    for t in by_entry["no-init"]:
        assert "Kernel panic - not syncing" in t["log_excerpt"].splitlines()[0]
        assert "console before the boot failed:" in t["log_excerpt"] and "ret_from_fork" in t["log_excerpt"]
    (missing,) = by_entry["no-kernel"]
    assert missing["status"] == "ERROR" and missing["path"] == "coco.harness_run" and "no such file" in missing[
        "log_excerpt"]
    # The same night exported again by `harness export`: the same document, ids and all.
    again = cli("export", "--kcidb", str(night), "--origin", "lab_night")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == doc
