"""A test kernel must be able to fail: what a kernel can report, and a real WARN
turning exactly one guest test red.

The kernels are real: the sample build from the shipped `base` fragment, the
same with a series that warns on a path one guest test reads, and Debian's
cloud kernel. The one stand-in is a configuration file placed beside a copy of
a real image to play a kernel built without CONFIG_BUG (Debian ships none, and
building one costs a full kernel build); the harness reads the configuration,
not the image, for that verdict, so the stand-in shows what a user would see.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from harness.build import read_config
from harness.diagnostics import diagnose, diagnose_image, embedded_config
from harness.kernel import Kernel, resolve_kernel
from harness.paths import KCONFIGS_DIR, SAMPLE_KERNEL
from harness.results import TestRecord
from tests.conftest import REPO, Cli, meta

TARBALL = Path("/usr/src/linux-source-6.12.tar.xz")
needs_source = pytest.mark.skipif(not TARBALL.exists(), reason=f"{TARBALL} missing: bin/setup installs it")
WARN_SERIES = REPO / "tests" / "data" / "series" / "warn-on-read"
WARNED_TEST = "test_sample_series_debugfs_attribute"

# What tinyconfig plus the `base` fragment gave before BUG and KALLSYMS were asked for.
BUG_OFF = "CONFIG_PRINTK=y\n# CONFIG_BUG is not set\n# CONFIG_KALLSYMS is not set\nCONFIG_TTY=y\n"


def test_a_config_without_bug_cannot_report_and_says_why() -> None:
    diag = diagnose(BUG_OFF, "test")
    assert diag.problems() == ["this kernel cannot report WARN/BUG: CONFIG_BUG is off"]
    assert "NOT WARN/BUG" in diag.summary()
    quiet = diagnose("# CONFIG_PRINTK is not set\nCONFIG_BUG=y\n", "test")
    assert quiet.problems() == ["this kernel cannot report anything: CONFIG_PRINTK is off"]
    no_names = diagnose("CONFIG_PRINTK=y\nCONFIG_BUG=y\n", "test")
    assert no_names.problems() == [] and "CONFIG_KALLSYMS is off" in no_names.notes()[0]
    debug = diagnose("CONFIG_PRINTK=y\nCONFIG_BUG=y\nCONFIG_KALLSYMS=y\nCONFIG_KFENCE=y\nCONFIG_KASAN=m\n", "t")
    assert debug.features["kfence"] and debug.features["kasan"] and not debug.features["lockdep"]
    assert debug.problems() == [] and debug.notes() == []


def test_the_base_fragment_asks_for_what_a_failing_kernel_needs() -> None:
    options = read_config((KCONFIGS_DIR / "base.config").read_text())
    for option in ("CONFIG_PRINTK", "CONFIG_BUG", "CONFIG_KALLSYMS", "CONFIG_DEBUG_BUGVERBOSE", "CONFIG_IKCONFIG"):
        assert options.get(option) == "y", option


def test_debian_kernel_config_is_found_beside_its_image(debian_kernel: Kernel) -> None:
    diag = diagnose_image(debian_kernel.image, debian_kernel.release)
    assert diag.source is not None and diag.source.endswith(f"config-{debian_kernel.release}")
    assert diag.features["warn_bug"] and diag.features["kallsyms"] and diag.problems() == []


@needs_source
def test_sample_build_reports_warnings_and_carries_its_config(tmp_path: Path) -> None:
    kernel = resolve_kernel(str(SAMPLE_KERNEL))
    diag = diagnose_image(kernel.image, kernel.release)
    assert diag.source == str(kernel.image.parent / "config")
    assert diag.features["warn_bug"] and diag.features["kallsyms"] and diag.features["bug_verbose"]
    # A bzImage copied away from its artifact still tells, from CONFIG_IKCONFIG.
    shutil.copy2(kernel.image, tmp_path / "bzImage")
    embedded = embedded_config(tmp_path / "bzImage")
    assert embedded is not None and read_config(embedded) == read_config((kernel.image.parent / "config").read_text())
    assert diagnose_image(tmp_path / "bzImage").source == f"embedded in {tmp_path / 'bzImage'} (CONFIG_IKCONFIG)"


def test_a_kernel_that_cannot_warn_is_named_and_refused_under_strict(cli: Cli, debian_kernel: Kernel) -> None:
    folder = cli.tmp.parent / "kernel"
    folder.mkdir()
    shutil.copy2(debian_kernel.image, folder / "bzImage")
    (folder / "config").write_text(BUG_OFF)
    proc = cli("run", "--kernel", str(folder / "bzImage"), "--results", str(cli.results), "-k", "userspace")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = "WARNING: this kernel cannot report WARN/BUG: CONFIG_BUG is off"
    assert line in proc.stdout
    # in the summary at the end too, after the test table
    assert proc.stdout.rindex(line) > proc.stdout.index("PASSED")
    diag = meta(cli.only_run())["kernel"]["diagnostics"]
    assert diag["problems"] == ["this kernel cannot report WARN/BUG: CONFIG_BUG is off"]
    assert diag["source"] == str(folder / "config")
    strict = cli("run", "--kernel", str(folder / "bzImage"), "--results", str(cli.results), "--strict",
                 "-k", "userspace")
    assert strict.returncode == 2, strict.stderr
    assert strict.stderr.strip().splitlines()[-1] == (
        f"harness: kernel {folder / 'bzImage'}: this kernel cannot report WARN/BUG: CONFIG_BUG is off (--strict)")
    assert len(cli.run_dirs()) == 1, "a refused run leaves no run directory"


@needs_source
def test_a_warning_fails_the_test_that_hits_it_and_only_that_test(cli: Cli, tmp_path: Path) -> None:
    spec = tmp_path / "warn.yaml"
    spec.write_text(f"source: {TARBALL}\nseries: {WARN_SERIES}\nconfigs: [base]\n")
    proc = cli("run", "--kernel", str(spec), "--results", str(cli.results), "-k", "series or userspace or release",
               timeout=3000)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = cli.only_run()
    records = {r["nodeid"].split("::")[-1]: TestRecord(**r) for r in json.loads((run_dir / "tests.json").read_text())}
    warned = records.pop(WARNED_TEST)
    assert warned.status == "failed", warned
    ids = warned.properties["dmesg_error_ids"]
    warning_ids = [i for i in ids if i.startswith("warning-")]
    assert len(warning_ids) == 1, ids
    # The failure names the warning's id and where it was raised, by function name (KALLSYMS).
    assert warned.message.startswith(f"harness.errors.KernelFault: kernel log during the test: {warning_ids[0]}: "
                                     "WARNING: CPU:") or f"{warning_ids[0]}: WARNING: CPU:" in warned.message
    assert re.search(r"at kernel/dma/swiotlb\.c:\d+ harness_series_show", warned.message), warned.message
    window = (run_dir / "tests" / warned.dirname / "dmesg.txt").read_text()
    assert "deliberate warning for the harness's tests" in window
    assert records and all(r.status == "passed" for r in records.values()), records
    assert meta(run_dir)["kernel"]["diagnostics"]["problems"] == []
