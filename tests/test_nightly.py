"""`harness nightly`: the matrix, shards, merging, a real night of 2 kernels x 2
profiles with an entry whose kernel fails and one whose QEMU cannot start, and
a real night of two builds of one release with repeats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from junitparser import JUnitXml

from harness.errors import BadInput
from harness.nightly import Outcome, load_matrix, merge_nights, night_exit_code, parse_shard, shard, write_report
from harness.paths import SAMPLE_KERNEL
from tests.conftest import Cli
from tests.same_release import DEBUGFS, PLANTED, SELECT, needs_source, planted_test, warn_spec

KERNELS = ["debian:linux-image-6.1.0-56-cloud-amd64", "debian:linux-image-6.12-cloud-amd64"]
MATRIX = {
    "kernels": KERNELS,
    "profiles": ["emulated", "snp"],
    "suites": {"boot": ["-k", "test_reached_userspace or test_booted_release"]},
    "timeout": 300,
    "retries": 1,
    "entries": [
        {"name": "no-init", "kernel": KERNELS[0], "profile": "emulated", "append": "rdinit=/does-not-exist"},
        {"name": "qemu-refuses", "kernel": KERNELS[0], "profile": "emulated", "qemu_args": ["-device", "nope"]},
    ],
}


def write(tmp: Path, data: dict[str, object]) -> Path:
    path = tmp / "matrix.yaml"
    path.write_text(json.dumps(data))  # JSON is YAML
    return path


def test_matrix_product_and_explicit_entries(tmp_path: Path) -> None:
    entries, repeat, retries = load_matrix(write(tmp_path, MATRIX))
    assert len(entries) == 6 and (repeat, retries) == (1, 1)
    assert entries[0].name == "linux-image-6.1.0-56-cloud-amd64--emulated--boot"
    assert entries[-1].qemu_args == ["-device", "nope"] and entries[-2].append == "rdinit=/does-not-exist"


@pytest.mark.parametrize(("change", "message"), [
    ({"kernal": []}, "unknown key 'kernal'"),
    ({"entries": [{"kernel": "k", "profile": "emulated", "suite": "nope"}]}, "unknown suite 'nope'"),
    ({"entries": [{"name": "x", "kernel": "k", "profile": "emulated"},
                  {"name": "x", "kernel": "k", "profile": "emulated"}]}, "two entries are named 'x'"),
    ({"entries": [{"kernel": "k", "profile": "p"}]}, r"entries\[0\]\.profile: unknown profile 'p'"),
    ({"suites": {"boot": "-k x"}}, "maps names to lists"),
])
def test_bad_matrices(tmp_path: Path, change: dict[str, object], message: str) -> None:
    with pytest.raises(BadInput, match=message):
        load_matrix(write(tmp_path, {**MATRIX, **change}))


def test_shards_partition_the_matrix_deterministically(tmp_path: Path) -> None:
    entries, _, _ = load_matrix(write(tmp_path, MATRIX))
    parts = [shard(entries, i, 4) for i in range(1, 5)]
    assert sorted(e.name for p in parts for e in p) == sorted(e.name for e in entries)
    assert [e.name for e in shard(entries, 2, 4)] == [e.name for e in shard(entries, 2, 4)]
    with pytest.raises(BadInput, match="expected I/N"):
        parse_shard("5/4")


def test_a_kernel_is_named_by_a_label_in_the_matrix(tmp_path: Path) -> None:
    matrix = {"kernels": [{"kernel": "kernels/coco-sample.yaml", "label": "base"}, "k2.yaml"],
              "profiles": ["emulated"], "entries": [{"kernel": "k3", "profile": "emulated", "label": "patched"}]}
    entries, _, _ = load_matrix(write(tmp_path, matrix))
    assert [(e.name, e.kernel, e.label) for e in entries] == [
        ("base--emulated--all", "kernels/coco-sample.yaml", "base"), ("k2.yaml--emulated--all", "k2.yaml", None),
        ("patched--emulated--all--x1", "k3", "patched")]
    for bad in ({"kernel": "k", "label": " "}, {"kernel": "k", "name": "x"}, {"label": "x"}):
        with pytest.raises(BadInput, match=r"kernels\[0\]"):
            load_matrix(write(tmp_path, {**matrix, "kernels": [bad]}))


def test_exit_code_and_merge(tmp_path: Path) -> None:
    def outcome(name: str, code: int) -> Outcome:
        return Outcome(name, "k", "p", "s", 1, code, "x", 1, None, 1.0, "msg")

    assert night_exit_code([outcome("a", 0), outcome("b", 3)]) == 3
    assert night_exit_code([outcome("a", 1), outcome("b", 3)]) == 1
    assert night_exit_code([outcome("a", 0)]) == 0
    for i, code in enumerate((0, 3)):
        (tmp_path / f"shard{i}").mkdir()
        write_report(tmp_path / f"shard{i}", [outcome(f"e{i}", code)], {})
    assert merge_nights([tmp_path / "shard0", tmp_path / "shard1"], tmp_path / "merged") == 3
    xml = JUnitXml.fromfile(str(tmp_path / "merged" / "junit.xml"))
    assert xml.errors == 2  # entries without results are error cases


def test_a_real_night(cli: Cli, tmp_path: Path) -> None:
    proc = cli("nightly", str(write(tmp_path, MATRIX)), "--results", str(cli.results), "--jobs", "2", timeout=1500)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    night = next(cli.results.glob("nightly-*"))
    outcomes = {o["entry"]: o for o in json.loads((night / "nightly.json").read_text())["outcomes"]}
    assert outcomes["no-init"]["status"] == "failed" and outcomes["no-init"]["attempts"] == 1
    assert outcomes["qemu-refuses"]["status"] == "infra-error" and outcomes["qemu-refuses"]["attempts"] == 2
    good = [o for name, o in outcomes.items() if name not in ("no-init", "qemu-refuses")]
    assert len(good) == 4 and all(o["status"] == "passed" for o in good)
    xml = JUnitXml.fromfile(str(night / "junit.xml"))
    suites = {s.name: s for s in xml}
    assert suites["no-init#1"].failures == suites["no-init#1"].tests > 0 and suites["no-init#1"].errors == 0
    assert suites["qemu-refuses#1"].errors == suites["qemu-refuses#1"].tests > 0
    assert "INFRA-ERROR" in proc.stdout and "FAILED" in proc.stdout and "[6/6]" in proc.stdout


def test_a_killed_night_takes_its_runs_with_it(cli: Cli, tmp_path: Path) -> None:
    matrix = write(tmp_path, {"kernels": KERNELS[:1], "profiles": ["emulated"], "suites": {"boot": []}})
    cli.sigkill_once_booting("nightly", str(matrix), "--results", str(cli.results),
                             console_glob="nightly-*/*/*/console.log")
    night = next(cli.results.glob("nightly-*"))
    assert json.loads((night / "nightly.json").read_text())["status"] == "incomplete"
    # The next night is unaffected, and sweeps the killed run's socket directory.
    assert any(p.name.startswith("harness-") for p in cli.tmp.iterdir())
    again = cli("nightly", str(matrix), "--results", str(cli.results / "next"), timeout=600)
    assert again.returncode == 0, again.stdout[-2000:]
    assert not any(p.name.startswith("harness-") for p in cli.tmp.iterdir())


@needs_source
def test_a_night_of_two_builds_of_one_release(cli: Cli, tmp_path: Path) -> None:
    # The sample build (named `base`) and the same with the warning, twice each: the planted
    # test fails on the night's first run only, which is one of the base's two (they start first).
    matrix = {"kernels": [{"kernel": str(SAMPLE_KERNEL), "label": "base"}, str(warn_spec(tmp_path))],
              "profiles": ["emulated"], "suites": {"series": [str(planted_test(tmp_path / "planted")), *SELECT]},
              "repeat": 2, "timeout": 900}
    proc = cli("nightly", str(write(tmp_path, matrix)), "--results", str(cli.results), "--jobs", "2", timeout=3000)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    night = next(cli.results.glob("nightly-*"))
    summary = (night / "summary.txt").read_text()
    name = "6.12.117+ warn-on-read (4 patches)"
    assert f"builds under emulated, base first: base (2 runs), {name} (2 runs)" in summary
    assert f"  REGRESSION {DEBUGFS}: pass on base -> FAIL 2:2 on {name}" in summary
    planted = next(line for line in summary.splitlines() if PLANTED in line)
    assert planted.split()[0] == "FLAKY" and f"flaky 1:2 on base -> pass on {name}" in planted
    assert not [line for line in summary.splitlines() if "FLAKY" in line and DEBUGFS in line]
    assert summary in proc.stdout
    compared = json.loads((night / "nightly.json").read_text())["comparisons"]["emulated"]
    assert compared["kernels"] == ["base", name] and compared["builds"]["base"]["key"].startswith("artifact:")
    assert "<h2>1 regression, 1 other change</h2>" in (night / "compare-emulated.html").read_text()
