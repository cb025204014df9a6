"""Machine: owns one QEMU guest, from its private socket directory to its exit.

Lifecycle: `launch()` -> `wait_boot()` -> guest channel -> `shutdown()`, in
named phases:

    launch    start:
              _pre_launch   private directory, listening sockets (console,
                            command channel, QMP), scratch disks, channel
                            set-up, argv
              _launch       QEMU in its own session, dying with its owner
              connect:
              _post_launch  accept QEMU's connections, console reader, serial
                            agent, QMP handshake (all within one deadline)
    shutdown  _soft_shutdown  QMP quit, then QEMU's own exit
              _hard_shutdown  SIGTERM, then SIGKILL to its process group
              _post_shutdown  always: channels, console reader, QMP, sockets,
                              the private directory

`start` needs only the first half's modules; what the second half uses is
imported then.

Use it as a context manager: shutdown and cleanup always run. The parts each
own one thing: `SocketDir` the directory, its listeners and scratch images, and
`QemuProcess` the process and its output (both harness/qemuproc.py), `harness.console.Console` the console
reader thread, the channel factory (`harness.ssh`) the guest channel's set-up;
`qmp_handshake` ends the start-up, `wait_for_agent` is the boot wait, and
`boot_error` and `boot_timeout` are its verdicts.

With an event log (harness/events.py), the machine's steps go there as they
happen (QEMU started, boot detected or failed, shutdown, QEMU's exit), and the
console and QMP write their own lines to it.
"""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from harness.errors import BootFailure, GuestUnreachable, HarnessError, InfraError, QemuStartError
from harness.events import EventLog, Source
from harness.guest import ChannelFactory
from harness.qemuproc import START_DEADLINE, QemuProcess, SocketDir

# What only the connected machine uses (the console reader, the agent's pexpect, QMP's
# asyncio) is imported when it connects: starting QEMU needs none of it, and a run's
# pytest child starts its QEMU before it has imported them (harness.pytest_boot).
if TYPE_CHECKING:
    from harness.console import Console
    from harness.guest import AgentSession, GuestChannel
    from harness.plan import LaunchPlan
    from harness.qmp import QmpChannel

_TAIL = 40


def qmp_handshake(qmp: QmpChannel, sock: socket.socket, qemu: QemuProcess, deadline: float) -> None:
    """Negotiate over QEMU's QMP connection; QemuStartError if that fails by `deadline`."""
    try:
        qmp.open(sock, timeout=max(0.1, deadline - time.monotonic()))
    except Exception:  # noqa: BLE001 - qemu.qmp raises ConnectError, EOFError, timeouts...
        qemu.wait(1.0)
        raise qemu.start_error("QEMU did not complete the QMP handshake") from None


def wait_for_agent(agent: AgentSession, console: Console, qemu: QemuProcess, deadline: float,
                   budget: float) -> None:
    """Return once the agent has announced itself; raise the boot verdict
    (`boot_error`, `boot_timeout`) as soon as there is one."""
    while True:
        if console.fault is not None or agent.closed or not qemu.running():
            # A fault: QEMU may still print the rest of the trace and exit.
            # The channel closed or QEMU exited: the console still drains.
            qemu.wait(2.0)
            console.wait_closed(1.0)
        error = boot_error(console, qemu)
        if error is not None:
            raise error
        if agent.wait_ready(0.05):
            return
        if time.monotonic() > deadline:
            raise boot_timeout(console, budget)


def boot_error(console: Console, qemu: QemuProcess) -> HarnessError | None:
    """What ends a boot wait now, if anything.

    A kernel fault on the console (panic, oops, reset) wins, even when QEMU has
    exited since. Then QEMU's exit: after the kernel printed, the guest reset or
    powered off (BootFailure); before any output, QEMU itself failed.
    """
    fault = console.fault
    if fault is not None:
        return BootFailure(f"kernel {fault.kind} during boot: {fault.line.strip()}", _tail(console))
    status = qemu.returncode
    if status is None:
        return None
    outside = qemu.interference()
    if outside is not None:
        return InfraError(f"{outside}, during boot")
    if console.bytes_read:
        return BootFailure(f"QEMU exited with status {status} during boot (guest reset or powered off)",
                           _tail(console))
    return QemuStartError(f"QEMU exited with status {status} before any console output", qemu.argv, qemu.output())


