"""Host-state guard: hand PCI functions to vfio-pci for a run, and put them back.

Device assignment changes the host: a function leaves its driver for vfio-pci
(`driver_override`, unbind, `drivers_probe`), sometimes a module parameter
changes. The guard records what it is about to change in a state file in the
cache (`host-state/<pid>.json`) *before* the first write, changes it, and
restores every item afterwards: on success, failure, Ctrl-C and SIGTERM (the
`finally` of the run), and after a SIGKILL on the next run, which finds the
state file of a dead owner and restores from it (`sweep`), as the socket
directories of killed runs are swept. `harness host-state [--restore]` shows
and restores the same records by hand.

The PCI side (what a function looks like in sysfs, the bind and restore
sequence, the IOMMU group rule) is harness/hostpci.py.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from harness.errors import BadInput, InfraError
from harness.hostpci import (
    PCI_DEVICES,
    VFIO_DRIVER,
    FunctionState,
    RealSysfs,
    Sysfs,
    bind_vfio,
    check_groups,
    inspect,
    parse_bdfs,
    parse_module_params,
    restore_function,
)
from harness.paths import atomic_write, cache_dir
from harness.profiles import Profile

STATE_DIR = "host-state"
FORMAT = 1


@dataclass
class ModuleParam:
    module: str
    name: str
    old: str
    new: str

    @property
    def rel(self) -> str:
        return f"sys/module/{self.module}/parameters/{self.name}"


@dataclass
class HeldState:
    """The state file: what one owner changed, enough to undo it without that owner."""

    owner_pid: int
    owner_start: str
    boot_id: str
    root: str
    created: str
    functions: list[FunctionState]
    module_params: list[ModuleParam] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)   # BDFs whose binding may differ now
    run_dir: str | None = None
    format: int = FORMAT

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HeldState:
        return cls(
            owner_pid=int(data["owner_pid"]), owner_start=str(data["owner_start"]), boot_id=str(data["boot_id"]),
            root=str(data["root"]), created=str(data["created"]),
            functions=[FunctionState.from_json(f) for f in data["functions"]],
            module_params=[ModuleParam(**p) for p in data.get("module_params", [])],
            changed=list(data.get("changed", [])), run_dir=data.get("run_dir"), format=int(data.get("format", 1)))


def _start_time(pid: int) -> str:
    """A process's start time (field 22 of /proc/PID/stat): with the PID, it names one process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def owner_alive(state: HeldState) -> bool:
    """The process that wrote the state file still runs (same PID, same start time)."""
    return state.boot_id == _boot_id() and _start_time(state.owner_pid) == state.owner_start != ""


def state_dir() -> Path:
    path = cache_dir() / STATE_DIR
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


@dataclass
class RestoreResult:
    """What putting one record back did: per function, the driver/override it ended with."""

    restored: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems


def restore(sysfs: Sysfs, state: HeldState, timeout: float = 30.0) -> RestoreResult:
    """Undo one record: functions in reverse order, then module parameters."""
    start = time.monotonic()
    deadline = start + timeout
    result = RestoreResult()
    for before in reversed(state.functions):
        if before.bdf not in state.changed:
            continue
        problem = restore_function(sysfs, before, deadline)
        if problem:
            result.problems.append(problem)
        else:
            result.restored.append(f"{before.bdf}: driver {before.driver or 'none'}, "
                                   f"driver_override {before.driver_override or 'empty'}")
    for param in reversed(state.module_params):
        try:
            sysfs.write(param.rel, param.old)
            result.restored.append(f"{param.module}.{param.name}={param.old}")
        except OSError as e:
            result.problems.append(f"{param.module}.{param.name}: writing back {param.old!r} failed: {e.strerror}")
    result.seconds = time.monotonic() - start
    return result


