"""SSH as a command channel: to our own QEMU guests (dropbear in the initramfs,
QEMU user networking) and to remote targets (a lab box, a cloud CVM).

Keys are per run: a fresh client key pair, and for our own guests a fresh host
key that the client pins (RejectPolicy: any other host key is refused).
`channel_factory` is how a Machine gets its guest channel: the serial agent,
or SSH set up around the launch (`SshChannelFactory`).
"""

from __future__ import annotations

import shlex
import shutil
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from harness import process
from harness.errors import BadInput, GuestUnresponsive, InfraError
from harness.guest import AgentSession, ChannelFactory, CommandFailed, CommandResult, GuestChannel, short
from harness.initramfs import ssh_overlay

if TYPE_CHECKING:
    from harness.plan import LaunchPlan


@dataclass(frozen=True)
class SshTarget:
    user: str
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"ssh://{self.user}@{self.host}:{self.port}"


def parse_target(url: str) -> SshTarget:
    """ssh://user@host[:port] -> SshTarget. Raises BadInput."""
    parsed = urlparse(url)
    if parsed.scheme != "ssh" or not parsed.hostname or not parsed.username:
        raise BadInput(f"--target {url!r}: expected ssh://user@host[:port]")
    try:
        port = parsed.port or 22
    except ValueError:
        raise BadInput(f"--target {url!r}: bad port") from None
    return SshTarget(parsed.username, parsed.hostname, port)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class GuestKeys:
    """Per-run keys for one of our guests: files in the VM's private directory."""

    client_key: Path        # private key (PEM) the harness logs in with
    authorized_key: str     # its public half, for the guest's authorized_keys
    host_key: Path          # the guest's dropbear host key
    host_key_public: str    # "ssh-ed25519 AAAA..." pinned by the client


def make_guest_keys(directory: Path) -> GuestKeys:
    """Generate a client key pair and a dropbear host key. Raises InfraError."""
    dropbearkey = shutil.which("dropbearkey")
    if dropbearkey is None:
        raise InfraError("dropbearkey not found: install the dropbear-bin package for the ssh channel")
    import paramiko  # here, not at the top: a serial-channel run never loads it (a tenth of a second)

    client = paramiko.ECDSAKey.generate(bits=256)
    client_path = directory / "client_key"
    client.write_private_key_file(str(client_path))
    client_path.chmod(0o600)
    host_path = directory / "host_key"
    process.run([dropbearkey, "-t", "ed25519", "-f", str(host_path)], timeout=30).check("dropbearkey")
    out = process.run([dropbearkey, "-y", "-f", str(host_path)], timeout=30).check("dropbearkey").out
    public = next(line for line in out.splitlines() if line.startswith("ssh-"))
    return GuestKeys(client_path, f"{client.get_name()} {client.get_base64()} harness", host_path,
                     " ".join(public.split()[:2]))


