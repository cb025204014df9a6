"""The pytest child of `harness run`: how it is started, waited for and stopped.

The child (`python -m harness.pytest_main`, with the plugin) boots the VMs and
runs the guest tests; the runner owns the run directory around it. The child
lives in its own session and dies with the runner (PDEATHSIG).

`EarlyPytest` starts it before the run is planned: Python's and pytest's
start-up, the plugin's imports (QMP, the console, pexpect) and the guest
tests' imports take about half a second, as long as the probe and the plan;
started first, the child does them meanwhile and then waits (the plugin's
`--harness-plan-fd`) for the run directory, which it is given once plan.json
is there. The command line starts it before it even imports the runner.

This module imports little on purpose: that is what lets it start so early.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from harness.paths import cache_dir
from harness.process import SOCK_PREFIX, die_with_parent, stop_group

if TYPE_CHECKING:
    from harness.runner import RunRequest


def new_sock_parent() -> Path:
    """The run's private directory in TMPDIR, with the owner's pid (for `sweep_stale`)."""
    sock_parent = Path(tempfile.mkdtemp(prefix=SOCK_PREFIX))
    (sock_parent / "owner.pid").write_text(str(os.getpid()))
    return sock_parent


def pytest_child(tests: Path, pytest_args: list[str], run_dir: list[str], sock_parent: Path,
                 pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[bytes]:
    """The pytest child of a run; `run_dir` its --harness-run-dir (or --harness-plan-fd) arguments."""
    # Node ids under the test directory (a reproduced single test) replace the directory.
    targets = [] if any(a.startswith(str(tests) + os.sep) for a in pytest_args) else [str(tests)]
    # pytest's unraisableexception plugin runs the garbage collector over and over
    # when the session ends, to find exceptions raised in __del__: 20-45 ms of
    # every run, for warnings no guest test needs (Python still prints them).
    cmd = [sys.executable, "-m", "harness.pytest_main", "-p", "harness.pytest_plugin", "-p", "no:cacheprovider",
           "-p", "no:unraisableexception", *run_dir, "-q", "--tb=short", "--no-header", "--rootdir", str(tests),
           *targets, *pytest_args]
    # The child's TMPDIR is the run's private directory, removed at the end,
    # so nothing pytest or xdist create there outlives the run. Its bytecode
    # (the harness's modules, and the guest tests as pytest rewrote their
    # asserts) goes to the cache, never beside the sources: compiling and
    # rewriting all of it again cost every run about 0.2 s.
    env = dict(os.environ, HARNESS_SOCK_DIR=str(sock_parent), HARNESS_MACHINE_PREFIX=sock_parent.name,
               TMPDIR=str(sock_parent))
    env.setdefault("PYTHONPYCACHEPREFIX", str(cache_dir() / "pycache"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    # Called from inside a pytest-xdist worker (a CI job's own tests), the
    # worker's identity must not leak into our pytest: it names the consoles.
    for var in [v for v in env if v.startswith("PYTEST_XDIST_") or v == "PYTEST_CURRENT_TEST"]:
        del env[var]
    return subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=die_with_parent,
                            stdin=subprocess.DEVNULL, pass_fds=pass_fds)


def wait_exit(child: subprocess.Popen[bytes], timeout: float) -> int:
    """Popen.wait(timeout), without its polling: that looks every 50 ms, so a run
    noticed its tests had ended 25 ms late on average. A pidfd wakes us at once."""
    try:
        fd = os.pidfd_open(child.pid)
    except (AttributeError, OSError):
        return child.wait(timeout=timeout)
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
    finally:
        os.close(fd)
    if not ready:
        raise subprocess.TimeoutExpired(child.args, timeout)
    return child.wait()


def wait_pytest(child: subprocess.Popen[bytes], timeout: float, run_dir: Path) -> int:
    """The child's exit status; past `timeout` s it is stopped and the status is -1."""
    try:
        return wait_exit(child, timeout)
    except subprocess.TimeoutExpired:
        # SIGTERM first: the fixtures in the child stop their VMs.
        stop_group(child, term_wait=20.0)
        (run_dir / "timeout.txt").write_text(f"guest tests exceeded --timeout {timeout:.0f} s\n")
        return -1
    except BaseException:
        stop_group(child, term_wait=20.0)
        raise


class EarlyPytest:
    """The pytest child, started before the run is planned; a runner.Launcher.

    If the run ends before it gets the run directory (bad input, an interrupt,
    a run that needs no local pytest), `stop` stops it.
    """

    def __init__(self, tests: Path, pytest_args: list[str]) -> None:
        self.tests, self.pytest_args = tests, list(pytest_args)
        self.sock_parent = new_sock_parent()
        read, self._write = os.pipe()
        try:
            self.child = pytest_child(tests, pytest_args, ["--harness-plan-fd", str(read)], self.sock_parent,
                                      (read,))
        except BaseException:
            os.close(self._write)
            shutil.rmtree(self.sock_parent, ignore_errors=True)
            raise
        finally:
            os.close(read)

    def runs(self, tests: Path, pytest_args: list[str]) -> bool:
        """Whether this child was started for these tests and arguments."""
        return (tests, list(pytest_args)) == (self.tests, self.pytest_args)

    def __call__(self, req: RunRequest, run_dir: Path, sock_parent: Path) -> int:
        fd, self._write = self._write, -1
        try:
            os.write(fd, os.fsencode(run_dir) + b"\n")  # a path is far below PIPE_BUF: one write
        except BrokenPipeError:
            pass  # the child is gone already (pytest refused its arguments): its exit status says why
        finally:
            os.close(fd)
        return wait_pytest(self.child, req.timeout, run_dir)

    def stop(self) -> None:
        """Stop the child if the run never got to it, and close the pipe (idempotent).

        Stopped before the pipe closes: a pytest that reads EOF would say so on stderr,
        after the runner's own one-line error."""
        if self.child.poll() is None:
            stop_group(self.child, term_wait=5.0)
        if self._write >= 0:
            os.close(self._write)
            self._write = -1
        shutil.rmtree(self.sock_parent, ignore_errors=True)
