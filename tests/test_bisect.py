"""`harness bisect`'s logic in seconds: real builds of series written here for the
fake kernel tree (tests/fakelinux), with the guest run replaced by a fake that
fails a kernel whose series holds a patch marked as the fault. What only real
kernels show (a runtime fault a guest test sees, a build break gcc reports, a
range of commits bisected by git) is in test_bisect_real.py.

Each series here appends lines to the fake tree's swiotlb.c, one patch each:
`#error` breaks the build, and a later patch may take it out again."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.bisect import bisect, next_prefix, spec_request
from harness.bisect_git import SCRIPT_SKIP, first_bad_of
from harness.bisect_record import (
    BISECT_JSON,
    BisectRecord,
    BisectRequest,
    BisectStatus,
    RunOutcome,
    TestFailure,
    Verdict,
    read_record,
)
from harness.build import build_checkout, open_history
from harness.errors import EXIT_BAD_INPUT, EXIT_INFRA, EXIT_KERNEL, EXIT_OK, BadInput
from tests.conftest import REPO, Cli

FAKE = REPO / "tests" / "fakelinux"
TREE = FAKE / "tree"
SAMPLE_CONFIG = str(FAKE / "kconfigs" / "sample.config")
FAULT = "fault:"          # a patch whose subject starts so makes the fake run fail
FAILING = TestFailure("test_coco.py::test_dma_bounces_through_swiotlb",
                      "AssertionError: DMA did not go through the swiotlb pool", ["WARNING-swiotlb-1a2b"])


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("HARNESS_CACHE", str(path))
    return path


def write_series(where: Path, patches: list[tuple[str, str]], remove: dict[int, str] | None = None) -> Path:
    """A series for the fake tree made with git: patch i (1-based) appends its line to
    kernel/dma/swiotlb.c, or with `remove` takes that line out again. Returns the directory."""
    work = where / "series-work"
    shutil.copytree(TREE, work)
    git = ["git", "-C", str(work), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "base"], check=True)
    source = work / "kernel" / "dma" / "swiotlb.c"
    for i, (subject, line) in enumerate(patches, 1):
        text = source.read_text()
        gone = (remove or {}).get(i)
        source.write_text(text.replace(gone + "\n", "") if gone else text + line + "\n")
        subprocess.run([*git, "commit", "-qam", subject], check=True)
    out = where / "series"
    subprocess.run([*git, "format-patch", "-q", "-o", str(out), f"HEAD~{len(patches)}"], check=True)
    shutil.rmtree(work)
    return out


class FakeRun:
    """The guest run: fails when the kernel's series holds a FAULT patch. `script` gives
    exit codes to return instead, in order, for the prefixes it names."""

    def __init__(self, script: dict[int, list[int]] | None = None) -> None:
        self.script = script or {}
        self.calls: list[int] = []

    def __call__(self, artifact: Path, log: Path) -> RunOutcome:
        subjects = [p["subject"] for p in json.loads((artifact / "harness-build.json").read_text())["patches"]]
        prefix = len(subjects)
        self.calls.append(prefix)
        log.open("a").write(f"fake run on {prefix} patches\n")
        if self.script.get(prefix):
            code = self.script[prefix].pop(0)
        else:
            code = EXIT_KERNEL if any(s.startswith(FAULT) for s in subjects) else EXIT_OK
        failures = [FAILING] if code == EXIT_KERNEL else []
        note = {EXIT_INFRA: "QEMU would not start", EXIT_BAD_INPUT: "no guest tests selected"}.get(code, "")
        return RunOutcome(code, 0.1, run_dir=str(artifact.parent / f"run-{prefix}"), failures=failures, note=note)


def request(series: Path, results: Path, **options: object) -> BisectRequest:
    return BisectRequest(source=str(TREE), series=str(series), configs=[SAMPLE_CONFIG], profile="emulated",
                         pytest_args=["-k", "swiotlb"], results=str(results), **options)  # type: ignore[arg-type]


def run_bisect(req: BisectRequest, fake: Callable[[Path, Path], RunOutcome]) -> tuple[int, BisectRecord, list[str]]:
    said: list[str] = []
    code = bisect(req, ["bisect", "test"], say=said.append, run=fake)
    (out,) = Path(req.results).glob("bisect-*")
    return code, read_record(out), said


def prefixes(record: BisectRecord) -> list[int | None]:
    return [s.target.index for s in record.steps]


# -- the search ------------------------------------------------------------------


def test_next_prefix_takes_the_middle_then_the_nearest_untried_prefix() -> None:
    assert next_prefix(0, 4, set()) == 2
    assert next_prefix(0, 5, set()) == 2                  # the shorter of two middles
    assert next_prefix(0, 5, {2}) == 3                    # nearest to 2.5 after a skip
    assert next_prefix(0, 4, {2}) == 1
    assert next_prefix(2, 5, {3, 4}) is None              # only prefixes that do not build are left
    assert next_prefix(3, 4, set()) is None


def test_the_runtime_fault_of_patch_3_of_4_is_named(tmp_path: Path) -> None:
    series = write_series(tmp_path, [("swiotlb: one", "/* one */"), ("swiotlb: two", "/* two */"),
                                     (f"{FAULT} swiotlb: three", "/* three */"), ("swiotlb: four", "/* four */")])
    fake = FakeRun()
    code, record, said = run_bisect(request(series, tmp_path / "results"), fake)
    assert code == EXIT_OK, record.message
    assert prefixes(record) == [0, 4, 2, 3] and fake.calls == [0, 4, 2, 3]
    assert record.status is BisectStatus.FOUND and record.first_bad is not None
    assert (record.first_bad.index, record.first_bad.subject) == (3, f"{FAULT} swiotlb: three")
    assert record.first_bad.file is not None and record.first_bad.file.endswith("0003-fault-swiotlb-three.patch")
    assert record.last_good is not None and record.last_good.index == 2
    assert record.failing_tests == [FAILING]
    assert record.reproduce == f"harness reproduce {record.steps[3].runs[0].run_dir}"
    assert [s.verdict for s in record.steps] == [Verdict.GOOD, Verdict.BAD, Verdict.GOOD, Verdict.BAD]
    steps = [line for line in said if line.startswith("step ")]
    assert steps[0].startswith("step 1/~4: base (no patches): build ") and steps[0].endswith(": PASS")
    assert steps[3].startswith("step 4/~4: patch 3/4 'fault: swiotlb: three': build ")
    assert steps[3].endswith(": FAIL test_dma_bounces_through_swiotlb")
    # Every step has its log; bisect.json is complete and has the verdict.
    data = json.loads(next((tmp_path / "results").glob(f"bisect-*/{BISECT_JSON}")).read_text())
    assert data["status"] == "found" and data["exit_code"] == 0 and len(data["steps"]) == 4
    assert data["first_bad"]["index"] == 3 and data["request"]["series"] == str(series)
    assert sorted(p.name for p in next((tmp_path / "results").glob("bisect-*")).glob("step-*.log")) == [
        "step-01.log", "step-02.log", "step-03.log", "step-04.log"]


def test_a_fragment_option_that_a_later_patch_adds_is_not_dropped_at_earlier_steps(tmp_path: Path) -> None:
    # new-option's patch 1 adds HARNESS_DEMO_LOUD, which loud.config asks for: the base
    # (step 1) is built without it, not refused as a dropped option.
    series = tmp_path / "series"
    shutil.copytree(FAKE / "series" / "new-option", series)
    second = next(series.glob("0002-*.patch"))
    second.write_text(second.read_text().replace("Subject: [PATCH 2/2] ", f"Subject: [PATCH 2/2] {FAULT} "))
    req = request(series, tmp_path / "results")
    req.configs.append(str(FAKE / "kconfigs" / "loud.config"))
    code, record, _ = run_bisect(req, FakeRun())
    assert code == EXIT_OK, record.message
    assert record.first_bad is not None and record.first_bad.index == 2
    configs = {s.target.index: Path(s.build.artifact or "", "config").read_text() for s in record.steps if s.build}
    assert "HARNESS_DEMO_LOUD" not in configs[0] and "CONFIG_HARNESS_DEMO_LOUD=y" in configs[2]


def test_a_build_break_in_the_middle_is_skipped_and_the_culprit_still_found(tmp_path: Path) -> None:
    series = write_series(tmp_path, [("swiotlb: one", "/* one */"), ("swiotlb: break", '#error "half a change"'),
                                     ("swiotlb: mend", ""), (f"{FAULT} swiotlb: four", "/* four */"),
                                     ("swiotlb: five", "/* five */")], remove={3: '#error "half a change"'})
    code, record, said = run_bisect(request(series, tmp_path / "results"), FakeRun())
    assert code == EXIT_OK, record.message
    assert prefixes(record) == [0, 5, 2, 3, 4]
    assert record.steps[2].verdict is Verdict.SKIP and record.steps[2].runs == []
    assert record.steps[2].build is not None and record.steps[2].build.status == "failed"
    assert any("half a change" in e for e in record.steps[2].build.errors)
    assert record.first_bad is not None and record.first_bad.index == 4
    line = next(x for x in said if x.startswith("step 3/"))
    assert "patch 2/5 'swiotlb: break': build FAILED in " in line and line.endswith("skipped (does not build)")


def test_only_unbuildable_patches_left_names_the_candidates_exit_1(tmp_path: Path) -> None:
    series = write_series(tmp_path, [("swiotlb: one", "/* one */"), ("swiotlb: break", '#error "broken"'),
                                     (f"{FAULT} swiotlb: mend and fault", "")], remove={3: '#error "broken"'})
    code, record, _ = run_bisect(request(series, tmp_path / "results"), FakeRun())
    assert code == EXIT_KERNEL
    assert record.status is BisectStatus.NARROWED and record.first_bad is None
    assert [t.index for t in record.candidates] == [2, 3] and record.last_good is not None
    assert record.last_good.index == 1


@pytest.mark.parametrize("case", ["good end fails", "bad end passes", "bad end does not build"])
def test_ends_that_do_not_behave_are_bad_input_saying_which(tmp_path: Path, case: str) -> None:
    patches = [("swiotlb: one", "/* one */"), ("swiotlb: two", "/* two */")]
    if case == "bad end does not build":
        patches.append(("swiotlb: break", '#error "broken"'))
    elif case == "bad end passes":
        pass
    else:
        patches.append((f"{FAULT} swiotlb: three", "/* three */"))
    series = write_series(tmp_path, patches)
    fake = FakeRun({0: [EXIT_KERNEL]} if case == "good end fails" else None)
    code, record, _ = run_bisect(request(series, tmp_path / "results"), fake)
    assert code == EXIT_BAD_INPUT and record.status is BisectStatus.BAD_INPUT
    expected = {"good end fails": "the good end, base (no patches), does not pass",
                "bad end passes": "the bad end, patch 2/2 'swiotlb: two', passes",
                "bad end does not build": "the bad end, patch 3/3 'swiotlb: break', does not build"}[case]
    assert record.message.startswith(expected), record.message
    assert len(record.steps) == (1 if case == "good end fails" else 2)


# -- repeats, flaky steps, infrastructure ------------------------------------------


def four_patches(tmp_path: Path) -> Path:
    return write_series(tmp_path, [("swiotlb: one", "/* one */"), ("swiotlb: two", "/* two */"),
                                   (f"{FAULT} swiotlb: three", "/* three */"), ("swiotlb: four", "/* four */")])


@pytest.mark.parametrize("flaky_is, first_bad", [("bad", 2), ("good", 3)])
def test_a_flaky_step_is_reported_and_decided_as_asked(tmp_path: Path, flaky_is: str, first_bad: int) -> None:
    fake = FakeRun({2: [EXIT_OK, EXIT_KERNEL, EXIT_OK]})
    code, record, said = run_bisect(request(four_patches(tmp_path), tmp_path / "results", repeat=3,
                                            flaky_is=flaky_is), fake)
    assert code == EXIT_OK and record.first_bad is not None and record.first_bad.index == first_bad
    flaky = record.steps[2]
    assert len(flaky.runs) == 3 and flaky.decision == (
        f"flaky: failed 1 of 3 runs; --flaky-is {flaky_is}: taken as {flaky_is}")
    line = next(x for x in said if x.startswith("step 3/"))
    assert f"run 3x 0 s: FLAKY (1 of 3 failed, taken as {flaky_is}): FAIL test_dma_bounces_through_swiotlb" in line


def test_infrastructure_errors_are_retried_and_never_taken_as_bad(tmp_path: Path) -> None:
    fake = FakeRun({2: [EXIT_INFRA, EXIT_INFRA, EXIT_OK]})
    code, record, said = run_bisect(request(four_patches(tmp_path), tmp_path / "results"), fake)
    assert code == EXIT_OK and record.first_bad is not None and record.first_bad.index == 3
    assert [r.attempts for r in record.steps[2].runs] == [1, 2, 3] and record.steps[2].verdict is Verdict.GOOD
    assert sum("infrastructure error (exit 3: QEMU would not start), retry" in x for x in said) == 2


def test_infrastructure_that_never_recovers_ends_it_with_exit_3(tmp_path: Path) -> None:
    fake = FakeRun({2: [EXIT_INFRA] * 3})
    code, record, _ = run_bisect(request(four_patches(tmp_path), tmp_path / "results"), fake)
    assert code == EXIT_INFRA and record.status is BisectStatus.INFRA_ERROR
    assert record.steps[-1].abort == EXIT_INFRA and record.steps[-1].verdict is None
    assert "infrastructure error in 3 attempts: QEMU would not start" in record.message


def test_a_selection_of_no_tests_is_bad_input(tmp_path: Path) -> None:
    code, record, _ = run_bisect(request(four_patches(tmp_path), tmp_path / "results"),
                                 FakeRun({0: [EXIT_BAD_INPUT]}))
    assert code == EXIT_BAD_INPUT and "bad input: no guest tests selected" in record.message


def test_an_interrupt_leaves_bisect_json_incomplete_with_the_signal(tmp_path: Path) -> None:
    fake = FakeRun()

    def interrupted(artifact: Path, log: Path) -> RunOutcome:
        if len(fake.calls) == 2:
            raise KeyboardInterrupt
        return fake(artifact, log)

    code, record, _ = run_bisect(request(four_patches(tmp_path), tmp_path / "results"), interrupted)
    assert code == 130 and record.status is BisectStatus.INCOMPLETE
    assert record.interrupted_by == 2 and record.exit_code == 130
    assert record.steps[-1].abort == 130 and record.steps[-1].decision == "interrupted by signal 2"


# -- the command line ---------------------------------------------------------------


def test_usage_errors_are_exit_2_before_anything_runs(cli: Cli, tmp_path: Path) -> None:
    series = str(REPO / "tests" / "data" / "series" / "bisect-fault-at-3")
    for args, says in [((), "give SPEC.yaml or --source"),
                       (("--source", str(TREE)), "give a series"),
                       (("--source", str(TREE), "--good", "HEAD"), "needs both --good and --bad"),
                       (("--source", str(TREE), "--series", series, "--good", "a", "--bad", "b"), "not both"),
                       (("--source", str(TREE), "--series", series, "--profile", "snpp"), "unknown profile 'snpp'"),
                       (("--source", str(TREE), "--series", series, "--repeat", "0"), "--repeat >= 1"),
                       (("--source", str(tmp_path), "--good", "a", "--bad", "b"), "not a git repository")]:
        proc = cli("bisect", *args, "--results", str(cli.results))
        assert proc.returncode == 2, (args, proc.stderr)
        assert says in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
    assert not cli.results.exists() or not list(cli.results.iterdir())


def test_a_spec_names_the_kernel_and_may_carry_a_range(tmp_path: Path) -> None:
    spec = tmp_path / "range.yaml"
    spec.write_text("source: linux\nconfigs: [base]\ngood: v6.11\nbad: v6.12\n")
    req = spec_request(spec, BisectRequest(source="", configs=[], profile="snp", pytest_args=["-k", "x"]))
    assert (req.source, req.good, req.bad, req.series) == (str(tmp_path / "linux"), "v6.11", "v6.12", None)
    assert req.profile == "snp" and req.pytest_args == ["-k", "x"] and req.configs == ["base"]
    spec.write_text("source: linux\nbisect: yes\n")
    with pytest.raises(BadInput, match="unknown key 'bisect'"):
        spec_request(spec, req)


# -- git ranges: the history clone and git's verdict --------------------------------


def small_repository(where: Path) -> tuple[Path, list[str]]:
    """The fake tree as a repository of five commits: base, ok, #error, mend, ok."""
    repo = where / "linux"
    shutil.copytree(TREE, repo)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], check=True)
    source = repo / "kernel" / "dma" / "swiotlb.c"
    commits = []
    for subject, change in [("base", None), ("ok", "/* ok */"), ("break", '#error "broken"'),
                            ("mend", '#error "broken"'), ("after", "/* after */")]:
        if change is not None:
            text = source.read_text()
            source.write_text(text.replace(change + "\n", "") if subject == "mend" else text + change + "\n")
        subprocess.run([*git, "add", "-A"], check=True)
        subprocess.run([*git, "commit", "-qm", subject], check=True)
        commits.append(subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip())
    return repo, commits


