"""The guest command channel: what guest tests use, and the agent's implementation.

`GuestChannel` is the face every channel shows (run, check, put, get);
`AgentSession` runs commands over a channel the kernel log never touches:
a port of its own (a virtio-serial port, or the guest's second serial port
ttyS1: harness.channel), driven with pexpect; the kernel's console is ttyS0.
The guest side is `guestfs/harness-agent.c`; its protocol frames stdout,
stderr and the exit status with per-command tokens, so output is never
mistaken for a marker and never mixed with printk.
"""

from __future__ import annotations

import base64
import gzip
import math
import os
import re
import shlex
import socket
import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from harness.errors import GuestUnresponsive

if TYPE_CHECKING:
    from harness.plan import LaunchPlan

_CHUNK = 32 * 1024


@dataclass(frozen=True)
class CommandResult:
    command: str
    exit_code: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class CommandFailed(AssertionError):
    """A guest command given check=True exited non-zero (an assertion about the guest)."""

    def __init__(self, result: CommandResult) -> None:
        detail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        super().__init__(f"guest command {short(result.command)} exited {result.exit_code}: "
                         + " | ".join(detail))
        self.result = result


class GuestChannel:
    """What guest tests use, whatever carries it (serial agent or SSH).

    Subclasses implement `run`; the rest is built on it.
    """

    default_timeout: float = 60.0
    closed: bool = False
    _klog: list[str] | None = None  # the kernel log's lines read so far (kernel_lines)

    def run(self, command: str, timeout: float | None = None, check: bool = False) -> CommandResult:
        raise NotImplementedError

    def check(self, command: str, timeout: float | None = None) -> str:
        """Run a command that must succeed; returns its stdout. Raises CommandFailed."""
        return self.run(command, timeout, check=True).stdout

    def read_text(self, path: str) -> str:
        return self.check(f"cat {shlex.quote(path)}")

    def put(self, data: bytes, remote: str, mode: int = 0o644) -> None:
        """Write bytes to a file in the guest."""
        self.check(f": > {shlex.quote(remote)}")
        for i in range(0, len(data), _CHUNK):
            chunk = base64.b64encode(data[i:i + _CHUNK]).decode()
            self.check(f"echo {chunk} | base64 -d >> {shlex.quote(remote)}")
        self.check(f"chmod {mode:o} {shlex.quote(remote)}")

    def get(self, remote: str) -> bytes:
        """Read a file from the guest."""
        return base64.b64decode(self.check(f"base64 {shlex.quote(remote)}"))

    def kernel_lines(self, timeout: float | None = None, check: bool = False) -> list[str]:
        """The kernel log as it stands now, as `dmesg` prints it, a line each. Read a part at a
        time: a call fetches only the lines after those the channel already has (a log that
        shrank, cleared by `dmesg -c`, is read whole again). A dmesg that fails gives no new lines,
        or with check=True raises CommandFailed."""
        if self._klog is None:
            self._klog = []
        known = self._klog
        total, new = self._kernel_log_since(len(known), timeout, check)
        if total < len(known):
            total, new = self._kernel_log_since(0, timeout, check)
            known.clear()
        known.extend(new)
        return list(known)

    def _kernel_log_since(self, first: int, timeout: float | None, check: bool) -> tuple[int, list[str]]:
        """The number of lines in the kernel log and its lines after the first `first`."""
        lines = log_lines(self._shell_kernel_log(timeout, check).stdout)
        return len(lines), lines[first:]

    def kernel_log(self, timeout: float | None = None, check: bool = False) -> CommandResult:
        """`dmesg` (see `_shell_kernel_log`)."""
        return self._shell_kernel_log(timeout, check)

    def _shell_kernel_log(self, timeout: float | None = None, check: bool = False) -> CommandResult:
        """`dmesg`, compressed in the guest for the trip: the serial port moves a 21 KB log in
        70-80 ms under TCG, gzip -1 and base64 bring that to about 50 ms. The result's stdout
        is the log's text. Where dmesg fails, or the guest lacks gzip or base64, it is plain
        `dmesg`'s result (its error included). check=True raises CommandFailed as `run`."""
        packed = self.run('log=$(dmesg) && printf "%s\\n" "$log" | gzip -1 | base64', timeout)
        try:
            # No gzip in the guest: base64 of nothing, not a gzip stream (never empty).
            raw = base64.b64decode(packed.stdout) if packed.ok else b""
            if raw:
                return replace(packed, command="dmesg", stdout=gzip.decompress(raw).decode("utf-8", "replace"))
        except (ValueError, OSError, EOFError):
            pass
        return self.run("dmesg", timeout, check=check)

    def close(self) -> None:
        pass


