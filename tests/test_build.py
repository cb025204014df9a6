"""`harness build` on Debian's real linux-source-6.12: the sample series built,
booted and found in the running kernel, the cache, a series whose second patch
breaks the build (gcc's own errors), and options that the real Kconfig drops.
The build logic on its own (cache, per-patch, dropped options, patches that do
not apply, sources, specs) is tested in seconds on a fake tree: test_build_fake.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from junitparser import JUnitXml

from harness.build import load_series
from harness.paths import SAMPLE_KERNEL
from tests.conftest import REPO, Cli, meta
from tests.test_build_fake import cached_trees_are_clean, report_rows

TARBALL = Path("/usr/src/linux-source-6.12.tar.xz")
SERIES = REPO / "tests" / "data" / "series"
needs_source = pytest.mark.skipif(not TARBALL.exists(), reason=f"{TARBALL} missing: bin/setup installs it")


@needs_source
def test_sample_series_builds_boots_and_is_in_the_running_kernel(cli: Cli) -> None:
    proc = cli("run", "--kernel", str(SAMPLE_KERNEL), "--results", str(cli.results), "-k", "series or test_boot",
               timeout=3000)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = cli.only_run()
    m = meta(run_dir)
    assert m["series"] == [p.subject for p in load_series(str(REPO / "kernels" / "coco-sample"), run_dir)]
    cases = {c.name: c for suite in JUnitXml.fromfile(str(run_dir / "junit.xml")) for c in suite}
    assert cases["test_sample_series_boot_message"].is_passed
    assert cases["test_sample_series_debugfs_attribute"].is_passed
    # Identical inputs again: a cache hit, no make.
    again = cli("build", str(SAMPLE_KERNEL), "--json", timeout=600)
    assert again.returncode == 0, again.stderr
    result = json.loads(again.stdout)[0]
    assert result["cached"] is True and result["release"] == m["kernel"]["release"]
    # The artifact directory is a kernel too.
    proc = cli("run", "--kernel", result["artifact"], "--results", str(cli.results), "-k", "release")
    assert proc.returncode == 0, proc.stdout[-2000:]


@needs_source
def test_per_patch_names_the_patch_that_breaks_the_build(cli: Cli) -> None:
    proc = cli("build", "--source", str(TARBALL), "--series", str(SERIES / "breaks-at-2"), "--config", "base",
               "--per-patch", timeout=3000)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "patch 2 ('swiotlb: report a pool size that does not exist') breaks the build" in proc.stderr
    assert "undeclared_pool_size" in proc.stderr
    report = report_rows(proc.stderr)
    assert report[0].split()[:3] == ["patch", "0", "ok"] and report[1].split()[:3] == ["patch", "1", "ok"]
    assert report[2].split()[:3] == ["patch", "2", "FAILED"]
    cached_trees_are_clean()


@needs_source
def test_dropped_options_are_named_with_requested_and_actual(cli: Cli) -> None:
    frag = str(REPO / "tests" / "data" / "kconfigs" / "dropped.config")
    proc = cli("build", "--source", str(TARBALL), "--config", "base", "--config", frag, timeout=3000)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "CONFIG_SEV_GUEST: requested y, got not set (probably an unmet dependency)" in proc.stderr
    assert "CONFIG_HARNESS_NO_SUCH_OPTION: requested y, got not set (no such option" in proc.stderr
