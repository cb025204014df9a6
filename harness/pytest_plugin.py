"""pytest plugin: boots the VM for the guest tests and records their results.

Loaded by `harness run` as `-p harness.pytest_plugin --harness-run-dir DIR`,
where DIR holds `plan.json`. Each pytest process that runs tests (the main one,
or each pytest-xdist worker) boots its own VM from the plan, once per session.
The process that sees every report (main or xdist controller) writes
`tests.json`, `junit.xml` and `tests/<name>/` after each test.

Fixtures: `machine`, `guest`, `qmp`, `run_info`, `dmesg_lines`, `dmesg_allowlist`.

Each process that runs tests stamps every test's start and end (with its
outcome) into the run's event log, events.jsonl, beside its VM's console lines
and QMP traffic; the runner makes timeline.txt from it.

Every guest test gets a dmesg window: the kernel lines that appeared while it
ran are saved to `tests/<name>/dmesg.txt` and judged by the rule engine; an
error-severity hit fails the test as a kernel failure. `@pytest.mark.dmesg_allow(
rule, pattern, reason=...)` lets a test provoke a message it expects.
"""

from __future__ import annotations

import json
import os
import re
import select
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from harness import pytest_boot
from harness.diagnostics import REMOTE_CONFIG
from harness.dmesg import Allow, describe, errors, load_allowlist, scan
from harness.errors import HarnessError, KernelFault
from harness.events import EVENTS, EventLog
from harness.guest import GuestChannel
from harness.machine import Machine
from harness.plan import LaunchPlan
from harness.process import raise_on_sigterm
from harness.pytest_boot import PLAN_WAIT, EarlyVm, new_machine, write_machine
from harness.pytest_record import Recorder, TestStamper
from harness.qmp import QmpChannel
from harness.results import TestRecord
from harness.rundir import MachineStatus


@dataclass(frozen=True)
class RunInfo:
    """What the tests may ask about the run they are part of."""

    run_dir: Path
    plan: LaunchPlan | None   # None for a remote target
    worker: str
    target: dict[str, Any] | None = None

    @property
    def kernel_release(self) -> str | None:
        """The release the kernel under test must report (None: unknown, remote target)."""
        if self.plan is not None:
            return self.plan.kernel.release
        assert self.target is not None
        return self.target.get("release")

    @property
    def profile(self) -> str:
        return self.plan.profile.name if self.plan is not None else "remote"

    def require_plan(self, what: str) -> LaunchPlan:
        """The launch plan, or a skip saying a remote target has none."""
        if self.plan is None:
            assert self.target is not None
            pytest.skip(f"{what}: remote target {self.target['url']} has no launch plan to compare with")
        return self.plan

    @property
    def requested_coco(self) -> str:
        """The memory encryption the requested profile asks for (none, sev, sev-es, snp, tdx)."""
        if self.plan is None:
            return str((self.target or {}).get("coco", "none"))
        return self.plan.requested_profile.coco

    @property
    def coco(self) -> str:
        """The memory encryption of the guest that actually runs."""
        return self.plan.profile.coco if self.plan is not None else self.requested_coco

    @property
    def cmdline(self) -> str | None:
        return self.plan.cmdline if self.plan is not None else None

    def deadline(self, seconds: float) -> float:
        """A guest-side wait's deadline on this run's host: `seconds` stretched by as much as the
        run stretched the profile's boot deadline (`--boot-timeout 300` over a profile's 60 s: five
        times), so a host the user says is slow (the lab-host twin's L2: KVM inside TCG) is given
        the same margin for a hot-unplug as for its boot."""
        if self.plan is None or self.plan.boot_timeout is None:
            return seconds
        return seconds * max(1.0, self.plan.boot_timeout / self.plan.profile.timeouts.boot)

    def require_coco(self, *kinds: str, what: str) -> None:
        """Skip, with the reason, a hardware assertion this run cannot make honestly.

        An emulated run never passes a CoCo assertion: it skips it, saying which
        profile was asked for, what ran instead and why.
        """
        if self.requested_coco not in kinds:
            pytest.skip(f"{what}: profile {self.plan.requested if self.plan else 'remote'} is not "
                        f"{'/'.join(kinds)} (coco: {self.requested_coco})")
        if self.plan is not None and self.coco != self.requested_coco:
            pytest.skip(f"{what}: emulated run - profile {self.plan.requested} fell back to "
                        f"{self.plan.profile.name} ({'; '.join(self.plan.reasons)})")


# This pytest process's VM, for the report hook to ask whether it was killed from outside.
_MACHINE = pytest.StashKey[Machine]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("harness")
    group.addoption("--harness-run-dir", default=None, help="run directory holding plan.json")
    group.addoption("--harness-plan-fd", type=int, default=None,
                    help="read the run directory from this pipe once the run is planned (see runner.EarlyPytest)")
    group.addoption("--hotplug-cycles", type=int, default=3, help="plug/unplug cycles per hotplug test")