class HostStateGuard:
    """Context manager: bind `bdfs` to vfio-pci (and set module parameters) for a run.

    `acquire()` raises BadInput (exit 2) for an unknown function, a group with a
    function not given, or an unknown module parameter, before anything is
    written; InfraError (exit 3) when a write fails, after undoing what it did.
    `release()` restores and removes the state file; it never raises (its
    problems are in the result, and the state file stays for a later restore).
    """

    def __init__(self, bdfs: list[str], module_params: list[tuple[str, str, str]] | None = None,
                 sysfs: Sysfs | None = None, directory: Path | None = None, timeout: float = 30.0,
                 say: Callable[[str], None] | None = None) -> None:
        self.bdfs = bdfs
        self.say = say or (lambda text: None)
        self.wanted_params = module_params or []
        self.sysfs: Sysfs = sysfs or RealSysfs()
        self.directory = directory
        self.timeout = timeout
        self.state: HeldState | None = None
        self.path: Path | None = None
        self.bind_seconds = 0.0
        self.result: RestoreResult | None = None

    def __enter__(self) -> HostStateGuard:
        self.acquire()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def _save(self) -> None:
        assert self.state is not None and self.path is not None
        atomic_write(self.path, json.dumps(self.state.to_json(), indent=1) + "\n", mode=0o600)

    def acquire(self) -> None:
        start = time.monotonic()
        if not self.bdfs and not self.wanted_params:
            return
        states = [inspect(self.sysfs, bdf) for bdf in self.bdfs]
        check_groups(self.sysfs, states)
        directory = self.directory or state_dir()
        for record in held(directory):
            busy = sorted({f.bdf for f in record.state.functions} & set(self.bdfs))
            if record.alive and busy:
                raise InfraError(f"PCI function {busy[0]}: held by the run of pid {record.state.owner_pid} "
                                 f"({record.path}); wait for it, or `harness host-state`")
        params = []
        for module, name, value in self.wanted_params:
            old = self.sysfs.read(f"sys/module/{module}/parameters/{name}")
            if old is None:
                raise BadInput(f"module parameter {module}.{name}: no /sys/module/{module}/parameters/{name} "
                               "on this host (module not loaded, or no such parameter)")
            params.append(ModuleParam(module, name, old, value))
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = directory / f"{os.getpid()}.json"
        self.state = HeldState(owner_pid=os.getpid(), owner_start=_start_time(os.getpid()), boot_id=_boot_id(),
                               root=str(self.sysfs.root), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                               functions=states, module_params=[])
        # Written before the first change: a SIGKILL at any later point leaves
        # what the next run needs to put the host back.
        self._save()
        deadline = time.monotonic() + self.timeout
        try:
            for param in params:
                self.state.module_params.append(param)
                self._save()
                try:
                    self.sysfs.write(param.rel, param.new)
                except OSError as e:
                    raise InfraError(f"module parameter {param.module}.{param.name}={param.new}: "
                                     f"{e.strerror}") from None
            for s in states:
                self.state.changed.append(s.bdf)
                self._save()
                bind_vfio(self.sysfs, s, deadline)
                self.say(f"host-state: {s.bdf} bound to {VFIO_DRIVER} (was {s.describe()})")
        except BaseException:
            self.release()
            raise
        self.bind_seconds = time.monotonic() - start

    def attach(self, run_dir: Path) -> None:
        """Name the run directory in the state file and write `host-state.json` there."""
        if self.state is None:
            return
        self.state.run_dir = str(run_dir)
        self._save()
        self.write_record(run_dir)

    def write_record(self, run_dir: Path) -> None:
        if self.state is None:
            return
        record: dict[str, Any] = {
            "functions": [asdict(f) for f in self.state.functions],
            "module_params": [asdict(p) for p in self.state.module_params],
            "bound_to": VFIO_DRIVER, "bind_seconds": round(self.bind_seconds, 3),
        }
        if self.result is not None:
            record["restore"] = {"ok": self.result.ok, "restored": self.result.restored,
                                 "problems": self.result.problems, "seconds": round(self.result.seconds, 3)}
            record["after"] = [asdict(inspect(self.sysfs, f.bdf)) for f in self.state.functions
                               if self.sysfs.exists(f"{PCI_DEVICES}/{f.bdf}")]
        atomic_write(run_dir / "host-state.json", json.dumps(record, indent=1) + "\n")

    def release(self) -> RestoreResult:
        if self.state is None or self.path is None:
            return RestoreResult()
        if self.result is not None:
            return self.result
        self.result = restore(self.sysfs, self.state, self.timeout)
        if self.result.ok:
            self.path.unlink(missing_ok=True)
        for line in self.result.restored:
            self.say(f"host-state: restored {line}")
        for line in self.result.problems:
            self.say(f"host-state: NOT RESTORED {line} (state kept in {self.path}; `harness host-state --restore`)")
        if self.state.run_dir and Path(self.state.run_dir).is_dir():
            self.write_record(Path(self.state.run_dir))
        return self.result


@dataclass
class HeldRecord:
    path: Path
    state: HeldState
    alive: bool


