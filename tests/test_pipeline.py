"""nightly/gitlab-ci.example.yml run as it is by gitlab-ci-local (npm registry,
installed into tools/ by bin/setup --tests): its shell executor with --shell-isolation
gives every job its own copy of the project and passes artifacts between jobs
the way GitLab does, so the report job merges shard trees that came from other
job directories. The matrix is tiny: one Debian kernel, `emulated` and `snp`
(which falls back to coco-emulated here), one shard each."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from kcidb_io.schema import LATEST

from harness.nightly import Outcome, merge_nights, write_report
from harness.paths import REPO
from harness.results import TestRecord, write_records
from tests.conftest import Cli, write_meta_json
from tests.test_kcidb import junit_verdicts

GITLAB_CI_LOCAL = REPO / "tools" / "node_modules" / ".bin" / "gitlab-ci-local"
PIPELINE = "nightly/gitlab-ci.example.yml"
MATRIX = {
    "kernels": ["debian:linux-image-6.1.0-56-cloud-amd64"],
    "profiles": ["emulated", "snp"],
    "suites": {"boot": ["-k", "test_reached_userspace or test_memory_encryption_banner or test_swiotlb_pool"]},
    "timeout": 300,
    "retries": 0,
}


def project_copy(where: Path) -> Path:
    """The repository's files as git sees them (tracked and new, not ignored) in a fresh
    git repository: gitlab-ci-local builds each job's directory from git's view."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, text=True, check=True, timeout=60).stdout
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():
            (where / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, where / name)
    git = ["git", "-C", str(where), "-c", "user.name=t", "-c", "user.email=t@localhost", "-c", "commit.gpgsign=false"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "pipeline test"]):
        subprocess.run([*git, *args], check=True, timeout=120, capture_output=True)
    return where


def gitlab_ci_local(project: Path, *args: str, env: dict[str, str] | None = None,
                    timeout: float = 60) -> subprocess.CompletedProcess[str]:
    assert GITLAB_CI_LOCAL.is_file(), f"{GITLAB_CI_LOCAL} missing: bin/setup --tests installs it (npm ci in tools/)"
    return subprocess.run([str(GITLAB_CI_LOCAL), "--file", PIPELINE, "--no-color", *args], cwd=project,
                          env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_the_pipeline_has_two_shards_and_a_report(tmp_path: Path) -> None:
    """GitLab's own schema (gitlab-ci-local checks it) and the jobs it makes of the file."""
    proc = gitlab_ci_local(project_copy(tmp_path), "--list-json")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    jobs = {j["name"]: j for j in json.loads(proc.stdout)}
    assert set(jobs) == {"night: [1/2]", "night: [2/2]", "report"}
    assert jobs["report"]["when"] == "always" and jobs["report"]["stage"] == "report"


def test_the_sharded_night_runs_for_real(cli: Cli, tmp_path: Path) -> None:
    project = project_copy(tmp_path / "project")
    matrix = tmp_path / "matrix.yaml"
    matrix.write_text(json.dumps(MATRIX))
    # The harness of the venv these tests run in, from each job's own copy of the project.
    proc = gitlab_ci_local(project, "--shell-isolation", "--variable", f"HARNESS={sys.executable} -m harness",
                           "--variable", f"NIGHTLY_MATRIX={matrix}", "--variable", "KCIDB_ORIGIN=pipeline_test",
                           env=cli.env(), timeout=1200)
    log = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, log
    for job in ("night: [1/2]", "night: [2/2]", "report"):
        assert f"PASS  {job}" in proc.stdout, log

    # Each shard ran its half in its own job directory and handed its tree over as an artifact.
    state = project / ".gitlab-ci-local"
    shard_junits = sorted(state.glob("artifacts/night*/shards/nightly-*-shard*of2/junit.xml"))
    assert len(shard_junits) == 2, log
    assert not list(state.glob("artifacts/night*/shards/exit-*")), "a shard's night failed"
    report = state / "builds" / "report"
    night = report / "night"
    merged = json.loads((night / "nightly.json").read_text())
    assert sorted(o["profile"] for o in merged["outcomes"]) == ["emulated", "snp"]
    # The merge read the trees the report job received, not the shard jobs' own directories.
    assert all(Path(o["run_dir"]).is_relative_to(report / "shards") for o in merged["outcomes"])

    # The merged JUnit is the shards' JUnit, case for case.
    shards: dict[tuple[str, str, str], str] = {}
    for junit in shard_junits:
        entry = json.loads((junit.parent / "nightly.json").read_text())["outcomes"][0]["entry"]
        shards.update({(f"{entry}#1", c, n): v for (_, c, n), v in junit_verdicts(junit, night=True).items()})
    combined = junit_verdicts(night / "junit.xml", night=True)
    assert combined == shards and len(combined) == 6
    assert sorted(combined.values()) == ["PASS", "PASS", "PASS", "SKIP", "SKIP", "SKIP"]
    summary = (night / "summary.txt").read_text()
    assert summary.count("PASSED") == 2 and summary.rstrip().endswith("2 passed, 0 failed, 0 infra-error, 0 bad-input")
    # The artifacts came back to the project (GitLab's download of the report job's artifacts).
    assert (project / "night" / "junit.xml").read_text() == (night / "junit.xml").read_text()

    # KCIDB for the whole night, one test per JUnit case, the fallback stated.
    doc = json.loads((night / "kcidb.json").read_text())
    LATEST.validate_exactly(doc)
    assert {(f"{t['misc']['nightly_entry']}#{t['misc']['repeat']}", t["misc"]["junit"]["classname"],
             t["misc"]["junit"]["name"]): t["status"] for t in doc["tests"]} == combined
    snp = [t for t in doc["tests"] if t["environment"]["misc"]["requested_profile"] == "snp"]
    assert len(snp) == 3 and all(t["environment"]["comment"].startswith("snp -> coco-emulated") for t in snp)
    assert all(t["id"].startswith("pipeline_test:") for t in doc["tests"])


def test_merge_reads_shard_trees_where_they_are_now(tmp_path: Path) -> None:
    """A shard tree moved (a CI artifact on another machine): the merge finds its runs there."""
    shard = tmp_path / "runner" / "nightly-1-shard1of1"
    run = shard / "entry-a" / "20261101-000000-emulated-6.1-abcd"
    run.mkdir(parents=True)
    write_meta_json(run, {"run_id": run.name, "status": "failed"})
    write_records(run, [TestRecord("test_boot.py::test_x", "passed"), TestRecord("test_boot.py::test_y", "failed")])
    write_report(shard, [Outcome("entry-a", "k", "emulated", "boot", 1, 1, "failed", 1, str(run), 1.0)], {})
    moved = tmp_path / "report-job" / "shards" / shard.name
    moved.parent.mkdir(parents=True)
    shard.rename(moved)
    assert merge_nights([moved], tmp_path / "night") == 1
    (outcome,) = json.loads((tmp_path / "night" / "nightly.json").read_text())["outcomes"]
    assert outcome["run_dir"] == str(moved / "entry-a" / run.name)
    assert junit_verdicts(tmp_path / "night" / "junit.xml", night=True) == {
        ("entry-a#1", "test_boot", "test_x"): "PASS", ("entry-a#1", "test_boot", "test_y"): "FAIL"}