def _await_plan(config: pytest.Config) -> None:
    """With --harness-plan-fd: wait for the runner to write the run directory into the pipe.

    The runner closing the pipe first (it failed to plan, or died) ends this
    pytest with exit 3 before it collects or boots anything.
    """
    fd = config.getoption("harness_plan_fd")
    early = pytest_boot.current
    if fd is None and (early is None or config.getoption("harness_run_dir")):
        return
    if hasattr(config, "workerinput"):
        # An xdist worker gets its controller's command line, not its options.
        config.option.harness_run_dir = config.workerinput.get("harness_run_dir")
        return
    if early is not None:
        path = early.result()[0]   # the early boot read the pipe
    else:
        with open(fd, "rb", closefd=True) as pipe:
            ready, _, _ = select.select([pipe], [], [], PLAN_WAIT)
            path = os.fsdecode(pipe.readline().strip()) if ready else ""
    if not path:
        pytest.exit("harness: the run was not planned (its runner stopped first)", returncode=3)
    config.option.harness_run_dir = path


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """pytest-xdist, in the controller: the run directory goes to each worker."""
    node.workerinput["harness_run_dir"] = node.config.getoption("harness_run_dir")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "dmesg_allow(rule, pattern='.', reason=''): expected dmesg lines")
    _await_plan(config)
    if not config.getoption("harness_run_dir"):
        return
    # SIGTERM becomes an exception, so fixture teardown stops the VM.
    raise_on_sigterm()
    run_dir = Path(config.getoption("harness_run_dir"))
    if not hasattr(config, "workerinput"):
        config.pluginmanager.register(Recorder(run_dir), "harness-recorder")
    # The tests' start and end are stamped where they run: an xdist controller
    # hears of a test's start only after its worker may have acted on the VM.
    if hasattr(config, "workerinput") or config.getoption("dist", default="no") == "no":
        config.pluginmanager.register(TestStamper(EventLog(run_dir / EVENTS, _worker())), "harness-stamper")
    _keep_early_vm(config)


def _keep_early_vm(config: pytest.Config) -> None:
    """The VM harness.pytest_main started before pytest (harness.pytest_boot), kept for the
    `machine` fixture, or stopped when this process runs no test itself."""
    early = pytest_boot.current
    vm = early.result()[1] if early is not None else None
    if vm is None:
        return
    if hasattr(config, "workerinput") or config.getoption("dist", default="no") != "no" \
            or config.option.collectonly:
        _stop(vm)
        return
    config.stash[_EARLY] = vm


def pytest_unconfigure(config: pytest.Config) -> None:
    """An early VM that no test took (none was selected, collection failed) is stopped; the
    thread that started QEMU may end."""
    vm = config.stash.get(_EARLY, None)
    if vm is not None:
        del config.stash[_EARLY]
        _stop(vm)
    if pytest_boot.current is not None:
        pytest_boot.current.release()


def _stop(vm: EarlyVm) -> None:
    vm.machine.shutdown()
    vm.events.close()


_EARLY = pytest.StashKey[EarlyVm]()


def _worker() -> str:
    return os.environ.get("PYTEST_XDIST_WORKER", "main")


@pytest.fixture(scope="session")
def run_info(request: pytest.FixtureRequest) -> RunInfo:
    run_dir = request.config.getoption("harness_run_dir")
    if not run_dir:
        pytest.fail("guest tests need a VM: run them with `harness run`", pytrace=False)
    path = Path(run_dir)
    if (path / "target.json").exists():
        return RunInfo(path, None, _worker(), json.loads((path / "target.json").read_text()))
    plan = LaunchPlan.from_json(json.loads((path / "plan.json").read_text()))
    return RunInfo(path, plan, _worker())


@pytest.fixture(scope="session")
def machine(request: pytest.FixtureRequest, run_info: RunInfo) -> Iterator[Machine]:
    """The booted VM of this pytest process. Boot failures raise (and are cached)."""
    if run_info.plan is None:
        pytest.skip(f"remote target {run_info.target and run_info.target['url']}: no QEMU machine to drive")
    suffix = "" if run_info.worker in ("main", "gw0") else f"-{run_info.worker}"
    early = request.config.stash.get(_EARLY, None)
    if early is not None:
        del request.config.stash[_EARLY]
        m, record, events, error = early.machine, early.record, early.events, early.error
    else:
        (m, record, events), error = new_machine(run_info.run_dir, run_info.plan, run_info.worker), None
    request.config.stash[_MACHINE] = m
    try:
        if error is not None:
            raise error
        if m.qemu is None:
            m.start()
        m.connect()
        record.argv = m.argv
        m.wait_boot()
    except BaseException as e:
        m.shutdown()
        record.status, record.error, record.error_type = MachineStatus.BOOT_FAILED, str(e), type(e).__name__
        record.exit_status, record.lines = m.exit_status, list(getattr(e, "lines", ()))
        write_machine(run_info.run_dir, record)
        raise
    record.status, record.boot_seconds = MachineStatus.BOOTED, round(m.boot_seconds or 0, 3)
    record.channel, record.release = run_info.plan.channel, m.agent.release if m.agent else None
    write_machine(run_info.run_dir, record)
    try:
        yield m
    finally:
        try:
            if m.guest is not None and not m.guest.closed:
                lines = m.guest.kernel_lines(timeout=20)
                (run_info.run_dir / f"dmesg{suffix}.txt").write_text("".join(line + "\n" for line in lines))
        except HarnessError as e:
            record.dmesg_error = str(e)
        except OSError as e:  # a full or read-only results disk: the run says so at its end
            record.dmesg_error = f"dmesg{suffix}.txt: {e.strerror}"
        finally:
            m.shutdown()
            events.close()
            record.status, record.exit_status = MachineStatus.STOPPED, m.exit_status
            write_machine(run_info.run_dir, record)