def test_range_commits_build_incrementally_in_one_cached_clone(tmp_path: Path) -> None:
    repo, commits = small_repository(tmp_path)
    history = open_history(str(repo / "init"))  # any path inside the repository names it
    assert history.tree == open_history(str(repo)).tree and history.commit("HEAD~1") == commits[3]
    with history.bisecting():
        history.checkout(commits[1])
        first = build_checkout(history.tree, history.source(commits[1]), [SAMPLE_CONFIG], lambda _: None)
        history.checkout(commits[4])
        second = build_checkout(history.tree, history.source(commits[4]), [SAMPLE_CONFIG], lambda _: None)
        with pytest.raises(Exception, match="another bisect is using"), history.bisecting():
            pass
    assert not first.cached and not second.cached
    assert first.artifact != second.artifact and len(list(history.tree.parent.glob("out-*"))) == 1
    compiled = re.findall(r"^  CC\s+(\S+)$", (second.artifact / "build.log").read_text().split("### build:")[-1],
                          re.M)
    assert compiled == ["kernel/dma/swiotlb.o"]
    meta = json.loads((second.artifact / "harness-build.json").read_text())
    assert meta["source"]["identity"] == f"git:{commits[4]}" and meta["patches"] == []
    # The user's repository is only read.
    status = subprocess.run(["git", "-C", str(repo), "status", "--porcelain"], capture_output=True, text=True)
    assert status.stdout == "" and not (repo / ".git" / "BISECT_START").exists()


