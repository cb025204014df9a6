"""The two things a Machine owns below the guest: its private socket directory and the QEMU process.

`SocketDir` is the 0700 directory with the listening sockets QEMU connects to
(console, channel, QMP) and the scratch disk images; `QemuProcess` is QEMU in
its own session, dying with its owner, with its output in a log and the
verdicts on how it ended (a start error that carries the argv and QEMU's own
words, a stop or kill from outside).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from harness.errors import QemuStartError
from harness.process import die_with_parent, stop_group
from harness.profiles import size_mib

START_DEADLINE = 10.0   # from QEMU's start to its last connection and the QMP handshake


class SocketDir:
    """The VM's private (0700) directory: QEMU's sockets, scratch images, per-run keys.

    We listen here before QEMU starts and QEMU connects as a client: it does so
    while it sets up, before the guest runs one instruction, so not a byte of
    console is lost (a listening QEMU drops what the guest prints before we
    connect, unless told to stop and wait for us), and a QEMU that dies at
    start-up shows as an exit, not as a connect timeout. 0700: nobody else on
    the host may talk to QMP or type into the guest.
    """

    def __init__(self, name: str, parent: Path | None) -> None:
        if parent is not None:
            parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=parent))
        self._listeners: dict[str, socket.socket] = {}

    def listen(self, *names: str) -> None:
        """Listen on a unix socket of each name in the directory."""
        for name in names:
            sock = self._listeners[name] = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(str(self.path / name))
            sock.listen(1)

    def accept(self, name: str, what: str, deadline: float, qemu: QemuProcess) -> socket.socket:
        """QEMU's connection to `name`. Raises QemuStartError once QEMU exited or the deadline passed."""
        listener = self._listeners[name]
        listener.settimeout(0.05)
        while qemu.running() and time.monotonic() < deadline:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(None)
            return conn
        raise qemu.start_error(f"QEMU did not connect its {what} within {START_DEADLINE:.0f} s")

    def scratch_disks(self, specs: tuple[str, ...]) -> None:
        """An empty (sparse) disk image `<node>`.img for each of the profile's `<node>:<size>` scratch drives."""
        for spec in specs:
            node, _, size = spec.partition(":")
            with open(self.path / f"{node}.img", "wb") as f:
                f.truncate(size_mib(size, f"scratch disk {spec}") << 20)

    def remove(self) -> None:
        for sock in self._listeners.values():
            sock.close()
        self._listeners.clear()
        shutil.rmtree(self.path, ignore_errors=True)


class QemuProcess:
    """A started QEMU: its own session (a group stop reaches all of it), dying
    with its owner (PDEATHSIG, even on SIGKILL), its stdout and stderr in `log`.

    Raises QemuStartError if the program cannot be started at all.
    """

    def __init__(self, argv: list[str], log: Path) -> None:
        self.argv = argv
        self.log = log
        self._stopping = False  # set once the harness itself stops QEMU
        with open(log, "wb") as out:
            try:
                self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                              start_new_session=True, preexec_fn=die_with_parent)
            except OSError as e:
                raise QemuStartError(f"cannot start QEMU: {e.strerror}", argv, "") from None

    @property
    def returncode(self) -> int | None:
        """QEMU's exit status, None while it runs."""
        return self.popen.poll()

    def running(self) -> bool:
        return self.popen.poll() is None

    def wait(self, timeout: float) -> bool:
        """True once QEMU has exited, waiting up to `timeout` s for it."""
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def start_error(self, message: str) -> QemuStartError:
        """`message`, or QEMU's exit status if it has exited; with argv and QEMU's output."""
        if self.returncode is not None:
            message = f"QEMU exited with status {self.returncode} during start-up"
        return QemuStartError(message, self.argv, self.output())

    def stop(self, term_wait: float | None) -> bool:
        """SIGTERM (unless term_wait is None), then SIGKILL to QEMU's process group.

        True once QEMU is gone; False if it survived SIGKILL.
        """
        self._stopping = True
        return not self.running() or stop_group(self.popen, term_wait)

    def interference(self) -> str | None:
        """Why QEMU cannot answer for reasons outside the kernel under test, if so.

        A guest that panics, resets or powers off makes QEMU exit with a status
        of its own (0 with -no-reboot); a negative status is a signal that the
        harness did not send (the OOM killer, a user's kill -9, QEMU's own
        crash), and a stopped QEMU (SIGSTOP) runs no guest at all. Either is
        infrastructure, never the kernel's failure.
        """
        status = self.returncode
        if status is not None:
            if status < 0 and not self._stopping:
                return (f"QEMU died of signal {signal.Signals(-status).name} that the harness did not send "
                        "(OOM killer, a kill from outside, or a QEMU crash)")
            return None
        try:
            state = Path(f"/proc/{self.popen.pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        except (OSError, IndexError):
            return None
        return "QEMU is stopped (SIGSTOP from outside the harness): the guest cannot run" if state in "Tt" else None
