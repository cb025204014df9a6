"""Machine: owns one QEMU process, its sockets, console log and QMP channel.

Lifecycle: `launch()` -> `wait_boot()` -> AgentSession -> `shutdown()`.
Use it as a context manager: shutdown (soft: QMP quit; hard: SIGKILL to the
process group) and cleanup of the private socket directory always run.
"""

from __future__ import annotations

import json
import shlex
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import TracebackType

from harness.console import BootScanner, split_lines
from harness.errors import BootFailure, GuestUnreachable, InfraError, QemuStartError
from harness.guest import AgentSession, GuestChannel
from harness.initramfs import ssh_overlay
from harness.plan import LaunchPlan
from harness.process import die_with_parent, stop_group
from harness.qmp import QmpChannel
from harness.ssh import GuestKeys, SshSession, SshTarget, free_port, make_guest_keys

_TAIL = 40


def scratch_bytes(size: str) -> int:
    """`64M`, `1G` or a number of MiB, in bytes."""
    text = size.strip().upper().removesuffix("B")
    scale = {"M": 1 << 20, "G": 1 << 30}.get(text[-1:])
    return int(text[:-1]) * scale if scale else int(text) << 20


class Machine:
    def __init__(
        self,
        plan: LaunchPlan,
        logdir: Path,
        name: str = "harness",
        sock_parent: Path | None = None,
        console_log: str = "console.log",
        console_sink: Callable[[bytes], None] | None = None,
    ) -> None:
        self.plan = plan
        self.name = name
        self.logdir = logdir
        self.console_path = logdir / console_log
        self._sock_parent = sock_parent
        self._sink = console_sink
        self.sock_dir: Path | None = None
        self.argv: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp: QmpChannel | None = None
        self.agent: AgentSession | None = None   # the serial agent (always there)
        self.guest: GuestChannel | None = None   # what tests use: the agent, or SSH
        self.ssh_port: int | None = None
        self._keys: GuestKeys | None = None
        self.console: socket.socket | None = None
        self._listeners: list[socket.socket] = []
        self._reader: threading.Thread | None = None
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._scanner = BootScanner()
        self._console_bytes = 0
        self.boot_seconds: float | None = None
        self.launched_at: float | None = None
        self.exit_status: int | None = None

    # -- lifecycle -----------------------------------------------------------------

    def __enter__(self) -> Machine:
        self.launch()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.shutdown()

    def launch(self) -> None:
        """Start QEMU and connect console, command channel and QMP.

        Raises QemuStartError (with argv and QEMU's output) if QEMU exits or
        never connects; everything started so far is cleaned up first.
        """
        try:
            self._launch()
        except BaseException:
            self.shutdown()
            raise

    def _listen(self, path: Path) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        sock.listen(1)
        self._listeners.append(sock)
        return sock

    def _launch(self) -> None:
        self.logdir.mkdir(parents=True, exist_ok=True)
        if self._sock_parent is not None:
            self._sock_parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Private (0700) directory for the sockets: nobody else may talk to QMP.
        self.sock_dir = Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir=self._sock_parent))
        console_l = self._listen(self.sock_dir / "console.sock")
        channel_l = self._listen(self.sock_dir / "channel.sock")
        self.qmp = QmpChannel(self.name)
        self.qmp.start_server(str(self.sock_dir / "qmp.sock"))
        plan = self.plan
        for disk in plan.profile.scratch_disks:
            node, _, size = disk.partition(":")
            with open(self.sock_dir / f"{node}.img", "wb") as f:
                f.truncate(scratch_bytes(size))
        if plan.channel == "ssh":
            # Per-run keys ride in a cpio appended to the cached image, in the
            # private directory: the kernel unpacks concatenated archives in order.
            self._keys = make_guest_keys(self.sock_dir)
            initrd = self.sock_dir / "initrd.cpio"
            initrd.write_bytes(plan.initrd.read_bytes()
                               + ssh_overlay(self._keys.authorized_key, self._keys.host_key))
            plan = replace(plan, initrd=initrd)
            self.ssh_port = free_port()
        self.argv = plan.argv(self.sock_dir, self.name, self.ssh_port)
        (self.logdir / "qemu-argv.json").write_text(json.dumps(self.argv, indent=1) + "\n")
        self._stderr_path = self.logdir / f"qemu-{self.name}.log"
        stderr = open(self._stderr_path, "wb")
        try:
            self.launched_at = time.monotonic()
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                start_new_session=True, preexec_fn=die_with_parent,
            )
        except OSError as e:
            raise QemuStartError(f"cannot start QEMU: {e.strerror}", self.argv, "") from None
        finally:
            stderr.close()
        self.console = self._accept(console_l, "console")
        channel = self._accept(channel_l, "command channel")
        try:
            self.qmp.accept(timeout=self._remaining(10))
        except Exception:  # noqa: BLE001 - qemu.qmp raises ConnectError, EOFError, timeouts...
            self._wait_exit(1.0)
            if self.proc.poll() is not None:
                self._raise_start_error(f"QEMU exited with status {self.proc.returncode} during start-up")
            self._raise_start_error("QEMU did not complete the QMP handshake")
        self._reader = threading.Thread(target=self._read_console, name=f"console-{self.name}",
                                        daemon=True)
        self._reader.start()
        self.agent = AgentSession(channel, self.logdir / f"channel-{self.name}.log",
                                  default_timeout=self.plan.profile.timeouts.command)
        self.guest = self.agent

    def _remaining(self, budget: float) -> float:
        assert self.launched_at is not None
        return max(0.1, self.launched_at + budget - time.monotonic())

    def _accept(self, listener: socket.socket, what: str) -> socket.socket:
        deadline = time.monotonic() + 10
        listener.settimeout(0.05)
        while True:
            try:
                conn, _ = listener.accept()
                conn.settimeout(None)
                return conn
            except TimeoutError:
                pass
            if self.proc is not None and self.proc.poll() is not None:
                self._raise_start_error(f"QEMU exited with status {self.proc.returncode} during start-up")
            if time.monotonic() > deadline:
                self._raise_start_error(f"QEMU did not connect its {what} within 10 s")

    def qemu_output(self) -> str:
        try:
            return self._stderr_path.read_text(errors="replace")
        except (OSError, AttributeError):
            return ""

    def _raise_start_error(self, message: str) -> None:
        raise QemuStartError(message, self.argv, self.qemu_output())

    def _read_console(self) -> None:
        assert self.console is not None
        pending = b""
        with open(self.console_path, "ab", buffering=0) as log:
            while True:
                try:
                    data = self.console.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    break
                # Tee first, parse second: the raw bytes are on disk before any
                # decision is taken on them.
                log.write(data)
                if self._sink is not None:
                    self._sink(data)
                lines, pending = split_lines(pending + data)
                with self._lock:
                    self._console_bytes += len(data)
                    for line in lines:
                        self._lines.append(line)
                        self._scanner.feed(line)
            if pending:
                with self._lock:
                    self._lines.append(pending.decode("utf-8", "replace"))
                    self._scanner.feed(self._lines[-1])

    # -- boot ----------------------------------------------------------------------

    def console_lines(self) -> list[str]:
        with self._lock:
            return list(self._lines)

    def wait_boot(self, timeout: float | None = None) -> GuestChannel:
        """Wait until the guest's command agent is up.

        Raises BootFailure (kernel fault: panic, oops, reset, QEMU exit after
        the kernel printed, or no userspace in time) or GuestUnreachable (no
        console output at all by the deadline).
        """
        assert self.agent is not None and self.proc is not None and self.launched_at is not None
        budget = timeout if timeout is not None else self.plan.boot_deadline
        deadline = self.launched_at + budget
        while True:
            fault = self._scanner.fault
            if fault is not None:
                # Give QEMU a moment to print the rest of the trace and exit.
                self._wait_exit(2.0)
                raise BootFailure(f"kernel {fault.kind} during boot: {fault.line.strip()}",
                                  tuple(self.console_lines()[-_TAIL:]))
            if self.agent.closed:
                # QEMU closed the channel: it is exiting. Let the console drain.
                self._wait_exit(2.0)
            if self.proc.poll() is not None:
                self._reader_done(1.0)
                if self._scanner.fault is not None:
                    continue
                self._after_exit()
            if self.agent.wait_ready(0.05):
                if self._keys is not None and self.ssh_port is not None:
                    self.guest = SshSession(
                        SshTarget("root", "127.0.0.1", self.ssh_port), self._keys.client_key,
                        host_key=self._keys.host_key_public, connect_timeout=max(5.0, deadline - time.monotonic()),
                        default_timeout=self.plan.profile.timeouts.command)
                self.boot_seconds = time.monotonic() - self.launched_at
                assert self.guest is not None
                return self.guest
            if time.monotonic() > deadline:
                lines = tuple(self.console_lines()[-_TAIL:])
                if self._console_bytes == 0:
                    raise GuestUnreachable(
                        f"guest unreachable: no console output and no command channel within {budget:.0f} s")
                raise BootFailure(
                    f"no userspace within {budget:.0f} s: the kernel printed {len(self.console_lines())} "
                    f"console lines, the command agent never answered", lines)

    def _after_exit(self) -> None:
        assert self.proc is not None
        self.exit_status = self.proc.returncode
        if self._scanner.fault is not None:
            return  # the loop reports the fault with its own message
        lines = tuple(self.console_lines()[-_TAIL:])
        if self._console_bytes:
            raise BootFailure(f"QEMU exited with status {self.proc.returncode} during boot "
                              f"(guest reset or powered off)", lines)
        raise QemuStartError(f"QEMU exited with status {self.proc.returncode} before any console output",
                             self.argv, self.qemu_output())

    def _reader_done(self, timeout: float) -> None:
        if self._reader is not None:
            self._reader.join(timeout)

    def _wait_exit(self, timeout: float) -> None:
        assert self.proc is not None
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        self._reader_done(0.5)

    # -- shutdown ------------------------------------------------------------------

    def shutdown(self, timeout: float | None = None) -> None:
        """Stop QEMU: QMP quit, then SIGTERM, then SIGKILL to its process group.

        Always cleans up sockets, threads and the private directory. Never raises
        for a VM that is already gone.
        """
        budget = timeout if timeout is not None else self.plan.profile.timeouts.shutdown
        try:
            if self.proc is not None and self.proc.poll() is None:
                if self.qmp is not None and self.agent is not None:
                    try:
                        self.qmp.execute("quit", timeout=min(3.0, budget))
                    except Exception:  # noqa: BLE001 - falls through to the hard path
                        pass
                self._stop_process(budget)
            if self.proc is not None:
                self.exit_status = self.proc.returncode
        finally:
            self._cleanup()

    def _stop_process(self, budget: float) -> None:
        assert self.proc is not None
        try:
            self.proc.wait(budget)
            return
        except subprocess.TimeoutExpired:
            pass
        if not stop_group(self.proc, term_wait=2.0):
            raise InfraError(f"QEMU pid {self.proc.pid} survived SIGKILL")

    def _cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            stop_group(self.proc, term_wait=None)
        for session in (self.guest, self.agent):
            if session is not None:
                session.close()
        for sock in [*self._listeners, *([self.console] if self.console else [])]:
            try:
                # shutdown() wakes a reader blocked in recv(); close() alone does not.
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                sock.close()
            except OSError:
                pass
        self._reader_done(2.0)
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        if self.sock_dir is not None:
            shutil.rmtree(self.sock_dir, ignore_errors=True)
            self.sock_dir = None

    def describe(self) -> str:
        return shlex.join(self.argv)