def test_git_bisect_run_skips_what_does_not_build_and_names_the_first_bad(tmp_path: Path) -> None:
    repo, commits = small_repository(tmp_path)
    # A script with git's conventions standing in for the harness step: 125 for a tree
    # that does not build, 1 for one with the "after" change.
    script = tmp_path / "step.sh"
    script.write_text("#!/bin/sh\ngrep -q '#error' kernel/dma/swiotlb.c && exit 125\n"
                      "grep -q after kernel/dma/swiotlb.c && exit 1\nexit 0\n")
    script.chmod(0o755)
    git = ["git", "-C", str(repo)]
    subprocess.run([*git, "bisect", "start", commits[4], commits[0]], check=True, capture_output=True)
    proc = subprocess.run([*git, "bisect", "run", str(script)], capture_output=True, text=True, timeout=60)
    subprocess.run([*git, "bisect", "reset"], check=True, capture_output=True)
    assert first_bad_of(proc.stdout.splitlines()) == (commits[4], [])
    assert SCRIPT_SKIP == 125
    # Only skipped commits between good and bad: git names the candidates.
    subprocess.run([*git, "bisect", "start", commits[3], commits[1]], check=True, capture_output=True)
    script.write_text("#!/bin/sh\ngrep -q '#error' kernel/dma/swiotlb.c && exit 125\nexit 1\n")
    proc = subprocess.run([*git, "bisect", "run", str(script)], capture_output=True, text=True, timeout=60)
    subprocess.run([*git, "bisect", "reset"], check=True, capture_output=True)
    first, candidates = first_bad_of(proc.stdout.splitlines())
    assert first is None and sorted(candidates) == sorted([commits[2], commits[3]]), proc.stdout