def boot_timeout(console: Console, budget: float) -> HarnessError:
    """The verdict at the boot deadline: no output at all is the host's problem, silence after output the kernel's."""
    if console.bytes_read == 0:
        return GuestUnreachable(
            f"guest unreachable: no console output and no command channel within {budget:.0f} s")
    return BootFailure(f"no userspace within {budget:.0f} s: the kernel printed {len(console.lines())} console "
                       f"lines, the command agent never answered", _tail(console))


def _tail(console: Console) -> tuple[str, ...]:
    return tuple(console.lines()[-_TAIL:])


class Machine:
    """One QEMU guest from launch to shutdown (see the module docstring for the phases)."""

    def __init__(self, plan: LaunchPlan, logdir: Path, name: str = "harness", sock_parent: Path | None = None,
                 console_log: str = "console.log", console_sink: Callable[[bytes], None] | None = None,
                 events: EventLog | None = None) -> None:
        self.plan = plan
        self.events = events
        self.name = name
        self.logdir = logdir
        self.console_path = logdir / console_log
        self._sock_parent = sock_parent
        self._sink = console_sink
        self._sockets: SocketDir | None = None
        self.channels = ChannelFactory()
        self.argv: list[str] = []
        self.qemu: QemuProcess | None = None
        self.qmp: QmpChannel | None = None
        self.console: Console | None = None
        self.agent: AgentSession | None = None   # the serial agent (always there)
        self.guest: GuestChannel | None = None   # what tests use: the agent, or SSH
        self.launched_at: float | None = None
        self.boot_seconds: float | None = None
        self.exit_status: int | None = None
        self.shutdown_notes: list[str] = []   # what went wrong on the way down (a failed QMP quit)
        self._exit_noted = False

    @property
    def sock_dir(self) -> Path | None:
        """The private directory while the VM exists (scratch disk images live there)."""
        return self._sockets.path if self._sockets is not None else None

    def __enter__(self) -> Machine:
        self.launch()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.shutdown()

    # -- launch --------------------------------------------------------------------

    def launch(self) -> None:
        """Start QEMU and connect console, command channel and QMP.

        Raises QemuStartError (with argv and QEMU's output) if QEMU cannot
        start, exits or never connects, InfraError if the channel set-up fails;
        everything started so far is stopped and removed first.
        """
        self.start()
        self.connect()

    def start(self) -> None:
        """The first half of `launch`: everything up to QEMU running (it has not
        connected yet). `connect` is the second half; in between, the caller may do
        other work while QEMU starts (the plugin collects the tests)."""
        try:
            self._pre_launch()
            self._launch()
        except BaseException:
            self.shutdown()
            raise

    def connect(self) -> None:
        """The second half of `launch`: accept QEMU's connections, start the console
        reader and the agent, negotiate QMP."""
        try:
            self._post_launch()
        except BaseException:
            self.shutdown()
            raise

    def _pre_launch(self) -> None:
        self.logdir.mkdir(parents=True, exist_ok=True)
        self._sockets = sockets = SocketDir(self.name, self._sock_parent)
        sockets.listen("console.sock", "channel.sock", "qmp.sock")
        sockets.scratch_disks(self.plan.profile.scratch_disks)
        if self.plan.channel == "ssh":
            from harness.ssh import channel_factory

            self.channels = channel_factory(self.plan.channel, sockets.path)
        plan = self.channels.prepare(self.plan)
        self.argv = plan.argv(sockets.path, self.name, self.channels.ssh_port)
        (self.logdir / "qemu-argv.json").write_text(json.dumps(self.argv, indent=1) + "\n")

    def _launch(self) -> None:
        self.launched_at = time.monotonic()
        self.qemu = QemuProcess(self.argv, self.logdir / f"qemu-{self.name}.log")
        self._step("qemu-started", f"QEMU started (pid {self.qemu.popen.pid}, {self.plan.profile.name}, "
                                   f"accel {self.plan.accel})", {"pid": self.qemu.popen.pid})

    def _post_launch(self) -> None:
        from harness.console import Console
        from harness.guest import AgentSession
        from harness.qmp import QmpChannel

        assert self._sockets is not None and self.qemu is not None
        assert self.launched_at is not None
        deadline = self.launched_at + START_DEADLINE
        console = self._sockets.accept("console.sock", "console", deadline, self.qemu)
        self.console = Console(console, self.console_path, self._sink, self.events)
        self.console.start(f"console-{self.name}")
        channel = self._sockets.accept("channel.sock", "command channel", deadline, self.qemu)
        self.agent = AgentSession(channel, self.logdir / f"channel-{self.name}.log",
                                  default_timeout=self.plan.profile.timeouts.command)
        self.qmp = QmpChannel(self.name, self.events)
        qmp_handshake(self.qmp, self._sockets.accept("qmp.sock", "QMP monitor", deadline, self.qemu), self.qemu,
                      deadline)
        self.guest = self.agent

    def qemu_output(self) -> str:
        return self.qemu.output() if self.qemu is not None else ""

    # -- boot ----------------------------------------------------------------------

    def console_lines(self) -> list[str]:
        return self.console.lines() if self.console is not None else []

    def wait_boot(self, timeout: float | None = None) -> GuestChannel:
        """Wait until the guest's command agent is up; returns the channel tests use.

        Raises the boot verdict (BootFailure, GuestUnreachable or QemuStartError:
        see `boot_error`, `boot_timeout`); InfraError if SSH does not come up.
        """
        assert self.agent is not None and self.console is not None and self.qemu is not None
        assert self.launched_at is not None
        budget = timeout if timeout is not None else self.plan.boot_deadline
        deadline = self.launched_at + budget
        try:
            wait_for_agent(self.agent, self.console, self.qemu, deadline, budget)
            self.guest = self.channels.open(self.agent, connect_timeout=max(5.0, deadline - time.monotonic()),
                                            default_timeout=self.plan.profile.timeouts.command)
        except BaseException as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            self._step("boot-failed", f"boot failed: {type(e).__name__}: {first}"[:300])
            raise
        self.boot_seconds = time.monotonic() - self.launched_at
        self._step("boot-detected", f"boot detected: userspace answered on the {self.plan.channel} channel "
                                    f"{self.boot_seconds:.2f} s after QEMU started",
                   {"boot_seconds": round(self.boot_seconds, 3)})
        return self.guest

    def _step(self, kind: str, text: str, data: dict[str, object] | None = None) -> None:
        if self.events is not None:
            self.events.emit(Source.HARNESS, kind, text, data)

    # -- shutdown ------------------------------------------------------------------

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop QEMU: QMP quit, then SIGTERM, then SIGKILL to its process group.

        Always cleans up channels, sockets, the console reader and the private
        directory. Never raises for a VM that is already gone; raises InfraError
        if QEMU survives SIGKILL. A failed QMP quit is noted in `shutdown_notes`.
        """
        budget = timeout if timeout is not None else self.plan.profile.timeouts.shutdown
        try:
            if self.qemu is not None:
                if self.qemu.running():
                    self._step("shutdown", "shutdown: QMP quit, then signals if QEMU stays")
                    if not self._soft_shutdown(self.qemu, budget):
                        self._hard_shutdown(self.qemu)
                self.exit_status = self.qemu.returncode
        finally:
            self._post_shutdown()

    def _soft_shutdown(self, qemu: QemuProcess, budget: float) -> bool:
        """Ask QEMU to quit and wait for it; False if it still runs after `budget` s."""
        if self.qmp is not None and self.qmp.negotiated:
            try:
                self.qmp.execute("quit", timeout=min(3.0, budget))
            except Exception as e:  # noqa: BLE001 - whatever failed, the hard path follows
                self.shutdown_notes.append(f"QMP quit failed ({type(e).__name__}: {e}); stopping QEMU with signals")
        return qemu.wait(budget)

    def _hard_shutdown(self, qemu: QemuProcess) -> None:
        if not qemu.stop(term_wait=2.0):
            raise InfraError(f"QEMU pid {qemu.popen.pid} survived SIGKILL")

    def _post_shutdown(self) -> None:
        if self.qemu is not None:
            # An interrupted shutdown (a second signal) still leaves no QEMU behind.
            self.qemu.stop(term_wait=None)
            if not self._exit_noted:
                self._exit_noted = True
                status = self.qemu.returncode
                how = (f"killed by {signal.Signals(-status).name}" if status is not None and status < 0
                       else f"exit status {status}")
                self._step("qemu-exited", f"QEMU gone ({how})", {"status": status})
        for part in (self.guest, self.agent, self.console):
            if part is not None:
                part.close()
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        if self._sockets is not None:
            self._sockets.remove()
            self._sockets = None