def held(directory: Path | None = None) -> Iterator[HeldRecord]:
    """The state files in the cache, oldest first, with whether their owner still runs."""
    base = directory or state_dir()
    for path in sorted(base.glob("*.json"), key=lambda p: p.stat().st_mtime):
        try:
            state = HeldState.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InfraError(f"host-state file {path}: unreadable ({e}); inspect and remove it by hand") from None
        yield HeldRecord(path, state, owner_alive(state))


def restore_record(record: HeldRecord, sysfs: Sysfs | None = None, timeout: float = 30.0) -> RestoreResult:
    """Put back what a dead owner held; the state file goes when everything came back.

    A record from an earlier boot of this host is stale (a reboot restored it) and is removed.
    """
    if record.state.boot_id != _boot_id():
        record.path.unlink(missing_ok=True)
        return RestoreResult(restored=[f"{f.bdf}: record from an earlier boot, nothing to do"
                                       for f in record.state.functions])
    result = restore(sysfs or RealSysfs(Path(record.state.root)), record.state, timeout)
    if result.ok:
        record.path.unlink(missing_ok=True)
    return result


def sweep(directory: Path | None = None, sysfs: Sysfs | None = None,
          say: Callable[[str], None] | None = None) -> list[RestoreResult]:
    """Restore every record whose owner died (a SIGKILLed run). Called before a run binds anything."""
    results = []
    for record in held(directory):
        if record.alive:
            continue
        result = restore_record(record, sysfs)
        if say is not None:
            what = "; ".join(result.restored + result.problems) or "nothing changed yet"
            say(f"host-state: restored what pid {record.state.owner_pid} held: {what}")
        results.append(result)
    return results


def guard_for(profile: Profile, say: Callable[[str], None] | None = None) -> HostStateGuard:
    """The guard a run of `profile` needs: the vfio-pci functions its hot-plug devices take
    (`host_bdf`) and the module parameters it sets (`host_module_params`). Profiles that assign
    nothing get a guard that does nothing. Restores what SIGKILLed runs left first."""
    bdfs: list[str] = []
    if any(spec.split(",", 1)[0] == VFIO_DRIVER for spec in profile.hotplug):
        bdfs = parse_bdfs(profile.param("host_bdf") or "")
    params = parse_module_params(profile.param("host_module_params") or "")
    if bdfs or params:
        sweep(say=say)
    return HostStateGuard(bdfs, params, say=say)


def report(restore_dead: bool, as_json: bool, directory: Path | None = None) -> int:
    """`harness host-state [--restore] [--json]`: what runs hold, and putting back what dead ones held.

    Exit 0 when nothing is left held by a dead run (after --restore: everything came back), else 3.
    """
    rows = []
    left = 0
    for record in held(directory):
        row: dict[str, Any] = {"file": str(record.path), "owner_pid": record.state.owner_pid,
                               "owner": "running" if record.alive else "dead", "created": record.state.created,
                               "run_dir": record.state.run_dir,
                               "functions": [asdict(f) for f in record.state.functions],
                               "changed": record.state.changed,
                               "module_params": [asdict(p) for p in record.state.module_params]}
        if restore_dead and not record.alive:
            result = restore_record(record)
            row["restore"] = {"ok": result.ok, "restored": result.restored, "problems": result.problems}
            left += 0 if result.ok else 1
        elif not record.alive:
            left += 1
        rows.append(row)
    if as_json:
        print(json.dumps({"held": rows}, indent=1))
        return 0 if left == 0 else 3
    if not rows:
        print("host-state: nothing held (no vfio-pci bindings or module parameters from harness runs)")
    for row in rows:
        print(f"pid {row['owner_pid']} ({row['owner']}), since {row['created']}"
              + (f", run {row['run_dir']}" if row["run_dir"] else "") + f": {row['file']}")
        for f in row["functions"]:
            state = FunctionState.from_json(f)
            mark = "changed" if state.bdf in row["changed"] else "not yet changed"
            print(f"  {state.bdf}: was driver {state.driver or 'none'}, driver_override "
                  f"{state.driver_override or 'none'}, IOMMU group {state.iommu_group} ({mark})")
        for p in row["module_params"]:
            print(f"  {p['module']}.{p['name']}: was {p['old']!r}, set to {p['new']!r}")
        for line in row.get("restore", {}).get("restored", []):
            print(f"  restored {line}")
        for line in row.get("restore", {}).get("problems", []):
            print(f"  NOT RESTORED {line}")
    if left and not restore_dead:
        print("host-state: runs that held these died; `harness host-state --restore` puts the host back")
    return 0 if left == 0 else 3