@pytest.fixture(scope="session")
def guest(request: pytest.FixtureRequest, run_info: RunInfo) -> Iterator[GuestChannel]:
    """The command channel to the system under test: our VM's, or a remote target's."""
    if run_info.target is None:
        machine: Machine = request.getfixturevalue("machine")
        assert machine.guest is not None
        yield machine.guest
        return
    from harness.ssh import SshSession, parse_target

    t = run_info.target
    session = SshSession(parse_target(t["url"]), Path(t["identity"]),
                         known_hosts=Path(t["known_hosts"]) if t.get("known_hosts") else None,
                         connect_timeout=float(t.get("connect_timeout", 30)))
    try:
        # What the target's kernel can report: its config, where the system keeps one.
        config = session.run("zcat /proc/config.gz 2>/dev/null || cat /boot/config-$(uname -r)", timeout=30)
        if config.ok and config.stdout.strip():
            (run_info.run_dir / REMOTE_CONFIG).write_text(config.stdout)
        yield session
    finally:
        try:
            (run_info.run_dir / "dmesg.txt").write_text(session.kernel_log(timeout=20).stdout)
        except HarnessError:
            pass
        session.close()


@pytest.fixture(scope="session")
def qmp(machine: Machine) -> QmpChannel:
    assert machine.qmp is not None
    return machine.qmp


@pytest.fixture(scope="session")
def dmesg_allowlist(request: pytest.FixtureRequest) -> tuple[Allow, ...]:
    """Known noise from `<guest tests>/dmesg-allowlist.yaml`."""
    return load_allowlist(Path(str(request.config.rootpath)) / "dmesg-allowlist.yaml")


@pytest.fixture(autouse=True)
def _dmesg_window(request: pytest.FixtureRequest, run_info: RunInfo,
                  dmesg_allowlist: tuple[Allow, ...]) -> Iterator[None]:
    guest: GuestChannel = request.getfixturevalue("guest")
    qmp = request.getfixturevalue("qmp") if run_info.plan is not None else None
    start = len(guest.kernel_lines(timeout=20))
    events_start = len(qmp.events()) if qmp is not None else 0
    yield
    if guest.closed:
        return
    lines = guest.kernel_lines(timeout=20)[start:]
    allow = dmesg_allowlist + tuple(
        Allow(re.compile(m.kwargs.get("pattern", m.args[1] if len(m.args) > 1 else ".")),
              m.args[0] if m.args else None, m.kwargs.get("reason", ""))
        for m in request.node.iter_markers("dmesg_allow"))
    hits = scan(lines, allow=allow)
    if lines:
        folder = run_info.run_dir / "tests" / TestRecord(request.node.nodeid).dirname
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "dmesg.txt").write_text("\n".join(lines) + "\n")
        except OSError:
            pass  # a full results disk: the Recorder stops the run and the runner says why
    if hits:
        request.node.user_properties.append(("dmesg_error_ids", sorted({h.error_id for h in hits})))
    bad = errors(hits)
    panicked = [ev for ev in (qmp.events()[events_start:] if qmp is not None else [])
                if ev.get("event") == "GUEST_PANICKED"]
    if panicked:
        raise KernelFault(f"QMP GUEST_PANICKED during the test: {panicked[0].get('data')}")
    if bad:
        raise KernelFault(f"kernel log during the test: {describe(bad)}",
                          tuple(h.line for h in bad))


@pytest.fixture(scope="session")
def hotplug_cycles(request: pytest.FixtureRequest) -> int:
    return int(request.config.getoption("hotplug_cycles"))


@pytest.fixture
def dmesg_lines(guest: GuestChannel) -> list[str]:
    """The guest's kernel log as it stands now."""
    return guest.kernel_lines(timeout=20, check=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report = yield
    if call.excinfo is not None:
        exc = call.excinfo.value
        # A guest that stopped answering because its QEMU was killed or stopped from
        # outside (kill -9, the OOM killer, SIGSTOP) did not fail: the host broke.
        machine = item.config.stash.get(_MACHINE, None)
        outside = machine.qemu.interference() if machine is not None and machine.qemu is not None else None
        if isinstance(exc, KernelFault) and outside is None:
            report.user_properties.append(("harness_kind", "kernel"))
        elif isinstance(exc, HarnessError):
            report.user_properties.append(("harness_kind", "infra"))
            if outside is not None:
                report.user_properties.append(("harness_infra", outside))
    return report
