"""Two real builds of one release for the tests that tell builds apart.

The sample build (kernels/coco-sample.yaml) and the same with the
warn-on-read series (the sample's three patches and one whose WARN fails
exactly `test_sample_series_debugfs_attribute`) both report `6.12.117+`. A
planted guest test that fails the first time it runs and passes after gives a
build whose own runs disagree: the marker file that remembers the first run
lives on the host (guest tests run on the host), created with O_EXCL so two
runs in parallel cannot both be first.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from harness.paths import GUEST_TESTS_DIR
from tests.conftest import REPO

TARBALL = Path("/usr/src/linux-source-6.12.tar.xz")
needs_source = pytest.mark.skipif(not TARBALL.exists(), reason=f"{TARBALL} missing: bin/setup installs it")
WARN_SERIES = REPO / "tests" / "data" / "series" / "warn-on-read"
DEBUGFS = "test_series.py::test_sample_series_debugfs_attribute"
PLANTED = "test_planted_fails_once"
SELECT = ["-k", f"test_reached_userspace or test_sample_series or {PLANTED}"]

_PLANTED = '''
import os


def {name}(guest):
    guest.check("true")
    try:
        os.close(os.open({marker!r}, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return
    raise AssertionError("planted: fails the first time it runs, passes after")
'''


def warn_spec(folder: Path) -> Path:
    """A build spec: the release's source, the warn-on-read series, the base fragment."""
    spec = folder / "warn-on-read.yaml"
    spec.write_text(f"source: {TARBALL}\nseries: {WARN_SERIES}\nconfigs: [base]\n")
    return spec


def planted_test(folder: Path) -> Path:
    """test_planted.py in `folder`: fails on its first run, passes on every later one."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "test_planted.py"
    path.write_text(_PLANTED.format(name=PLANTED, marker=str(folder / "first-run-was-here")))
    return path


def planted_suite(folder: Path) -> Path:
    """A copy of the guest tests with the planted test beside them."""
    suite = folder / "suite"
    shutil.copytree(GUEST_TESTS_DIR, suite)
    planted_test(suite)
    return suite
