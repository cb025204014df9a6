"""Processes the harness starts, stops and outlives: one place for each rule.

- Parent death: QEMU and the pytest child die with the process that owns them
  (PDEATHSIG), even when that process is SIGKILLed and no `finally` runs.
- Liveness: which processes are alive, which QEMUs belong to a run (by their
  `-name`), and sweeping the socket directories of runs whose owner died.
- Stopping: SIGTERM to a process group, then SIGKILL.
- Signals: SIGTERM raised as `errors.Terminated`, so cleanup in `finally` runs.
- Short-lived helpers (`run`): argument lists only, a deadline always, failures
  mapped to the harness's error types; `version_line` remembers what a
  program's `--version` said.
"""

from __future__ import annotations

import ctypes
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from harness.errors import InfraError, Terminated
from harness.paths import memo_get, memo_put

_PR_SET_PDEATHSIG = 1

SOCK_PREFIX = "harness-"
"""Prefix of a run's private socket directory in TMPDIR (it holds `owner.pid`)."""

DEFAULT_TIMEOUT = 60.0


def die_with_parent() -> None:
    """`preexec_fn` for children that must not outlive the process that owns them."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def alive(pid: int) -> bool:
    """A running process. A zombie is dead: an owner killed with its parent may
    wait a while for a reaper, and kill(pid, 0) still succeeds on it."""
    try:
        os.kill(pid, 0)
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (ProcessLookupError, FileNotFoundError):
        return False
    except PermissionError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def processes() -> Iterator[tuple[int, list[bytes]]]:
    """(pid, argv) of every process this user can see."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                yield int(proc.name), (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue


def kill_machines(prefix: str) -> list[int]:
    """SIGKILL every QEMU whose -name starts with `prefix-`. Returns the pids."""
    killed = []
    for pid, argv in processes():
        if b"-name" in argv:
            i = argv.index(b"-name")
            if i + 1 < len(argv) and argv[i + 1].startswith(prefix.encode() + b"-"):
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
    return killed


def sweep_stale(tmp: Path | None = None) -> None:
    """Remove socket directories of harness runs whose owner died (SIGKILL), and their QEMUs."""
    base = tmp or Path(tempfile.gettempdir())
    for d in base.glob(f"{SOCK_PREFIX}*"):
        try:
            if alive(int((d / "owner.pid").read_text())):
                continue
        except (OSError, ValueError):
            # No owner.pid yet: a run that is starting right now, unless it is old.
            if time.time() - d.stat().st_mtime < 60:
                continue
        kill_machines(d.name)
        shutil.rmtree(d, ignore_errors=True)


def stop_group(proc: subprocess.Popen[bytes], term_wait: float | None, kill_wait: float = 10.0) -> bool:
    """Stop the process group led by `proc` (started with start_new_session).

    SIGTERM, then SIGKILL once `term_wait` seconds pass (term_wait=None: SIGKILL
    at once). True once the leader is gone and reaped; False if it survived
    SIGKILL for `kill_wait` seconds (stuck in the kernel).
    """
    steps = ((signal.SIGTERM, term_wait),) if term_wait is not None else ()
    for sig, wait in (*steps, (signal.SIGKILL, kill_wait)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return True
        try:
            proc.wait(wait)
            return True
        except subprocess.TimeoutExpired:
            continue
    return False


def raise_on_sigterm() -> Callable[[], None]:
    """From now on SIGTERM raises `Terminated` in the main thread, so `finally`
    blocks (stopping VMs, writing meta.json) run. Returns a function that puts
    the previous handler back."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Terminated(signum)

    previous = signal.signal(signal.SIGTERM, handler)

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous)

    return restore


@dataclass(frozen=True)
class Ran:
    """A finished program: its exit status and what it wrote."""

    argv: tuple[str, ...]
    status: int
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        return self.status == 0

    @property
    def out(self) -> str:
        return self.stdout.decode("utf-8", "replace")

    @property
    def err(self) -> str:
        return self.stderr.decode("utf-8", "replace")

    def check(self, what: str) -> Ran:
        """Itself if it succeeded; else InfraError '<what> failed: <end of stderr>'."""
        if not self.ok:
            raise InfraError(f"{what} failed: {self.err.strip()[-200:] or f'exit status {self.status}'}")
        return self


def run(argv: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT, cwd: Path | None = None,
        input: bytes | None = None, env: Mapping[str, str] | None = None,
        on_line: Callable[[str], None] | None = None) -> Ran:
    """The harness's one door to short-lived programs (git, make, the compiler,
    QEMU's queries, apt, dropbearkey...): an argument list, never a shell string,
    and a deadline always.

    The program runs in its own process group: when the deadline passes, or the
    harness is interrupted (Ctrl-C, SIGTERM turned into Terminated), the whole
    group is killed (make's parallel jobs and compilers included). Returns what
    it did whatever its exit status (`.check(what)` turns a failure into
    InfraError). With `on_line`, stdout and stderr are merged and each line
    (without its newline) is handed over as it comes; the returned output is
    then empty. Raises InfraError (exit 3) if the program does not exist or
    cannot start, or is still running after `timeout` seconds.
    """
    try:
        proc = subprocess.Popen(list(argv), cwd=cwd, env=None if env is None else dict(env),
                                stdin=subprocess.DEVNULL if input is None else subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT if on_line else subprocess.PIPE,
                                start_new_session=True)
    except FileNotFoundError:
        raise InfraError(f"{argv[0]}: not found") from None
    except OSError as e:
        raise InfraError(f"cannot run {argv[0]}: {e.strerror}") from None
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        _kill_group(proc)

    timer = threading.Timer(timeout, expire)
    timer.start()
    try:
        out, err = b"", b""
        if on_line is None:
            out, err = proc.communicate(input)
        else:
            assert proc.stdout is not None
            for raw in proc.stdout:
                on_line(raw.decode("utf-8", "replace").rstrip("\n"))
            proc.wait()
    except BaseException:
        _kill_group(proc)
        proc.wait()
        raise
    finally:
        timer.cancel()
        timer.join()
    if expired.is_set() and proc.returncode == -signal.SIGKILL:
        raise InfraError(f"{shlex.join(argv)}: still running after {timeout:.0f}s, killed")
    return Ran(tuple(argv), proc.returncode, out, err)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # already gone


VERSIONS = "tools/versions.json"  # version_line's memo in the cache


def version_line(program: str) -> str:
    """The first line of `program --version` ("unknown" if it printed nothing), kept in the cache per
    program file (its real path, size and mtime): asking cost a run 5-300 ms for each program (a
    process start, more on a busy host), and an upgrade replaces the file. Raises InfraError as `run`."""
    path = shutil.which(program) or program
    try:
        st = os.stat(path)
        real = os.path.realpath(path)
        key = f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        real = key = ""
    if real:
        kept = memo_get(VERSIONS, real, key)
        if isinstance(kept, str):
            return kept
    out = run([path, "--version"], timeout=30).out
    version = out.splitlines()[0] if out else "unknown"
    if real:
        memo_put(VERSIONS, real, key, version)
    return version