class SshSession(GuestChannel):
    """Commands over SSH (paramiko), with the same face as the serial AgentSession."""

    def __init__(self, target: SshTarget, key_file: Path, host_key: str | None = None,
                 known_hosts: Path | None = None, connect_timeout: float = 30.0,
                 default_timeout: float = 60.0) -> None:
        import paramiko

        self.target = target
        self.default_timeout = default_timeout
        self._client = paramiko.SSHClient()
        self._client.set_missing_host_key_policy(paramiko.RejectPolicy())
        if host_key is not None:
            kind, blob = host_key.split()[:2]
            name = target.host if target.port == 22 else f"[{target.host}]:{target.port}"
            self._client.get_host_keys().add(name, kind, paramiko.PKey.from_type_string(kind, _b64(blob)))
        elif known_hosts is not None:
            try:
                self._client.load_host_keys(str(known_hosts))
            except OSError as e:
                raise BadInput(f"--known-hosts {known_hosts}: {e.strerror}") from None
        else:
            self._client.load_system_host_keys()
        self._key_file = key_file
        self._connect(connect_timeout)

    def _connect(self, budget: float) -> None:
        import paramiko

        deadline = time.monotonic() + budget
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                self._client.connect(self.target.host, self.target.port, self.target.user,
                                     key_filename=str(self._key_file), timeout=5, banner_timeout=10,
                                     auth_timeout=10, allow_agent=False, look_for_keys=False)
                return
            except paramiko.BadHostKeyException as e:
                raise InfraError(f"{self.target.url}: host key does not match the pinned key ({e})") from None
            except paramiko.SSHException as e:
                if "not found in known_hosts" in str(e) or "Server" in str(e) and "not found" in str(e):
                    raise InfraError(f"{self.target.url}: host key not pinned ({e})") from None
                last = e
            except (OSError, EOFError) as e:
                last = e
            time.sleep(0.2)
        raise InfraError(f"{self.target.url}: no SSH session within {budget:.0f} s: {last}")

    def run(self, command: str, timeout: float | None = None, check: bool = False) -> CommandResult:
        """Run a shell command over SSH; killed in the guest after `timeout` s (exit 137).

        Raises GuestUnresponsive if the session dies or does not answer in time.
        """
        import paramiko

        if self.closed:
            raise GuestUnresponsive(f"{self.target.url}: session closed")
        limit = self.default_timeout if timeout is None else timeout
        # `; exit $?` keeps the remote shell in between: a command killed at the
        # deadline then ends with status 137 (as on the serial agent), not with
        # an SSH exit-signal that paramiko reports as -1.
        wrapped = f"timeout -s KILL {max(1, int(limit + 0.999))} sh -c {shlex.quote(command)}; exit $?"
        start = time.monotonic()
        try:
            _, stdout, stderr = self._client.exec_command(wrapped, timeout=limit + 10)
            out = stdout.read()
            err = stderr.read()
            rc = stdout.channel.recv_exit_status()
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise GuestUnresponsive(f"{self.target.url}: {short(command)}: {e or type(e).__name__}") from None
        result = CommandResult(command, rc, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"),
                               time.monotonic() - start)
        if check and rc != 0:
            raise CommandFailed(result)
        return result

    def put(self, data: bytes, remote: str, mode: int = 0o644) -> None:
        """Write bytes to a remote file through the session's stdin (no size limit)."""
        self._stream(f"cat > {shlex.quote(remote)} && chmod {mode:o} {shlex.quote(remote)}", data)

    def get(self, remote: str) -> bytes:
        return self._stream(f"cat {shlex.quote(remote)}", None)

    def _stream(self, command: str, data: bytes | None) -> bytes:
        import paramiko

        try:
            stdin, stdout, stderr = self._client.exec_command(command, timeout=self.default_timeout)
            if data is not None:
                stdin.write(data)
            stdin.channel.shutdown_write()
            out = stdout.read()
            err = stderr.read()
            rc = stdout.channel.recv_exit_status()
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise GuestUnresponsive(f"{self.target.url}: {short(command)}: {e or type(e).__name__}") from None
        if rc != 0:
            raise CommandFailed(CommandResult(command, rc, "", err.decode("utf-8", "replace"), 0.0))
        return bytes(out)

    def close(self) -> None:
        self.closed = True
        self._client.close()


class SshChannelFactory(ChannelFactory):
    """SSH to one of our guests: per-run keys, the initrd that carries them, a forwarded port.

    The serial agent still tells when the guest is up; SSH replaces it as the
    channel tests use once it has answered.
    """

    def __init__(self, private_dir: Path) -> None:
        self._dir = private_dir
        self.keys = make_guest_keys(private_dir)
        self.ssh_port = self._port = free_port()

    def prepare(self, plan: LaunchPlan) -> LaunchPlan:
        # The keys ride in a cpio appended to the cached image, in the private
        # directory: the kernel unpacks concatenated archives in order.
        initrd = self._dir / "initrd.cpio"
        initrd.write_bytes(plan.initrd.read_bytes() + ssh_overlay(self.keys.authorized_key, self.keys.host_key))
        return replace(plan, initrd=initrd)

    def open(self, agent: AgentSession, connect_timeout: float, default_timeout: float) -> GuestChannel:
        return SshSession(SshTarget("root", "127.0.0.1", self._port), self.keys.client_key,
                          host_key=self.keys.host_key_public, connect_timeout=connect_timeout,
                          default_timeout=default_timeout)


def channel_factory(channel: str, private_dir: Path) -> ChannelFactory:
    """The factory for a plan's `channel` (serial or ssh). Raises InfraError (no dropbearkey)."""
    return SshChannelFactory(private_dir) if channel == "ssh" else ChannelFactory()


def _b64(text: str) -> bytes:
    import base64

    return base64.b64decode(text)
