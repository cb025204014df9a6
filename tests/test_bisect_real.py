"""`harness bisect` on Debian's real linux-source-6.12, booted under TCG.

The series (tests/data/series/bisect-*) touch only kernel/dma/swiotlb.c, so
every step after the first is an incremental build: a runtime fault in the
CoCo DMA path that only a guest test sees (test_dma_bounces_through_swiotlb
under coco-emulated) is bisected to its patch, with and without a build break
in the middle; ends that do not behave are exit 2; a signal leaves bisect.json
incomplete and nothing running. A git range is bisected by `git bisect run` in
a small repository made here from the same source tree: the tarball's commit
plus the build-break series as five commits. Its cached clone keeps its O=
directory, so only the first run on a machine builds a kernel from cold.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from harness.build import BuildSpec, build, load_series, resolve_source
from harness.paths import cache_dir
from harness.rundir import is_run_dir, read_run
from tests.conftest import REPO, Cli

TARBALL = Path("/usr/src/linux-source-6.12.tar.xz")
SERIES = REPO / "tests" / "data" / "series"
FAULT_AT_3 = SERIES / "bisect-fault-at-3"
BUILD_BREAK = SERIES / "bisect-build-break"
DMA_TEST = "test_dma_bounces_through_swiotlb"
SELECTION = ("--profile", "coco-emulated", "-k", DMA_TEST)
FAULT = "swiotlb: skip the high-water update for single-slot mappings"
FAULT_PATCH = FAULT_AT_3 / "0003-swiotlb-skip-the-high-water-update-for-single-slot-m.patch"
needs_source = pytest.mark.skipif(not TARBALL.exists(), reason=f"{TARBALL} missing: bin/setup installs it")


def bisect_json(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def series_bisect(cli: Cli, series: Path, *args: str, timeout: float = 5400) -> subprocess.CompletedProcess[str]:
    return cli("bisect", "--source", str(TARBALL), "--series", str(series), "--config", "base", *args,
               "--results", str(cli.results), "--json", timeout=timeout)


def step_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("step ")]


@needs_source
def test_a_runtime_fault_only_a_guest_test_sees_is_bisected_to_patch_3(cli: Cli) -> None:
    proc = series_bisect(cli, FAULT_AT_3, *SELECTION)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = bisect_json(proc)
    assert data["status"] == "found" and data["exit_code"] == 0
    assert [s["target"]["index"] for s in data["steps"]] == [0, 4, 2, 3]
    assert [s["verdict"] for s in data["steps"]] == ["good", "bad", "good", "bad"]
    first = data["first_bad"]
    assert (first["index"], first["subject"]) == (3, FAULT)
    assert first["file"] == str(FAULT_PATCH)
    assert data["last_good"]["index"] == 2
    (failure,) = data["failing_tests"]
    assert failure["test"].endswith(f"::{DMA_TEST}") and "DMA did not go through the swiotlb pool" in failure["message"]
    lines = step_lines(proc.stderr)
    assert lines[0].startswith("step 1/~4: base (no patches): build ") and lines[0].endswith(": PASS")
    assert lines[3].startswith(f"step 4/~4: patch 3/4 {FAULT!r}: build ")
    assert lines[3].endswith(f": FAIL {DMA_TEST}") and ", run " in lines[3]
    # Every run is a normal run directory in the bisect's; the first bad step's reproduces.
    out = Path(data["steps"][0]["runs"][0]["run_dir"]).parent
    assert out.name.startswith("bisect-") and json.loads((out / "bisect.json").read_text()) == data
    for step in data["steps"]:
        (run,) = step["runs"]
        assert is_run_dir(Path(run["run_dir"])) and read_run(Path(run["run_dir"])).exit_code == run["exit_code"]
    bad_run = data["steps"][3]["runs"][0]["run_dir"]
    assert data["reproduce"] == f"harness reproduce {bad_run}"
    again = cli("reproduce", bad_run, timeout=900)
    assert again.returncode == 1 and "DMA did not go through the swiotlb pool" in again.stdout, again.stdout[-2000:]


@needs_source
def test_a_build_break_in_the_middle_is_skipped_and_the_culprit_still_found(cli: Cli) -> None:
    proc = series_bisect(cli, BUILD_BREAK, *SELECTION)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = bisect_json(proc)
    assert [s["target"]["index"] for s in data["steps"]] == [0, 5, 2, 3, 4]
    broken = data["steps"][2]
    assert broken["verdict"] == "skip" and broken["runs"] == [] and broken["build"]["status"] == "failed"
    assert any("nr_debugfs_pools" in e and "undeclared" in e for e in broken["build"]["errors"])
    assert Path(broken["build"]["log"]).is_file()
    assert (data["first_bad"]["index"], data["first_bad"]["subject"]) == (4, FAULT)
    assert data["first_bad"]["file"] == str(FAULT_PATCH)   # named through "../" by the series file
    assert data["last_good"]["index"] == 3
    line = step_lines(proc.stderr)[2]
    assert line.startswith("step 3/~5: patch 2/5 'swiotlb: count the pools that get debugfs files': build FAILED in ")
    assert line.endswith(": skipped (does not build)")


@needs_source
def test_ends_that_do_not_behave_are_exit_2_saying_which(cli: Cli) -> None:
    # A base that does not boot (init exits at once: the kernel panics).
    proc = series_bisect(cli, FAULT_AT_3, *SELECTION, "--append", "rdinit=/bin/false")
    assert proc.returncode == 2, proc.stderr[-3000:]
    data = bisect_json(proc)
    assert data["status"] == "bad-input" and len(data["steps"]) == 1
    # The guest boots in the test's set-up: the panic is the selected test's failure.
    assert data["message"].startswith("the good end, base (no patches), does not pass (failed 1 of 1 run(s)): "
                                      f"FAIL test_coco.py::{DMA_TEST} (harness.errors.BootFailure: kernel panic"
                                      ), data["message"]
    assert "Attempted to kill init" in data["message"]
    # Without swiotlb=force the DMA test has nothing to judge: the whole series passes.
    proc = series_bisect(cli, FAULT_AT_3, "--profile", "emulated", "-k", DMA_TEST)
    assert proc.returncode == 2, proc.stderr[-3000:]
    data = bisect_json(proc)
    assert [s["verdict"] for s in data["steps"]] == ["good", "good"]
    assert data["message"].startswith(f"the bad end, patch 4/4 {'swiotlb: say what the high-water counters count'!r}"
                                      ", passes (passed 1 of 1 run(s))"), data["message"]


@needs_source
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_leaves_bisect_json_incomplete_and_nothing_running(cli: Cli, signum: int) -> None:
    """Stopped while a step's guest boots: the run is marked interrupted, its QEMU stopped,
    and the cli fixture finds no QEMU and nothing left in TMPDIR."""
    data, err = signal_once_booting(cli, signum, 1, "--source", str(TARBALL), "--series", str(FAULT_AT_3))
    # The signal came while the first step's guest booted: its run says so.
    (console,) = cli.results.glob("bisect-*/*/console.log")
    assert data["steps"][-1]["step"] == 1 and read_run(console.parent).status == "interrupted"
    assert f"harness bisect: interrupted by signal {signum}" in err


def signal_once_booting(cli: Cli, signum: int, boots: int, *args: str) -> tuple[dict[str, Any], str]:
    """`harness bisect ARGS` signalled once its `boots`-th guest is booting: it exits 128+N, its
    bisect.json is incomplete with the signal and the step it stopped. Returns bisect.json and stderr."""
    argv = cli.argv("bisect", *args, "--config", "base", *SELECTION, "--results", str(cli.results))
    proc = subprocess.Popen(argv, env=cli.env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 1800
    while len(list(cli.results.glob("bisect-*/*/console.log"))) < boots:
        assert time.monotonic() < deadline and proc.poll() is None, "the step never booted"
        time.sleep(0.1)
    os.kill(proc.pid, signum)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, err[-2000:]
    assert "Traceback" not in err
    (bisect_dir,) = cli.results.glob("bisect-*")
    data: dict[str, Any] = json.loads((bisect_dir / "bisect.json").read_text())
    assert data["status"] == "incomplete" and data["interrupted_by"] == signum
    assert data["exit_code"] == 128 + signum and data["steps"][-1]["abort"] == 128 + signum
    assert out == ""
    return data, err


# -- a git range -------------------------------------------------------------------


def _git(repo: Path, *args: str, env: dict[str, str] | None = None, data: bytes | None = None) -> str:
    proc = subprocess.run(["git", "-C", str(repo), *args], env=env, input=data, capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr.decode()[-1000:]
    return proc.stdout.decode().strip()


def small_linux_repository() -> tuple[Path, list[str]]:
    """A repository whose history is the 6.12 source tree and five commits on it, one
    patch of bisect-build-break each (the second does not compile; the fourth is the
    fault). Made once per machine from the cached import of the tarball (its objects
    are borrowed), with fixed dates, so the same commits and the same cached clone
    are found again; only the small new objects are written."""
    imported = next((p.parent.parent for p in cache_dir().glob("src/*/src/.git/harness-imported")
                     if p.read_text().strip() == resolve_source(str(TARBALL)).identity), None)
    if imported is None:
        build(BuildSpec(str(TARBALL), None, ["base"]))   # imports the tarball (and is the base's step later)
        return small_linux_repository()
    repo = cache_dir() / "test-repositories" / "bisect-linux-6.12"
    patches = load_series(str(BUILD_BREAK), repo.parent)
    env = dict(os.environ, GIT_AUTHOR_NAME="CoCo-Harness", GIT_AUTHOR_EMAIL="harness@localhost",
               GIT_COMMITTER_NAME="CoCo-Harness", GIT_COMMITTER_EMAIL="harness@localhost",
               GIT_AUTHOR_DATE="2026-11-21T12:00:00Z", GIT_COMMITTER_DATE="2026-11-21T12:00:00Z")
    repo.mkdir(parents=True, exist_ok=True)
    if not (repo / ".git").is_dir():
        _git(repo, "init", "-q")
        (repo / ".git" / "objects" / "info" / "alternates").write_text(f"{imported / '.git' / 'objects'}\n")
    commits = [_git(repo, "commit-tree", _git(imported, "rev-parse", "base^{tree}"), "-m",
                    "Linux 6.12.117 (Debian's linux-source-6.12)", env=env)]
    with tempfile.TemporaryDirectory() as tmp:
        index = dict(env, GIT_INDEX_FILE=str(Path(tmp) / "index"))
        for patch in patches:
            _git(repo, "read-tree", commits[-1], env=index)
            _git(repo, "apply", "--cached", "-", env=index, data=patch.data)
            commits.append(_git(repo, "commit-tree", _git(repo, "write-tree", env=index), "-p", commits[-1],
                                "-m", patch.subject, env=env))
    _git(repo, "update-ref", "refs/heads/master", commits[-1])
    return repo, commits


@needs_source
def test_a_git_range_is_bisected_by_git_to_the_bad_commit(cli: Cli) -> None:
    repo, commits = small_linux_repository()
    proc = cli("bisect", "--source", str(repo), "--good", commits[0], "--bad", "master", "--config", "base",
               *SELECTION, "--results", str(cli.results), "--json", timeout=3 * 3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = bisect_json(proc)
    assert data["kind"] == "git" and data["status"] == "found"
    assert data["first_bad"] == {"subject": FAULT, "commit": commits[4], "index": None, "total": None, "file": None}
    assert data["last_good"]["commit"] == commits[3]
    steps = {s["target"]["commit"]: s for s in data["steps"]}
    assert [s["target"]["commit"] for s in data["steps"][:2]] == [commits[0], commits[5]]
    assert steps[commits[4]]["verdict"] == "bad" and steps[commits[3]]["verdict"] == "good"
    if commits[2] in steps:   # git tried the commit that does not build: skipped, 125
        assert steps[commits[2]]["verdict"] == "skip"
    (bisect_dir,) = cli.results.glob("bisect-*")
    log = (bisect_dir / "git-bisect.log").read_text()
    assert f"# first bad commit: [{commits[4]}]" in log
    # Each commit after the first of a machine is an incremental build in one cached clone.
    built = [s for s in data["steps"][1:] if s["build"]["status"] == "built"]
    assert all(s["build"]["seconds"] < 900 for s in built), [s["build"]["seconds"] for s in built]
    lines = step_lines(proc.stderr)
    assert lines[-1].startswith(f"step {len(data['steps'])}/~") and f"commit {commits[4][:12]} {FAULT!r}" in "".join(
        lines)
    # The good end failing is bad input, as for a series.
    proc = cli("bisect", "--source", str(repo), "--good", commits[4], "--bad", "master", "--config", "base",
               *SELECTION, "--results", str(cli.results), "--json", timeout=3600)
    assert proc.returncode == 2 and bisect_json(proc)["message"].startswith(
        f"the good end, commit {commits[4][:12]} {FAULT!r}, does not pass"), proc.stdout[-2000:]


@needs_source
def test_a_signal_during_git_bisect_run_stops_the_step_and_leaves_the_clone_usable(cli: Cli) -> None:
    """SIGTERM while the third guest boots: that is a step of `git bisect run`'s script. git and
    the script are stopped, the script's run is marked interrupted, and the clone is out of
    bisect mode (the next bisect starts clean); the cli fixture finds no QEMU and a clean TMPDIR."""
    repo, commits = small_linux_repository()
    data, _ = signal_once_booting(cli, signal.SIGTERM, 3, "--source", str(repo), "--good", commits[0],
                                  "--bad", commits[5])
    assert len(data["steps"]) >= 3 and data["steps"][-1]["decision"] == "interrupted by signal 15"
    consoles = sorted(cli.results.glob("bisect-*/*/console.log"))
    assert read_run(consoles[-1].parent).status == "interrupted"
    clone = next(p for p in cache_dir().glob("history/*/src") if (p / ".git" / "harness-history").read_text().strip()
                 == str((repo / ".git").resolve()))
    assert not (clone / ".git" / "BISECT_START").exists()
