"""The patch series a kernel was built with is in the running kernel.

For kernels built by `harness build` with the sample series
(kernels/coco-sample): its boot message and its debugfs attribute.
"""

from __future__ import annotations

import re

import pytest

from harness.guest import GuestChannel
from harness.pytest_plugin import RunInfo

SAMPLE = "swiotlb: add a read-only harness_series attribute to debugfs"


def _series(run_info: RunInfo) -> tuple[str, ...]:
    plan = run_info.require_plan("patch series")
    if not plan.kernel.series:
        pytest.skip(f"kernel {plan.kernel.release} was not built with a series ({plan.kernel.spec})")
    return plan.kernel.series


def _slabs(guest: GuestChannel) -> int:
    """The default pool's slabs (debugfs omits the counter when there is no pool)."""
    result = guest.run("cat /sys/kernel/debug/swiotlb/io_tlb_nslabs")
    return int(result.stdout) if result.ok else 0


def test_sample_series_boot_message(guest: GuestChannel, run_info: RunInfo) -> None:
    series = _series(run_info)
    if not any(s.startswith("swiotlb: announce the CoCo harness sample series") for s in series):
        pytest.skip("the kernel's series is not the sample series")
    m = re.search(r"coco-harness sample series present: (\d+) bounce slabs", guest.check("dmesg"))
    assert m, "the sample series' boot message is missing from dmesg"
    assert int(m.group(1)) == _slabs(guest)


def test_sample_series_debugfs_attribute(guest: GuestChannel, run_info: RunInfo) -> None:
    series = _series(run_info)
    if SAMPLE not in series:
        pytest.skip("the kernel's series does not add harness_series")
    text = guest.read_text("/sys/kernel/debug/swiotlb/harness_series").strip()
    expected = "coco-harness-sample v1"
    if "swiotlb: report the pool size in harness_series" in series:
        expected += f" slabs={_slabs(guest)}"
    assert text == expected
    assert guest.run("echo x > /sys/kernel/debug/swiotlb/harness_series").exit_code != 0, "must be read-only"
