"""Workloads and their judges shown to fail when they should, on real guests."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from junitparser import JUnitXml

from harness.dmesg import errors, scan
from harness.guest import log_lines
from harness.hotplug import HotplugFailure, plug
from harness.kernel import PREBUILT_KERNEL
from harness.machine import Machine
from harness.runner import RunRequest, make_plan
from tests.conftest import Cli, meta


def boot(append: str = "", profile: str = "emulated") -> Iterator[Machine]:
    plan, _ = make_plan(RunRequest(kernel=PREBUILT_KERNEL, profile=profile, append=append))
    with tempfile.TemporaryDirectory(prefix="ht-wl-", dir="/tmp") as tmp, \
            Machine(plan, Path(tmp) / "logs", name="wl", sock_parent=Path(tmp) / "s") as m:
        m.wait_boot()
        yield m


@pytest.fixture
def vm() -> Iterator[Machine]:
    yield from boot()


WARNING_TEST = '''
def test_provokes_a_warn(guest):
    guest.check("echo 'WARNING: CPU: 0 PID: 1 at drivers/pci/probe.c:42 pci_probe+0x1/0x2' > /dev/kmsg")

def test_next_one_is_judged_alone(guest):
    assert guest.check("echo ok").strip() == "ok"
'''


def test_a_kernel_warning_fails_only_the_test_it_happened_in(cli: Cli, tmp_path: Path) -> None:
    tests = tmp_path / "suite"
    tests.mkdir()
    (tests / "test_warn.py").write_text(WARNING_TEST)
    proc = cli("run", "--results", str(cli.results), "--tests", str(tests))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    run_dir = cli.only_run()
    cases = {c.name: c for suite in JUnitXml.fromfile(str(run_dir / "junit.xml")) for c in suite}
    assert cases["test_provokes_a_warn"].result and not cases["test_provokes_a_warn"].is_skipped
    assert "kernel log during the test: warning-" in cases["test_provokes_a_warn"].result[0].message
    assert cases["test_next_one_is_judged_alone"].is_passed
    records = json.loads((run_dir / "tests.json").read_text())
    ids = records[0]["properties"]["dmesg_error_ids"]
    assert len(ids) == 1 and ids[0].startswith("warning-")
    window = run_dir / "tests" / "test_warn.test_provokes_a_warn" / "dmesg.txt"
    assert "pci_probe" in window.read_text()
    assert meta(run_dir)["failure"]["test"] == "test_warn.py::test_provokes_a_warn"


def test_hotplug_whose_device_never_appears(vm: Machine) -> None:
    assert vm.qmp is not None and vm.guest is not None
    with pytest.raises(HotplugFailure, match="did not show up in the guest within 3 s"):
        # edu is plugged for real; the guest is asked for an id it will never show.
        plug(vm.qmp, vm.guest, "edu,id=ghost,bus=hp1", "0x1234", "0xdead", timeout=3)


def test_the_agent_reads_the_kernel_log_as_dmesg_does_and_loads_the_modules(vm: Machine) -> None:
    """The agent's own `!klog` (the dmesg windows, the run's dmesg.txt) against busybox dmesg,
    a part at a time, and its `--insmod` that /init loads the profile's modules with."""
    g = vm.guest
    assert g is not None
    g.check("printf 'harness-klog: a form feed \\f inside\\n' > /dev/kmsg")
    lines = g.kernel_lines()
    shell = log_lines(g.check("dmesg"))
    assert shell[:len(lines)] == lines and any("a form feed \f inside" in line for line in lines)
    assert any(line.endswith("] virtio_blk virtio0: [vda] 131072 512-byte logical blocks (67.1 MB/64.0 MiB)")
               for line in lines), "the profile's virtio_blk did not load"
    g.check("echo nosuch.ko > /tmp/modules; harness-agent --insmod /tmp/modules")
    new = g.kernel_lines()[len(lines):]
    assert [line.split("] ", 1)[1] for line in new] == [
        "harness-init: insmod nosuch.ko failed: No such file or directory"]
    g.check("dmesg -c >/dev/null; echo harness-klog: after the clear > /dev/kmsg")
    assert [line.split("] ", 1)[1] for line in g.kernel_lines()] == ["harness-klog: after the clear"]
    assert g.kernel_log().stdout == g.check("dmesg")


def test_swiotlb_exhaustion_fires_its_rule_on_a_real_guest() -> None:
    # The CoCo twin's virtio path with a 256 KiB bounce pool: mappings fail.
    for m in boot(append="swiotlb=128", profile="coco-emulated"):
        assert m.guest is not None
        disk = m.guest.check("ls /sys/block | grep ^vd").split()[0]
        m.guest.run(f"dmastress -d /dev/{disk} -t 4 -n 8 -s 266240", timeout=8)
        hits = errors(scan(m.guest.check("dmesg").splitlines()))
        assert "swiotlb-full" in {h.rule for h in hits}


def test_native_pcie_hotplug(cli: Cli) -> None:
    proc = cli("run", "--profile", "emulated-pciehp", "--results", str(cli.results), "-k", "edu_hotplug",
               "--hotplug-cycles", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    argv = json.loads((cli.only_run() / "qemu-argv.json").read_text())
    assert "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off" in argv