# -- harness nightly names the bisect for a new regression -----------------------------


def test_nightly_names_the_bisect_command_for_each_new_regression(tmp_path: Path) -> None:
    from harness.bisect import bisect_hints
    from harness.nightly import Entry

    spec = tmp_path / "my-series.yaml"
    spec.write_text(f"source: {TREE}\nseries: {FAKE / 'series' / 'sample'}\nconfigs: [{SAMPLE_CONFIG}]\n")
    plain = tmp_path / "no-series.yaml"
    plain.write_text(f"source: {TREE}\n")
    entries = [Entry("new", str(spec), "coco-emulated", "dma", ["-k", "test_dma"], 900, append="swiotlb=4096",
                     params={"smp": "2"}),
               Entry("old", str(spec), "emulated", "boot", ["-k", "boot", "-x"], 900),
               Entry("debian", "debian:linux-image-cloud-amd64", "emulated", "boot", [], 900),
               Entry("no-series", str(plain), "emulated", "boot", [], 900),
               Entry("passing", str(spec), "snp", "boot", [], 900)]

    earlier = tmp_path / "nightly-20261120-010000"
    earlier.mkdir()
    (earlier / "nightly.json").write_text(json.dumps({"outcomes": [
        {"entry": "old", "exit_code": 1}, {"entry": "new", "exit_code": 0}]}))
    night = tmp_path / "nightly-20261121-010000"
    night.mkdir()
    hints = bisect_hints(night, [e.name for e in entries if e.name != "passing"], entries)
    assert hints == ["new regressions, to bisect:",
                     f"  new: harness bisect {spec} --profile coco-emulated --append swiotlb=4096 --param smp=2 "
                     "-k test_dma"]
    # With no earlier night, every failure is new.
    shutil.rmtree(earlier)
    assert hints[1:] + [f"  old: harness bisect {spec} --profile emulated -- -k boot -x"] == bisect_hints(
        night, ["new", "old", "new"], entries)[1:]
