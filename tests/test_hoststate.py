"""The host-state guard's logic on sysfs trees (tests/data/hoststate/: one recorded in
the lab-host twin's L1, one a hand-written fake of a lab host, each saying which).

Reads go through RealSysfs over a directory tree built from the JSON (files and
symlinks as sysfs has them). Writes go to `KernelModel`, a model of the
kernel's bind rules written for these tests: unbind drops the driver,
drivers_probe binds the override (or the natural driver) of an unbound
function only, bind refuses a bound function, and unbinding a vfio function
that a process holds is an error (the real kernel blocks there). The real
thing runs in the lab-host twin (tests/test_labhost.py).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from harness import hoststate
from harness.errors import BadInput, InfraError
from harness.hostpci import (
    VFIO_DRIVER,
    RealSysfs,
    check_groups,
    inspect,
    normalise_bdf,
    parse_bdfs,
    parse_module_params,
)
from harness.hoststate import HostStateGuard, held, report, sweep
from harness.profiles import apply_params, load_profile

DATA = Path(__file__).parent / "data" / "hoststate"


def load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DATA / name).read_text())
    return data


def make_tree(root: Path, data: dict[str, Any]) -> None:
    """A sysfs-shaped directory tree: device attribute files, driver and iommu_group symlinks."""
    for drv in data["drivers"]:
        (root / "sys/bus/pci/drivers" / drv).mkdir(parents=True, exist_ok=True)
        for attr in ("bind", "unbind", "new_id"):
            (root / "sys/bus/pci/drivers" / drv / attr).touch()
    (root / "sys/bus/pci/drivers_probe").touch()
    for f in data["functions"]:
        dev = root / "sys/bus/pci/devices" / f["bdf"]
        dev.mkdir(parents=True)
        for attr in ("vendor", "device", "class"):
            (dev / attr).write_text(f[attr] + "\n")
        (dev / "driver_override").write_text("(null)\n")
        # Devices sit directly under bus/pci/devices here (sysfs links them from /sys/devices):
        # the links are relative to that.
        if f["driver"]:
            os.symlink(f"../../drivers/{f['driver']}", dev / "driver")
        if f["group"]:
            group = root / "sys/kernel/iommu_groups" / f["group"] / "devices"
            group.mkdir(parents=True, exist_ok=True)
            os.symlink(f"../../../../devices/pci0000:00/{f['bdf']}", group / f["bdf"])
            os.symlink(f"../../../../kernel/iommu_groups/{f['group']}", dev / "iommu_group")


class KernelModel:
    """The kernel's side of the writes, on top of a tree's reads (see the module docstring)."""

    def __init__(self, root: Path, data: dict[str, Any]) -> None:
        self.root = root
        self.real = RealSysfs(root)
        self.natural = {f["bdf"]: f["driver"] for f in data["functions"]}
        self.params = {f"sys/module/{m}/parameters/{p}": v for m, ps in data.get("modules", {}).items()
                       for p, v in ps.items()}
        self.writes: list[tuple[str, str]] = []
        self.held: dict[str, list[int]] = {}   # device node -> pids
        self.fail_on: tuple[str, str] | None = None

    # reads: the tree, plus module parameters
    def read(self, rel: str) -> str | None:
        return self.params[rel] if rel in self.params else self.real.read(rel)

    def link_name(self, rel: str) -> str | None:
        return self.real.link_name(rel)

    def listdir(self, rel: str) -> list[str]:
        return self.real.listdir(rel)

    def exists(self, rel: str) -> bool:
        return rel in self.params or self.real.exists(rel)

    def holders(self, nodes: list[str]) -> list[int]:
        return sorted({pid for n in nodes for pid in self.held.get(n, [])})

    def _dev(self, bdf: str) -> Path:
        return self.root / "sys/bus/pci/devices" / bdf

    def _bind(self, bdf: str, driver: str) -> None:
        os.symlink(f"../../drivers/{driver}", self._dev(bdf) / "driver")
        if driver == VFIO_DRIVER:
            group = self.link_name(f"sys/bus/pci/devices/{bdf}/iommu_group")
            (self.root / "dev/vfio").mkdir(parents=True, exist_ok=True)
            (self.root / f"dev/vfio/{group}").touch()

    def write(self, rel: str, value: str) -> None:
        self.writes.append((rel, value))
        if self.fail_on is not None and rel.endswith(self.fail_on[0]) and value == self.fail_on[1]:
            raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))
        parts = rel.split("/")
        if rel in self.params:
            self.params[rel] = value
        elif rel.endswith("/driver/unbind"):
            bdf = parts[4]
            assert value == bdf
            if self.link_name(f"sys/bus/pci/devices/{bdf}/driver") == VFIO_DRIVER:
                group = self.link_name(f"sys/bus/pci/devices/{bdf}/iommu_group")
                assert not self.held.get(f"dev/vfio/{group}"), "unbound a vfio function that is in use"
            (self._dev(bdf) / "driver").unlink()
        elif rel.endswith("/driver_override"):
            text = value.strip()
            (self._dev(parts[4]) / "driver_override").write_text((text or "(null)") + "\n")
        elif rel == "sys/bus/pci/drivers_probe":
            if self.link_name(f"sys/bus/pci/devices/{value}/driver") is not None:
                return  # a bound function is not probed again
            override = self.read(f"sys/bus/pci/devices/{value}/driver_override")
            driver = override if override != "(null)" else self.natural[value]
            if driver:
                self._bind(value, driver)
        elif rel.endswith("/bind"):
            if self.link_name(f"sys/bus/pci/devices/{value}/driver") is not None:
                raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
            self._bind(value, parts[4])
        else:
            raise AssertionError(f"unexpected write {rel} = {value!r}")

    def state(self, bdf: str) -> tuple[str | None, str | None]:
        s = inspect(self, bdf)
        return s.driver, s.driver_override


@pytest.fixture(params=["fake-epyc-lab.json", "lab-host-l1.json"])
def host(request: pytest.FixtureRequest, tmp_path: Path) -> KernelModel:
    data = load(request.param)
    make_tree(tmp_path / "root", data)
    return KernelModel(tmp_path / "root", data)


@pytest.fixture
def epyc(tmp_path: Path) -> KernelModel:
    data = load("fake-epyc-lab.json")
    make_tree(tmp_path / "root", data)
    return KernelModel(tmp_path / "root", data)


def guard(model: KernelModel, bdfs: list[str], tmp_path: Path, **kw: Any) -> HostStateGuard:
    return HostStateGuard(bdfs, sysfs=model, directory=tmp_path / "state", timeout=2, **kw)


def single_function_groups(model: KernelModel) -> list[str]:
    """Functions alone in their IOMMU group, that a guard may take one at a time."""
    out = []
    for bdf in model.listdir("sys/bus/pci/devices"):
        s = inspect(model, bdf)
        if s.group_members == (bdf,):
            out.append(bdf)
    return out


def test_pci_addresses_and_module_parameters_parse_or_say_what_is_wrong() -> None:
    assert normalise_bdf("41:00.1") == "0000:41:00.1" and normalise_bdf("0000:0A:1f.7") == "0000:0a:1f.7"
    assert parse_bdfs("41:00.0, 0000:41:00.0,42:00.1") == ["0000:41:00.0", "0000:42:00.1"]
    with pytest.raises(BadInput, match=r"PCI address '41:00': expected \[domain:\]bus:device.function"):
        parse_bdfs("41:00")
    assert parse_module_params("vfio_iommu_type1.allow_unsafe_interrupts=1, vfio-pci.nointxmask=Y") == [
        ("vfio_iommu_type1", "allow_unsafe_interrupts", "1"), ("vfio_pci", "nointxmask", "Y")]
    with pytest.raises(BadInput, match="module parameter 'vfio=1': expected module.parameter=value"):
        parse_module_params("vfio=1")


def test_inspect_reads_driver_override_and_group_from_the_tree(epyc: KernelModel) -> None:
    s = inspect(epyc, "0000:42:00.0")
    assert (s.driver, s.driver_override, s.iommu_group) == ("ixgbe", None, "13")
    assert s.group_members == ("0000:42:00.0", "0000:42:00.1")
    assert inspect(epyc, "0000:40:01.1").is_bridge and not s.is_bridge
    with pytest.raises(BadInput, match="PCI function 0000:99:00.0: not on this host"):
        inspect(epyc, "0000:99:00.0")


def test_a_group_with_a_function_not_given_is_refused_naming_it(epyc: KernelModel, tmp_path: Path) -> None:
    g = guard(epyc, ["0000:42:00.0"], tmp_path)
    with pytest.raises(BadInput, match=r"0000:42:00.0: IOMMU group 13 also holds 0000:42:00.1, which was not given"):
        g.acquire()
    assert epyc.writes == [] and not list((tmp_path / "state").glob("*.json")), "refused, yet wrote something"
    # Both functions given: taken together. A bridge sharing a group does not count (vfio allows it).
    check_groups(epyc, [inspect(epyc, b) for b in ("0000:42:00.0", "0000:42:00.1")])
    check_groups(epyc, [inspect(epyc, "0000:41:00.0")])


def test_bind_unbinds_first_then_override_then_probe_and_restore_puts_everything_back(
        host: KernelModel, tmp_path: Path) -> None:
    bdfs = single_function_groups(host)
    assert bdfs, "the tree has functions alone in a group"
    before = {b: host.state(b) for b in bdfs}
    g = guard(host, bdfs, tmp_path)
    with g:
        for bdf in bdfs:
            assert host.state(bdf) == (VFIO_DRIVER, VFIO_DRIVER)
        state_files = list((tmp_path / "state").glob("*.json"))
        assert len(state_files) == 1 and json.loads(state_files[0].read_text())["changed"] == bdfs
    assert {b: host.state(b) for b in bdfs} == before
    assert not list((tmp_path / "state").glob("*.json")), "state file left after a clean restore"
    assert g.result is not None and g.result.ok and g.bind_seconds > 0
    for bdf in bdfs:
        writes = [w for w in host.writes if bdf in w[0] or w[1] == bdf]
        if before[bdf][0]:   # a bound function leaves its driver before the override and the probe
            assert writes[0] == (f"sys/bus/pci/devices/{bdf}/driver/unbind", bdf), writes
        assert (f"sys/bus/pci/devices/{bdf}/driver_override", VFIO_DRIVER) in writes
        assert writes.index((f"sys/bus/pci/devices/{bdf}/driver_override", VFIO_DRIVER)) < \
            writes.index(("sys/bus/pci/drivers_probe", bdf))


def test_a_failure_half_way_undoes_what_was_done(epyc: KernelModel, tmp_path: Path) -> None:
    epyc.fail_on = ("drivers_probe", "0000:43:00.2")
    with pytest.raises(InfraError, match="PCI function 0000:43:00.2: drivers_probe failed"):
        guard(epyc, ["0000:41:00.0", "0000:43:00.2"], tmp_path).acquire()
    assert epyc.state("0000:41:00.0") == ("nvme", None)
    assert epyc.state("0000:43:00.2") == ("ccp", None)


def test_module_parameters_are_set_for_the_run_and_restored(epyc: KernelModel, tmp_path: Path) -> None:
    rel = "sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts"
    with guard(epyc, ["0000:41:00.0"], tmp_path,
               module_params=[("vfio_iommu_type1", "allow_unsafe_interrupts", "Y")]) as g:
        assert epyc.read(rel) == "Y"
        g.attach(tmp_path)
    assert epyc.read(rel) == "N"
    record = json.loads((tmp_path / "host-state.json").read_text())
    assert record["restore"]["ok"] and record["module_params"][0]["old"] == "N"
    with pytest.raises(BadInput, match="module parameter vfio_pci.nosuch: no /sys/module/vfio_pci/parameters"):
        guard(epyc, [], tmp_path, module_params=[("vfio_pci", "nosuch", "1")]).acquire()


def test_a_held_function_is_not_unbound_and_stays_recorded(epyc: KernelModel, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    g = guard(epyc, ["0000:41:00.0"], tmp_path)
    g.acquire()
    epyc.held["dev/vfio/12"] = [4242]   # a QEMU that does not let go
    result = g.release()
    assert not result.ok and "still held by pid(s) 4242" in result.problems[0]
    assert epyc.state("0000:41:00.0") == (VFIO_DRIVER, VFIO_DRIVER), "unbound while in use"
    assert len(list((tmp_path / "state").glob("*.json"))) == 1, "the record must stay for a later restore"
    # The owner (this process) is alive: --restore leaves it; it is reported as held.
    assert report(restore_dead=True, as_json=False, directory=tmp_path / "state") == 0
    assert f"pid {os.getpid()} (running)" in capsys.readouterr().out


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_the_next_run_restores_what_a_killed_run_held(epyc: KernelModel, tmp_path: Path) -> None:
    # What a SIGKILL leaves: bindings changed, the state file, no owner to restore them.
    g = guard(epyc, ["0000:41:00.0", "0000:44:00.0"], tmp_path)
    g.acquire()
    path = next((tmp_path / "state").glob("*.json"))
    data = json.loads(path.read_text())
    data["owner_pid"] = _dead_pid()
    path.write_text(json.dumps(data))
    [record] = list(held(tmp_path / "state"))
    assert not record.alive
    assert report(restore_dead=False, as_json=False, directory=tmp_path / "state") == 3
    results = sweep(tmp_path / "state", sysfs=epyc)
    assert len(results) == 1 and results[0].ok, results
    assert epyc.state("0000:41:00.0") == ("nvme", None) and epyc.state("0000:44:00.0") == (None, None)
    assert not path.exists()


def test_a_function_a_running_run_holds_is_not_taken_twice(epyc: KernelModel, tmp_path: Path) -> None:
    with guard(epyc, ["0000:41:00.0"], tmp_path):
        with pytest.raises(InfraError, match=r"0000:41:00.0: held by the run of pid \d+"):
            guard(epyc, ["0000:41:00.0"], tmp_path).acquire()
        assert sweep(tmp_path / "state", sysfs=epyc) == [], "a live owner's bindings were swept"
        assert epyc.state("0000:41:00.0") == (VFIO_DRIVER, VFIO_DRIVER)


def test_record_from_an_earlier_boot_is_dropped_not_replayed(epyc: KernelModel, tmp_path: Path) -> None:
    g = guard(epyc, ["0000:41:00.0"], tmp_path)
    g.acquire()
    path = next((tmp_path / "state").glob("*.json"))
    data = json.loads(path.read_text())
    data.update(owner_pid=_dead_pid(), boot_id="an-earlier-boot")
    path.write_text(json.dumps(data))
    writes = len(epyc.writes)
    assert sweep(tmp_path / "state", sysfs=epyc)[0].ok and not path.exists()
    assert len(epyc.writes) == writes, "a reboot already put the host back: nothing to write"


def test_only_profiles_that_assign_get_a_guard(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path))
    assert hoststate.guard_for(apply_params(load_profile("emulated"), {})).bdfs == []
    vfio = apply_params(load_profile("vfio"), {"host_bdf": "41:00.0,41:00.1",
                                               "host_module_params": "vfio_pci.disable_idle_d3=Y"})
    g = hoststate.guard_for(vfio)
    assert g.bdfs == ["0000:41:00.0", "0000:41:00.1"] and g.wanted_params == [("vfio_pci", "disable_idle_d3", "Y")]
    # tio-emulated hot-plugs an emulated edu: nothing on the host to bind.
    assert hoststate.guard_for(apply_params(load_profile("tio-emulated"), {})).bdfs == []


def test_host_state_command_lists_and_reports_what_it_could_not_put_back(tmp_path: Path) -> None:
    """`harness host-state` end to end: a record left by a killed run, over a plain directory
    tree (no kernel behind it, so the restore cannot take effect and must say so)."""
    data = load("fake-epyc-lab.json")
    root = tmp_path / "root"
    make_tree(root, data)
    model = KernelModel(root, data)
    cache = tmp_path / "cache"
    g = HostStateGuard(["0000:41:00.0"], sysfs=model, directory=cache / "host-state", timeout=1)
    g.acquire()
    path = next((cache / "host-state").glob("*.json"))
    record = json.loads(path.read_text())
    record.update(owner_pid=_dead_pid(), root=str(root))
    path.write_text(json.dumps(record))
    env = {**os.environ, "HARNESS_CACHE": str(cache)}

    def host_state(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "harness", "host-state", *args], env=env,
                              capture_output=True, text=True, timeout=60)

    listed = host_state()
    assert listed.returncode == 3, listed.stdout + listed.stderr
    assert "(dead)" in listed.stdout and "0000:41:00.0: was driver nvme, driver_override none" in listed.stdout
    assert "`harness host-state --restore` puts the host back" in listed.stdout
    # The tree is files, not sysfs: writes land but the driver link never changes back.
    restored = host_state("--restore", "--json")
    assert restored.returncode == 3
    problems = json.loads(restored.stdout)["held"][0]["restore"]["problems"]
    assert problems and "0000:41:00.0: driver is vfio-pci after restore, was nvme" in problems[0]
    assert path.exists(), "a record that could not be put back must stay"
    # With the kernel model behind it, the same record comes back whole.
    assert sweep(cache / "host-state", sysfs=model)[0].ok and not path.exists()
    assert host_state().returncode == 0
