"""Session set-up shared by the guest suites.

`assignment`: under a profile that assigns host functions (vfio: `host_bdf`
and `vfio_backend`), the functions are hot-plugged as vfio-pci once the guest
is up, before the first test, so every suite (pcimem, DMA, hotplug) finds them
as it finds emulated devices; they are hot-unplugged after the last test. With
`-n N` only the first worker's guest gets them. For every other profile it
does nothing.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from harness.assign import Assignment, assigned_bdfs, plug_all, unplug_all
from harness.hostpci import RealSysfs
from harness.pytest_plugin import RunInfo


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--vfio-dma-ops", type=int, default=24,
                     help="dmastress operations per thread on an assigned NVMe (test_vfio; default 24)")


@pytest.fixture(scope="session")
def vfio_dma_ops(request: pytest.FixtureRequest) -> int:
    return int(request.config.getoption("vfio_dma_ops"))


@pytest.fixture(scope="session", autouse=True)
def assignment(request: pytest.FixtureRequest, run_info: RunInfo) -> Iterator[Assignment | None]:
    plan = run_info.plan
    # A host function goes to one VM: with -n N only the first worker's guest gets it.
    if plan is None or not assigned_bdfs(plan.profile) or run_info.worker not in ("main", "gw0"):
        yield None
        return
    guest = request.getfixturevalue("guest")
    qmp = request.getfixturevalue("qmp")
    done = plug_all(qmp, guest, plan.profile, RealSysfs())
    try:
        yield done
    finally:
        # Normally test_vfio has unplugged them already. Bounded: when the run is being stopped
        # (SIGTERM) the guest may still be busy with the interrupted test, and QEMU goes anyway.
        if done.devices and not guest.closed:
            unplug_all(qmp, guest, done, timeout=30)