class Transcript:
    """The channel's transcript file. A full or read-only results disk ends the
    transcript (`error` says why), never the command that was being logged."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.error: str | None = None
        try:
            self._file: BinaryIO | None = open(path, "ab")
        except OSError as e:
            self._file, self.error = None, f"{path}: {e.strerror}"

    def write(self, data: bytes) -> None:
        if self._file is None:
            return
        try:
            self._file.write(data)
        except OSError as e:
            self.error = f"{self.path}: {e.strerror} (transcript cut here)"
            self.close()

    def flush(self) -> None:
        if self._file is not None:
            try:
                self._file.flush()
            except OSError as e:
                self.error = f"{self.path}: {e.strerror} (transcript cut here)"
                self.close()

    def close(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except OSError as e:
                self.error = f"{self.path}: {e.strerror} (transcript cut here)"


class AgentSession(GuestChannel):
    """The agent's command channel (its port's socket): commands, file transfer, the agent's release string."""

    def __init__(self, sock: socket.socket, transcript: Path | None = None,
                 default_timeout: float = 60.0) -> None:
        import pexpect.fdpexpect  # here: a machine starts QEMU before it needs it

        self._sock = sock
        self._log: Transcript | None = Transcript(transcript) if transcript else None
        self._child = pexpect.fdpexpect.fdspawn(sock.fileno(), timeout=default_timeout,
                                                logfile=self._log)
        self._prefix = os.urandom(3).hex()  # not secrets: its hmac import starts OpenSSL
        self._seq = 0
        self.default_timeout = default_timeout
        self.release: str | None = None
        self._broken: str | None = None
        self.closed = False

    def wait_ready(self, timeout: float) -> bool:
        """True once the agent announced itself (`@@READY <release>`).

        False on timeout, and also once the channel is closed (`closed` tells).
        """
        import pexpect

        if self.release is not None:
            return True
        if self.closed:
            return False
        try:
            self._child.expect(rb"@@READY (\S+)\n", timeout=timeout)
        except pexpect.TIMEOUT:
            return False
        except (pexpect.EOF, OSError):
            # A QEMU killed with unread input on its socket resets the connection
            # (ECONNRESET) instead of closing it: the same end of the channel.
            self.closed = True
            return False
        self.release = self._child.match.group(1).decode()
        return True

    def run(self, command: str, timeout: float | None = None, check: bool = False) -> CommandResult:
        """Run a shell command in the guest; returns exit code, stdout and stderr.

        The guest kills the command after `timeout` seconds (exit code 137);
        if the guest does not answer a few seconds after that, the session is
        broken and GuestUnresponsive is raised (now and for every later call).
        With check=True a non-zero exit raises CommandFailed.
        """
        return self._request(base64.b64encode(command.encode()).decode(), command, timeout, check)

    def _request(self, payload: str, command: str, timeout: float | None, check: bool) -> CommandResult:
        """One request: `payload` a script's base64 or one of the agent's own commands (`!...`)."""
        import pexpect

        if self._broken:
            raise GuestUnresponsive(self._broken)
        limit = self.default_timeout if timeout is None else timeout
        self._seq += 1
        token = f"{self._prefix}{self._seq}".encode()
        start = time.monotonic()
        try:
            self._child.send(f"{token.decode()} {max(1, math.ceil(limit))} {payload}\n".encode())
            self._child.expect(re.escape(b"@@E" + token + b" ") + rb"(\d+)\n", timeout=limit + 10)
        except pexpect.TIMEOUT:
            self._broken = (f"guest did not answer {short(command)} within {limit + 10:.0f} s "
                            "(command channel stuck: kernel hang?)")
            raise GuestUnresponsive(self._broken) from None
        except (pexpect.EOF, OSError):
            # EOF, or ECONNRESET/EPIPE when QEMU went away with bytes unread on its socket.
            self._broken = f"command channel closed while running {short(command)} (guest died?)"
            raise GuestUnresponsive(self._broken) from None
        rc = int(self._child.match.group(1))
        raw: bytes = self._child.before
        begin = raw.rfind(b"@@B" + token + b"\n")
        body = raw[begin + len(token) + 4:] if begin >= 0 else raw
        out, _, err = body.partition(b"\n@@M" + token + b"\n")
        result = CommandResult(
            command=command, exit_code=rc,
            stdout=out.decode("utf-8", "replace"),
            stderr=err[:-1].decode("utf-8", "replace") if err.endswith(b"\n") else err.decode(
                "utf-8", "replace"),
            seconds=time.monotonic() - start,
        )
        if check and rc != 0:
            raise CommandFailed(result)
        return result

    def _agent_klog(self, first: int, timeout: float | None) -> tuple[int, str] | None:
        """The agent's own read of the kernel log (`!klog`, harness-agent.c: no program started
        in the guest, the text compressed for the trip): the number of its lines and the text
        after the first `first`; None if the agent could not."""
        result = self._request(f"!klog {first}", "dmesg (the agent's !klog)", timeout, False)
        head, _, packed = result.stdout.partition("\n")
        if result.ok and head.isdigit():
            try:
                return int(head), zlib.decompress(base64.b64decode(packed)).decode("utf-8", "replace")
            except (ValueError, zlib.error):
                pass
        return None

    def _kernel_log_since(self, first: int, timeout: float | None, check: bool) -> tuple[int, list[str]]:
        read = self._agent_klog(first, timeout)
        if read is None:
            return super()._kernel_log_since(first, timeout, check)
        return read[0], log_lines(read[1])

    def kernel_log(self, timeout: float | None = None, check: bool = False) -> CommandResult:
        start = time.monotonic()
        read = self._agent_klog(0, timeout)
        if read is None:
            return self._shell_kernel_log(timeout, check)
        return CommandResult("dmesg", 0, read[1], "", time.monotonic() - start)

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        try:
            self._sock.close()
        except OSError:
            pass


class ChannelFactory:
    """How the guest channel of one of our VMs comes about: here, the agent itself.

    The agent (on ttyS1 or a virtio-serial port) is there in every guest: its greeting is how a boot ends.
    A factory for another channel (harness.ssh) prepares the launch before QEMU
    starts and, once the agent has answered, opens the channel that tests use.
    """

    ssh_port: int | None = None   # the host port QEMU forwards to the guest's port 22

    def prepare(self, plan: LaunchPlan) -> LaunchPlan:
        """The plan to launch (another initrd, say); files go in the VM's private directory."""
        return plan

    def open(self, agent: AgentSession, connect_timeout: float, default_timeout: float) -> GuestChannel:
        """The channel tests use, once the agent has answered. Raises InfraError."""
        return agent


def log_lines(text: str) -> list[str]:
    """A kernel log's lines, split at newlines only (as `wc -l` and `tail` count them; a form
    feed or a carriage return in a message does not end its line)."""
    lines = text.split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def short(command: str, limit: int = 80) -> str:
    """A command as error messages quote it: a long one is cut."""
    text = command if len(command) <= limit else command[:limit] + f"... ({len(command)} chars)"
    return repr(text)
