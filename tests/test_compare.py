"""`harness compare` and the run index: synthetic run directories for the logic,
real runs of two Debian cloud kernels (6.1 and 6.12) for the command, and real
runs of two builds of one release (the sample series, and the same with a patch
whose WARN fails one guest test) for what tells builds apart."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from harness.compare import Cell, compare, load_run, render_text
from harness.identity import BuildIdentity
from harness.paths import SAMPLE_KERNEL
from harness.report import render_html
from harness.results import TestRecord, read_records, write_records
from harness.rundir import KernelRecord, ProfileRecord, RunRecord, RunStatus, Timings, write_run
from harness.runindex import failing_since, history, index_run
from tests.conftest import Cli, meta
from tests.same_release import PLANTED, SELECT, needs_source, planted_suite, warn_spec


def fake_run(root: Path, name: str, kernel: str, statuses: dict[str, str], boot: float,
             started: str, ids: list[str] | None = None, mbps: float | None = None,
             build: BuildIdentity | None = None, label: str | None = None) -> Path:
    run = root / name
    run.mkdir(parents=True)
    write_run(run, RunRecord(run_id=name, status=RunStatus.PASSED, started=started,
                             kernel=KernelRecord(kernel, build=build, label=label),
                             profile=ProfileRecord("emulated", "emulated"), timings=Timings(boot)))
    records = []
    for nodeid, status in statuses.items():
        rec = TestRecord(nodeid, status)
        if ids and status == "failed":
            rec.properties["dmesg_error_ids"] = ids
        if mbps is not None:
            rec.properties["dma_nvme_t4_MBps"] = mbps
        records.append(rec)
    write_records(run, records)
    return run


def test_regression_fix_flaky_and_dmesg_ids(tmp_path: Path) -> None:
    a = fake_run(tmp_path, "r1", "6.1", {"t.py::dma": "passed", "t.py::hp": "failed", "t.py::x": "passed"}, 2.0,
                 "2026-11-01T00:00:00", ["warning-aaa"], mbps=100)
    b1 = fake_run(tmp_path, "r2", "6.12", {"t.py::dma": "failed", "t.py::hp": "passed", "t.py::x": "passed"}, 3.0,
                  "2026-11-02T00:00:00", ["swiotlb-full-bbb"], mbps=50)
    b2 = fake_run(tmp_path, "r3", "6.12", {"t.py::dma": "failed", "t.py::hp": "passed", "t.py::x": "failed"}, 3.2,
                  "2026-11-03T00:00:00", ["swiotlb-full-bbb"])
    b3 = fake_run(tmp_path, "r4", "6.12", {"t.py::dma": "failed", "t.py::hp": "passed", "t.py::x": "passed"}, 2.8,
                  "2026-11-04T00:00:00")
    c = compare([load_run(p) for p in (a, b1, b2, b3)])
    assert c.kernels == ["6.1", "6.12"]
    assert c.table["t.py::dma"]["6.12"].text == "FAIL 3:3"
    assert c.table["t.py::x"]["6.12"].text == "flaky 1:3"
    kinds = {t["test"]: t["kind"] for t in c.transitions}
    assert kinds == {"t.py::dma": "regression", "t.py::hp": "fix", "t.py::x": "flaky"}
    assert c.new_dmesg["6.12"] == ["swiotlb-full-bbb"] and c.gone_dmesg["6.12"] == ["warning-aaa"]
    assert c.boot == {"6.1": 2.0, "6.12": 3.0}
    assert c.figures["dma_nvme_t4_MBps"] == {"6.1": 100.0, "6.12": 50.0}
    text = render_text(c)
    assert "REGRESSION t.py::dma: pass on 6.1 -> FAIL 3:3 on 6.12" in text
    assert "NEW DMESG  swiotlb-full-bbb on 6.12" in text and "(+50%)" in text
    page = render_html(c)
    assert page.startswith("<!doctype html>") and page.count("<svg") == 2 and "<script" not in page


def test_index_answers_when_a_test_started_failing(tmp_path: Path) -> None:
    statuses = ["passed", "passed", "failed", "failed", "failed"]
    for i, status in enumerate(statuses):
        run = fake_run(tmp_path, f"run{i}", f"6.12.{i}", {"t.py::hp": status}, 2.0, f"2026-11-0{i + 1}T00:00:00")
        index_run(run)
    rows = history(tmp_path, 10, "hp")
    assert [r["test_status"] for r in rows] == list(reversed(statuses))
    assert failing_since(rows, "hp") == "hp has failed since run2 (kernel 6.12.2)"
    assert "window ends here" in failing_since(history(tmp_path, 2, "hp"), "hp")


SAMPLE = BuildIdentity("artifact:d1d11f3c9fe1e4c96726f680", "6.12.117+", "coco-sample", 3, ("base",))
WARN = BuildIdentity("artifact:466cc815580f7de6e32d43da", "6.12.117+", "warn-on-read", 4, ("base",))
DEBUGFS = "test_series.py::test_sample_series_debugfs_attribute"
BOOT = "test_boot.py::test_reached_userspace"


def same_release_runs(root: Path) -> dict[str, list[Path]]:
    """Two runs of each build of 6.12.117+: the sample passes, the one with the warning fails DEBUGFS."""
    runs: dict[str, list[Path]] = {"sample": [], "warn": []}
    for i in range(2):
        runs["sample"].append(fake_run(root, f"s{i}", "6.12.117+", {BOOT: "passed", DEBUGFS: "passed"}, 2.0,
                                       f"2026-11-0{1 + i}T00:00:00", build=SAMPLE))
        runs["warn"].append(fake_run(root, f"w{i}", "6.12.117+", {BOOT: "passed", DEBUGFS: "failed"}, 2.0,
                                     f"2026-11-0{3 + i}T00:00:00", ["warning-a5a2473d37"], build=WARN))
    return runs


def test_two_builds_of_one_release_are_two_columns_in_either_order(tmp_path: Path) -> None:
    runs = same_release_runs(tmp_path)
    c = compare([load_run(p) for p in runs["sample"] + runs["warn"]])
    sample, warn = "6.12.117+ coco-sample (3 patches)", "6.12.117+ warn-on-read (4 patches)"
    assert c.kernels == [sample, warn] and c.builds[warn] == WARN
    assert c.table[DEBUGFS] == {sample: Cell(2, 0, 0), warn: Cell(2, 2, 0)}
    assert [(t["test"], t["kind"]) for t in c.transitions] == [(DEBUGFS, "regression")] and c.flaky == []
    text = render_text(c)
    assert f"REGRESSION {DEBUGFS}: pass on {sample} -> FAIL 2:2 on {warn}" in text and "flaky" not in text.lower()
    # The base is whatever is given first: the other way round it is a fix, and still not flaky.
    back = compare([load_run(p) for p in runs["warn"] + runs["sample"]])
    assert back.kernels == [warn, sample]
    assert [(t["test"], t["kind"]) for t in back.transitions] == [(DEBUGFS, "fix")] and back.flaky == []
    assert f"FIX        {DEBUGFS}: FAIL 2:2 on {warn} -> pass on {sample}" in render_text(back)
    # The JSON carries each build's whole identity.
    data = compare([load_run(p) for p in runs["sample"] + runs["warn"]]).to_json()
    assert data["builds"][warn] == {**WARN.to_json(), "name": warn, "labels": []}
    assert data["runs"] == {sample: ["s0", "s1"], warn: ["w0", "w1"]}


def test_one_build_whose_runs_disagree_is_flaky_even_alone(tmp_path: Path) -> None:
    runs = [fake_run(tmp_path, f"r{i}", "6.12.117+", {BOOT: "passed", DEBUGFS: status}, 2.0,
                     f"2026-11-0{1 + i}T00:00:00", build=SAMPLE, label="sample")
            for i, status in enumerate(("passed", "failed"))]
    c = compare([load_run(p) for p in runs])
    assert c.kernels == ["sample"] and c.transitions == []
    assert c.flaky == [{"test": DEBUGFS, "kernel": "sample", "cell": "flaky 1:2"}]
    text = render_text(c)
    assert f"FLAKY      {DEBUGFS}: flaky 1:2 on sample" in text and "REGRESSION" not in text
    page = render_html(c)
    assert '<li class="flaky">' in page and "no regressions, 1 other change" in page


def test_labels_name_the_columns_and_long_names_are_never_cut(tmp_path: Path) -> None:
    long = "a-very-long-label-for-the-patched-kernel-build with spaces"
    a = fake_run(tmp_path, "a", "6.12.117+", {BOOT: "passed", DEBUGFS: "passed"}, 2.0, "2026-11-01T00:00:00",
                 build=SAMPLE, label="base")
    b = fake_run(tmp_path, "b", "6.12.117+", {BOOT: "passed", DEBUGFS: "failed"}, 2.0, "2026-11-02T00:00:00",
                 build=WARN, label=long)
    c = fake_run(tmp_path, "c", "6.1.0-56-cloud-amd64", {BOOT: "passed", DEBUGFS: "skipped"}, 2.0,
                 "2026-11-03T00:00:00", build=BuildIdentity("image:" + "5" * 64, "6.1.0-56-cloud-amd64"))
    comparison = compare([load_run(p) for p in (a, b, c)])
    assert comparison.kernels == ["base", long, "6.1.0-56-cloud-amd64"]
    text = render_text(comparison)
    head = text.split("\ntest_boot.py")[0]
    # Every word of every name is in the header whole, and the legend names each build's key.
    for word in [*long.split(), "base", "6.1.0-56-cloud-amd64"]:
        assert word in head.split(), word
    assert "  base: 6.12.117+ coco-sample (3 patches) [base] artifact:d1d11f3c9fe1, 1 run" in text
    assert f"  {long}: 6.12.117+ warn-on-read (4 patches) [base] artifact:466cc815580f, 1 run" in text
    assert "  6.1.0-56-cloud-amd64 image:555555555555, 1 run" in text
    assert f"REGRESSION {DEBUGFS}: pass on base -> FAIL on {long}" in text
    # Columns line up: a row is as wide as the header's last line.
    row = next(line for line in text.splitlines() if line.startswith("test_boot.py"))
    assert len(row) == len(head.splitlines()[-1])


def test_compare_last_compares_the_indexed_runs_by_build(cli: Cli, tmp_path: Path) -> None:
    runs = same_release_runs(cli.results)
    for path in runs["sample"] + runs["warn"]:
        index_run(path)
    proc = cli("compare", "--last", "4", "--test", "test_sample_series_debugfs_attribute",
               "--results", str(cli.results))
    assert proc.returncode == 0, proc.stderr
    warn = "6.12.117+ warn-on-read (4 patches)"
    assert f"has failed since w0 (kernel {warn})" in proc.stdout
    assert f"REGRESSION {DEBUGFS}: pass on 6.12.117+ coco-sample (3 patches) -> FAIL 2:2 on {warn}" in proc.stdout
    assert "flaky" not in proc.stdout.lower()
    data = json.loads(cli("compare", "--last", "4", "--format", "json", "--results", str(cli.results)).stdout)
    sample = "6.12.117+ coco-sample (3 patches)"
    assert [r["name"] for r in data["runs"]] == [warn, warn, sample, sample]
    assert data["runs"][0]["build"]["key"] == WARN.key
    assert data["comparison"]["transitions"][0]["kind"] == "regression"


def test_an_index_an_older_harness_wrote_gains_the_build_columns(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "index.sqlite") as db:
        db.execute("CREATE TABLE runs (run_id TEXT PRIMARY KEY, dir TEXT, started TEXT, kernel TEXT, "
                   "profile TEXT, status TEXT, boot REAL)")
        db.execute("INSERT INTO runs VALUES ('old', '/gone', '2026-10-01T00:00:00', '6.12.117+', 'emulated', "
                   "'passed', 2.0)")
    db.close()
    index_run(same_release_runs(tmp_path)["warn"][0])
    rows = history(tmp_path, 5, None)
    assert [(r["run_id"], r["name"]) for r in rows] == [("w0", "6.12.117+ warn-on-read (4 patches)"),
                                                        ("old", "6.12.117+")]


def test_two_debian_kernels_compared_by_the_command(cli: Cli) -> None:
    for kernel in ("debian:linux-image-6.1.0-56-cloud-amd64", "debian:linux-image-6.12-cloud-amd64"):
        proc = cli("run", "--kernel", kernel, "--results", str(cli.results), "-k", "test_boot or 4-nvme")
        assert proc.returncode == 0, proc.stdout[-2000:]
    runs = [str(p) for p in cli.run_dirs()]
    out = cli("compare", *runs, "--format", "json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert len(data["kernels"]) == 2 and data["kernels"][0].startswith("6.1.") ^ data["kernels"][1].startswith("6.1.")
    assert all(v is not None for v in data["boot_seconds"].values())
    assert set(data["figures"]["dma_nvme_t4_MBps"]) == set(data["kernels"])
    assert data["tests"]["test_boot.py::test_reached_userspace"] == {k: "pass" for k in data["kernels"]}
    page = cli.tmp.parent / "report.html"
    assert cli("compare", *runs, "--format", "html", "--output", str(page)).returncode == 0
    assert "<svg" in page.read_text()
    last = cli("compare", "--last", "5", "--test", "test_reached_userspace", "--results", str(cli.results))
    assert last.returncode == 0 and "not failing in the newest run" in last.stdout
    assert (cli.results / "index.sqlite").is_file()


@needs_source
def test_two_builds_of_one_release_compared_by_the_command(cli: Cli, tmp_path: Path) -> None:
    suite, warn = planted_suite(tmp_path), str(warn_spec(tmp_path))
    # The sample build twice (named `sample`; the planted test fails on the first run only),
    # then the build with the warning twice: four runs, all reporting 6.12.117+.
    for kernel, label, code in ((SAMPLE_KERNEL, "sample", 1), (SAMPLE_KERNEL, "sample", 0), (warn, None, 1),
                                (warn, None, 1)):
        proc = cli("run", "--kernel", str(kernel), "--results", str(cli.results), "--tests", str(suite),
                   *(["--label", label] if label else []), *SELECT, timeout=3000)
        assert proc.returncode == code, proc.stdout[-3000:] + proc.stderr[-2000:]
    s1, s2, w1, w2 = map(str, cli.run_dirs())
    assert {meta(Path(r))["kernel"]["release"] for r in (s1, w1)} == {"6.12.117+"}
    warned, planted = "test_series.py::test_sample_series_debugfs_attribute", f"test_planted.py::{PLANTED}"
    name = "6.12.117+ warn-on-read (4 patches)"

    proc = cli("compare", s1, s2, w1, w2)
    assert proc.returncode == 0, proc.stderr
    assert f"REGRESSION {warned}: pass on sample -> FAIL 2:2 on {name}" in proc.stdout
    assert f"FLAKY      {planted}: flaky 1:2 on sample -> pass on {name}" in proc.stdout
    assert not [line for line in proc.stdout.splitlines() if "FLAKY" in line and warned in line]
    # The other way round the patched build is the base: the same test is fixed, still not flaky.
    back = cli("compare", w1, w2, s1, s2).stdout
    assert f"FIX        {warned}: FAIL 2:2 on {name} -> pass on sample" in back
    assert not [line for line in back.splitlines() if "FLAKY" in line and warned in line]
    # One build alone: its runs disagree on the planted test, and that is all.
    alone = cli("compare", s1, s2).stdout
    assert f"FLAKY      {planted}: flaky 1:2 on sample" in alone and "REGRESSION" not in alone
    # The run index, oldest first: the same verdicts.
    last = cli("compare", "--last", "4", "--test", "test_sample_series_debugfs_attribute",
               "--results", str(cli.results)).stdout
    assert f"REGRESSION {warned}: pass on sample -> FAIL 2:2 on {name}" in last
    assert f"has failed since {Path(w1).name} (kernel {name})" in last
    data = json.loads(cli("compare", s1, s2, w1, w2, "--format", "json").stdout)
    assert data["kernels"] == ["sample", name]
    keys = {k: b["key"] for k, b in data["builds"].items()}
    assert all(key.startswith("artifact:") for key in keys.values()) and len(set(keys.values())) == 2
    assert data["builds"]["sample"]["labels"] == ["sample"] and data["builds"][name]["series"] == "warn-on-read"
    page = cli.tmp.parent / "report.html"
    assert cli("compare", s1, s2, w1, w2, "--format", "html", "--output", str(page)).returncode == 0
    assert "<h2>1 regression, 1 other change</h2>" in page.read_text() and f"<th title=\"{keys[name]}\">" \
        in page.read_text()

    # Reproducing the sample's run keeps its label and its build.
    dirname = next(r.dirname for r in read_records(Path(s1)) if r.nodeid == warned)
    again = cli("reproduce", f"{s1}/tests/{dirname}", timeout=3000)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-2000:]
    new = next(p for p in cli.run_dirs() if str(p) not in (s1, s2, w1, w2))
    assert meta(new)["kernel"]["label"] == "sample" and meta(new)["kernel"]["build"]["key"] == keys["sample"]
    assert json.loads((new / "tests.json").read_text())[0]["status"] == "passed"
