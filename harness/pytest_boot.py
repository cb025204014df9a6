"""The VM of a single pytest child, started before pytest is even imported.

`harness run` starts its pytest child first and hands it the run directory
once the run is planned (harness.pytest_child). Importing pytest, the plugin
and the guest tests, and collecting them, take the child 0.3-0.45 s of CPU;
booting the guest takes seconds. So `harness.pytest_main` starts an
`EarlyBoot` thread before it imports pytest: the thread imports the machine
stack, waits for the run directory, and starts QEMU from its plan.json while
the main thread is importing pytest and collecting. The plugin's
`machine` fixture adopts that VM (connects, waits for the boot) instead of
starting one.

Only a child that runs its tests in its own process boots early, and only a
TCG guest (see `_start` for KVM): with pytest-xdist the workers boot their
own VMs, and the controller none. The
plugin stops an early VM that no test adopted (xdist turned on by an ini
file, `--collect-only`, no test selected).

QEMU dies with the thread that started it (PR_SET_PDEATHSIG follows the
thread), so that thread waits until the VM has been shut down, or the process
ends.

The main thread imports pytest only once the thread has imported the machine
stack: both at once share one interpreter lock, and QEMU's start waits for the
slower. Imported one after the other, the machine stack is there when the
plan comes (0.15-0.2 s after the command started), and pytest's import and the
collection overlap the boot instead. The stack is only what starting QEMU
takes (30-50 ms of imports; 110-130 ms when it was all of harness.machine, which
was then the wait): the console reader, the agent's pexpect and QMP's asyncio
are imported when the fixture connects, while the guest boots.

This module imports little at the top on purpose: the main thread imports it
before pytest.
"""

from __future__ import annotations

import json
import os
import select
import shlex
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from harness.events import EventLog
    from harness.machine import Machine
    from harness.plan import LaunchPlan
    from harness.rundir import MachineRecord

# How long a pytest started before its run was planned waits for the plan: the
# plan may build a kernel first. The runner's own deadlines end it sooner (its
# death closes the pipe), so this only bounds a runner that hangs.
PLAN_WAIT = 6 * 3600.0

# pytest-xdist's options (and their short forms, also glued to a value: -n2).
_XDIST_LONG = ("--numprocesses", "--maxprocesses", "--dist", "--tx", "--looponfail")
_XDIST_SHORT = ("-n", "-d", "-f")


def single_process(argv: list[str], addopts: str = "") -> bool:
    """Whether these pytest arguments (and PYTEST_ADDOPTS) leave pytest-xdist off. Anything that
    may be an xdist option counts as one: a wrong guess only costs the early start."""
    try:
        tokens = [*argv, *shlex.split(addopts)]
    except ValueError:
        return False
    for token in tokens:
        if token.startswith(_XDIST_LONG) or (not token.startswith("--") and token.startswith(_XDIST_SHORT)):
            return False
    return True


def new_machine(run_dir: Path, plan: LaunchPlan, worker: str) -> tuple[Machine, MachineRecord, EventLog]:
    """The VM of the pytest process `worker` (not started yet) and its record, written."""
    from harness.events import EVENTS, EventLog
    from harness.machine import Machine
    from harness.rundir import MachineRecord

    suffix = "" if worker in ("main", "gw0") else f"-{worker}"
    sock_parent = os.environ.get("HARNESS_SOCK_DIR")
    name = os.environ.get("HARNESS_MACHINE_PREFIX", "harness") + f"-{worker}"
    events = EventLog(run_dir / EVENTS, worker)
    m = Machine(plan, run_dir, name=name, sock_parent=Path(sock_parent) if sock_parent else None,
                console_log=f"console{suffix}.log", events=events)
    record = MachineRecord(name=name, worker=worker, console=m.console_path.name)
    write_machine(run_dir, record)
    return m, record, events


def write_machine(run_dir: Path, record: MachineRecord) -> None:
    """The VM's record; on a full or read-only results disk the run itself says so
    (the Recorder stops the tests, the runner finishes meta.json), so not here."""
    from harness.rundir import write_machine as write

    try:
        write(run_dir, record)
    except OSError:
        pass


@dataclass
class EarlyVm:
    """A VM started before the tests asked for it, until the `machine` fixture adopts it.
    `error`: what starting it raised (the fixture raises it, as a boot failure)."""

    machine: Machine
    record: MachineRecord
    events: EventLog
    error: BaseException | None = None


class EarlyBoot:
    """The thread that waits for the run directory and starts the VM from its plan.

    `fd`: the runner's pipe (the run directory comes as one line); or `run_dir`, known at once.
    """

    def __init__(self, fd: int | None = None, run_dir: str | None = None) -> None:
        self._fd = fd
        self._run_dir = run_dir
        self._ready = threading.Event()
        self.imported = threading.Event()
        self._release = threading.Event()
        self.vm: EarlyVm | None = None
        self._thread = threading.Thread(target=self._run, name="harness-early-boot", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            # What starting QEMU from a plan takes (harness.machine defers what only a
            # connected machine uses): these imports overlap the runner's planning.
            import harness.events
            import harness.machine
            import harness.plan
            import harness.rundir  # noqa: F401
        except Exception:  # noqa: BLE001 - the machine fixture imports it again and says what fails
            pass
        finally:
            self.imported.set()
        try:
            run_dir = self._run_dir if self._run_dir is not None else self._read_plan_fd()
            self._run_dir = run_dir
            if run_dir:
                self.vm = _start(Path(run_dir))
        except Exception:  # noqa: BLE001 - the machine fixture starts the VM and reports what fails
            pass
        finally:
            self._ready.set()
        if self.vm is not None and self.vm.machine.qemu is not None:
            self._release.wait()

    def _read_plan_fd(self) -> str:
        assert self._fd is not None
        with open(self._fd, "rb", closefd=True) as pipe:
            ready, _, _ = select.select([pipe], [], [], PLAN_WAIT)
            return os.fsdecode(pipe.readline().strip()) if ready else ""

    def result(self) -> tuple[str, EarlyVm | None]:
        """The run directory ("" if the runner closed the pipe first) and the VM, once there.
        The thread's own wait for the plan is bounded; a VM's start has no wait in it."""
        self._ready.wait(PLAN_WAIT + 60)
        return self._run_dir or "", self.vm

    def release(self) -> None:
        """The VM is shut down: the thread that started QEMU may end."""
        self._release.set()


def _start(run_dir: Path) -> EarlyVm | None:
    from harness.plan import LaunchPlan

    if (run_dir / "target.json").exists() or not (run_dir / "plan.json").is_file():
        return None
    plan = LaunchPlan.from_json(json.loads((run_dir / "plan.json").read_text()))
    if plan.accel != "tcg":
        # The only KVM this project can run is the lab-host twin's (KVM in a TCG L1): there an L2
        # started while pytest started beside it triple-faulted early in its boot in every try
        # (QEMU's TCG nested SVM, issue 11), and booted when started after collection. Until
        # a real KVM host has run it, a KVM guest starts as it did: from the fixture.
        return None
    vm = EarlyVm(*new_machine(run_dir, plan, "main"))
    try:
        vm.machine.start()
    except Exception as e:  # noqa: BLE001 - the machine fixture raises it, where boot failures are reported
        vm.error = e
    return vm


# The early boot of this process, when harness.pytest_main started one.
current: EarlyBoot | None = None
