"""`harness compare` and the run index: synthetic run directories for the logic,
real runs of two Debian cloud kernels (6.1 and 6.12) for the command."""

from __future__ import annotations

import json
from pathlib import Path

from harness.compare import compare, load_run, render_text
from harness.compare_html import render_html
from harness.results import TestRecord, write_records
from harness.rundir import KernelRecord, ProfileRecord, RunRecord, RunStatus, Timings, write_run
from harness.runindex import failing_since, history, index_run
from tests.conftest import Cli


def fake_run(root: Path, name: str, kernel: str, statuses: dict[str, str], boot: float,
             started: str, ids: list[str] | None = None, mbps: float | None = None) -> Path:
    run = root / name
    run.mkdir(parents=True)
    write_run(run, RunRecord(run_id=name, status=RunStatus.PASSED, started=started, kernel=KernelRecord(kernel),
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
