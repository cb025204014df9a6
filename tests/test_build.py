"""`harness build` on Debian's real linux-source-6.12: the sample series, a series
whose second patch breaks the build, a patch that does not apply, options that
olddefconfig drops, the cache, and the built kernel booted with its series."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from junitparser import JUnitXml

from harness.build import load_fragment, load_series, load_spec, parse_fragment
from harness.errors import BadInput
from harness.paths import SAMPLE_KERNEL, cache_dir
from tests.conftest import REPO, Cli, meta

TARBALL = Path("/usr/src/linux-source-6.12.tar.xz")
SERIES = REPO / "tests" / "data" / "series"
needs_source = pytest.mark.skipif(not TARBALL.exists(), reason=f"{TARBALL} missing: bin/setup installs it")


def test_series_directory_follows_its_series_file(tmp_path: Path) -> None:
    patches = load_series(str(REPO / "kernels" / "coco-sample"), tmp_path)
    assert [p.subject for p in patches] == [
        "swiotlb: announce the CoCo harness sample series at boot",
        "swiotlb: add a read-only harness_series attribute to debugfs",
        "swiotlb: report the pool size in harness_series",
    ]
    (tmp_path / "s").mkdir()
    for p in sorted((REPO / "kernels" / "coco-sample").glob("*.patch")):
        (tmp_path / "s" / p.name).write_bytes(p.read_bytes())
    (tmp_path / "s" / "series").write_text("# reversed\n0003-swiotlb-report-the-pool-size-in-harness_series.patch\n")
    assert [p.subject for p in load_series(str(tmp_path / "s"), tmp_path)] == [
        "swiotlb: report the pool size in harness_series"]
    (tmp_path / "s" / "series").write_text("0009-missing.patch\n")
    with pytest.raises(BadInput, match="lists 0009-missing.patch"):
        load_series(str(tmp_path / "s"), tmp_path)


def test_mbox_is_split_into_its_patches(tmp_path: Path) -> None:
    mbox = tmp_path / "series.mbox"
    mbox.write_bytes(b"".join(p.read_bytes() for p in sorted((REPO / "kernels" / "coco-sample").glob("*.patch"))))
    patches = load_series(str(mbox), tmp_path / "w")
    assert len(patches) == 3 and patches[1].subject.startswith("swiotlb: add a read-only")


def test_series_bad_input(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="no such file"):
        load_series(str(tmp_path / "nope"), tmp_path)
    with pytest.raises(BadInput, match="b4 is not installed|b4 could not fetch"):
        load_series("20261121.12345-1-dev@example.org", tmp_path)


def test_fragments_parse_and_name_their_base() -> None:
    text = "# harness-base: defconfig\n# why\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=\"x\"\n"
    base, options = parse_fragment(text)
    assert base == "defconfig" and options == {"CONFIG_A": "y", "CONFIG_B": "n", "CONFIG_C": '"x"'}
    for name in ("base", "coco-guest", "debug", "dma-bench"):
        frag = load_fragment(name)
        # every option carries a comment line saying why it is there
        lines = frag.text.splitlines()
        for i, line in enumerate(lines):
            if line.startswith("CONFIG_"):
                assert any(x.startswith("#") for x in lines[max(0, i - 6):i]), (name, line)
    with pytest.raises(BadInput, match="not a file and not in kconfigs/"):
        load_fragment("no-such-fragment")


def test_build_spec_errors(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("series: x\n")
    with pytest.raises(BadInput, match="needs a 'source' key"):
        load_spec(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("source: x\nconfig: [base]\n")
    with pytest.raises(BadInput, match="unknown key 'config'"):
        load_spec(tmp_path / "b.yaml")


def test_missing_toolchain_is_infrastructure(cli: Cli, tmp_path: Path) -> None:
    env = cli.env()
    env["PATH"] = str(tmp_path)  # no gcc, make, flex... on this PATH
    proc = subprocess.run(cli.argv("build", "--source", str(TARBALL)), env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert "kernel build toolchain incomplete: missing gcc, make" in proc.stderr


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


def _cached_tree_is_clean() -> None:
    for tree in (cache_dir() / "src").glob("*/src"):
        status = subprocess.run(["git", "-C", str(tree), "status", "--porcelain"], capture_output=True, text=True)
        assert status.stdout == "", f"{tree} left dirty: {status.stdout[:200]}"


@needs_source
def test_per_patch_names_the_patch_that_breaks_the_build(cli: Cli) -> None:
    proc = cli("build", "--source", str(TARBALL), "--series", str(SERIES / "breaks-at-2"), "--config", "base",
               "--per-patch", timeout=3000)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "patch 2 ('swiotlb: report a pool size that does not exist') breaks the build" in proc.stderr
    assert "undeclared_pool_size" in proc.stderr
    report = [line for line in proc.stderr.splitlines() if re.match(r"patch\s+\d+\s+(ok|FAILED)\s", line)]
    assert report[0].split()[:3] == ["patch", "0", "ok"] and report[1].split()[:3] == ["patch", "1", "ok"]
    assert report[2].split()[:3] == ["patch", "2", "FAILED"]
    _cached_tree_is_clean()


@needs_source
def test_patch_that_does_not_apply_is_bad_input_and_leaves_the_tree_clean(cli: Cli) -> None:
    proc = cli("build", "--source", str(TARBALL), "--series", str(SERIES / "does-not-apply"), "--config", "base",
               timeout=3000)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert "patch 1" in line and "0001-swiotlb-tweak-a-line-that-is-not-there.patch" in line
    assert "'swiotlb: tweak a line that is not there'" in line and "kernel/dma/swiotlb.c" in line
    _cached_tree_is_clean()


@needs_source
def test_dropped_options_are_named_with_requested_and_actual(cli: Cli) -> None:
    frag = str(REPO / "tests" / "data" / "kconfigs" / "dropped.config")
    proc = cli("build", "--source", str(TARBALL), "--config", "base", "--config", frag, timeout=3000)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "CONFIG_SEV_GUEST: requested y, got not set (probably an unmet dependency)" in proc.stderr
    assert "CONFIG_HARNESS_NO_SUCH_OPTION: requested y, got not set (no such option" in proc.stderr
