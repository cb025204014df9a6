"""The build's one door to other programs (git, tar, cp, make, b4, the compiler).

Every call is an argument list, never a shell string, and has a deadline. The
program runs in its own process group: when the deadline passes, or the
harness is interrupted (Ctrl-C, SIGTERM turned into Terminated), the whole
group is killed, make's parallel jobs and compilers included.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.errors import InfraError

DEADLINE = 600.0
# Who the cached trees' commits are by; no signing, whatever the user's git config says.
_GIT_ID = ("-c", "user.name=harness", "-c", "user.email=harness@localhost", "-c", "commit.gpgsign=false")


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
            raise InfraError(f"{what} failed: {self.err.strip()[-200:]}")
        return self


def run(argv: Sequence[str], *, timeout: float = DEADLINE, cwd: Path | None = None, input: bytes | None = None,
        env: Mapping[str, str] | None = None, on_line: Callable[[str], None] | None = None) -> Ran:
    """Run `argv` to its end and return what it did, whatever its exit status.

    With `on_line`, stdout and stderr are merged and each line (without its
    newline) is handed over as it comes; the returned output is then empty.
    Raises InfraError (exit 3) if the program does not exist or is still
    running after `timeout` seconds.
    """
    try:
        proc = subprocess.Popen(list(argv), cwd=cwd, env=None if env is None else dict(env),
                                stdin=subprocess.DEVNULL if input is None else subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT if on_line else subprocess.PIPE,
                                start_new_session=True)
    except FileNotFoundError:
        raise InfraError(f"{argv[0]}: not found") from None
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


def git(tree: Path | None, *args: str, timeout: float = DEADLINE, input: bytes | None = None,
        env: Mapping[str, str] | None = None) -> Ran:
    """`git -C tree ARGS` (no -C for None) through `run`, as the harness's identity."""
    where = ("-C", str(tree)) if tree is not None else ()
    return run(["git", *_GIT_ID, *where, *args], timeout=timeout, input=input, env=env)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # already gone
