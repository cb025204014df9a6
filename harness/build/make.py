"""Kernel make: the toolchain, the argv, a run with its progress, and its output read.

Builds are out of tree (O=) with the build user, host and timestamp fixed, so
the same inputs give the same version banner, and with ccache when there is one.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from harness.build.command import DEADLINE, run
from harness.build.progress import Plan, Status, Terminal, object_of, plain_line, status, step_of
from harness.errors import InfraError
from harness.process import version_line

ARCH = "x86_64"
# A deadline that only a hung build reaches: a cold defconfig on 2 cores is well under it.
COMPILE_DEADLINE = 6 * 3600.0
_TOOLS = ("gcc", "make", "flex", "bison", "bc", "perl", "git")
_HEADERS = (("/usr/include/libelf.h", "libelf-dev"), ("/usr/include/openssl/ssl.h", "libssl-dev"))

Progress = Callable[[str], None]


def toolchain() -> dict[str, str]:
    """Compiler and make versions; InfraError (exit 3) naming every missing piece."""
    missing = [tool for tool in _TOOLS if shutil.which(tool) is None]
    for header, package in _HEADERS:
        if not Path(header).exists():
            missing.append(package)
    if missing:
        raise InfraError(f"kernel build toolchain incomplete: missing {', '.join(missing)}")
    versions = {}
    for tool in ("gcc", "make"):
        versions[tool] = version_line(tool)
    versions["ccache"] = "yes" if shutil.which("ccache") else "no"
    return versions


def make_args(tree: Path, out: Path, jobs: int | None = None) -> list[str]:
    args = ["make", "-C", str(tree), f"O={out}", f"ARCH={ARCH}", "KBUILD_BUILD_USER=harness",
            "KBUILD_BUILD_HOST=harness", "KBUILD_BUILD_TIMESTAMP=Thu Jan  1 00:00:00 UTC 2026"]
    if not (tree / ".git").exists():
        # kbuild's setlocalversion appends "+" to the release of a git tree that is not at
        # a release tag. The harness's imported trees were such repositories (6.12.117+)
        # until they became plain trees: keep the release they gave, which says what
        # the kernel is (not a release build, maybe patched) and keeps old runs comparable.
        args.append("LOCALVERSION=+")
    if shutil.which("ccache"):
        args.append("CC=ccache gcc")
    if jobs:
        args.append(f"-j{jobs}")
    return args


def make_env(cache: bool = True) -> dict[str, str]:
    """make's environment: ours, with ccache in depend mode unless the user chose a mode.

    ccache's default mode runs the preprocessor on every miss to hash its output:
    a cold build pays for every file twice (ccache's manual: 5-20% on misses). In
    depend mode it hashes the source and the headers the compiler's own
    dependency file lists (kbuild always passes -Wp,-MMD), so a miss costs next
    to nothing more than the compile, and a hit needs the same headers unchanged.

    cache=False: ccache only runs the compiler (CCACHE_DISABLE), for the first compile
    in an O= directory. ccache could hit there only if this same directory had been
    built and removed before (there is one per source and options, and the options
    are in every object's autoconf.h); its misses cost about 5% more CPU here
    (0.7-7% in four side-by-side runs), up to 11% more wall time.
    Later builds in that directory recompile only what changed, with ccache. The
    command line stays `ccache gcc`, so kbuild sees no changed command and rebuilds
    nothing for it. CCACHE_NODISABLE=1 fills the cache anyway."""
    env = dict(os.environ)
    if "CCACHE_DEPEND" not in env and "CCACHE_NODEPEND" not in env:
        env["CCACHE_DEPEND"] = "1"
    if not cache and "CCACHE_NODISABLE" not in env:
        env["CCACHE_DISABLE"] = "1"
    return env


class Meter:
    """What a running make has done: the compiled objects (with when), the step it is
    on, and the plan it is measured against (worked out by `plan`, which the ticker
    calls in its own thread, so a slow count never delays make)."""

    def __init__(self, label: str, plan: Callable[[], Plan] | None = None) -> None:
        self.label = label
        self.start = time.monotonic()
        self.times: list[float] = []
        self.step = ""
        self.plan = Plan(None, "")
        self._plan_fn = plan

    def feed(self, line: str) -> None:
        if object_of(line):
            self.times.append(time.monotonic() - self.start)
        step = step_of(line)
        if step:
            self.step = step

    def work_out_plan(self) -> None:
        if self._plan_fn is not None:
            self.plan = self._plan_fn()

    def status(self) -> Status:
        return status(self.label, self.plan, len(self.times), time.monotonic() - self.start, self.step,
                      self.times[-1] if self.times else None)


def run_make(args: list[str], log: Path, label: str, progress: Progress,
             timeout: float = DEADLINE, meter: Meter | None = None, cache: bool = True) -> tuple[int, list[str]]:
    """Run make, append its output to `log`, and report progress: on a terminal
    (`progress` a `Terminal`) a bar redrawn every second, else a line every 10 s.

    Returns (exit status, lines of this run). Raises InfraError if make is
    still running after `timeout` seconds. `cache`: see `make_env`.
    """
    lines: list[str] = []
    meter = meter or Meter(label)
    with open(log, "a") as f, _Ticker(meter, progress):
        f.write(f"\n### {label}: {' '.join(args)}\n")

        def take(line: str) -> None:
            f.write(line + "\n")
            lines.append(line)
            meter.feed(line)

        status = run(args, timeout=timeout, on_line=take, env=make_env(cache)).status
    return status, lines


class _Ticker:
    """While make runs: its progress, as a bar on a terminal (every second) or as a
    plain line (every 10 s). Owns its thread; leaving the `with` block stops and joins it."""

    LINE_EVERY = 10.0

    def __init__(self, meter: Meter, progress: Progress) -> None:
        self._meter = meter
        self._progress = progress
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._report, name=f"make {meter.label}", daemon=True)

    def __enter__(self) -> _Ticker:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._done.set()
        self._thread.join()

    def _report(self) -> None:
        terminal = self._progress if isinstance(self._progress, Terminal) else None
        try:
            self._meter.work_out_plan()
        except Exception:  # noqa: BLE001 - an estimate that fails must not stop the build or print a traceback
            pass    # no total then: the count and the time so far are still shown
        every = 1.0 if terminal else self.LINE_EVERY
        try:
            while not self._done.wait(every):
                if terminal:
                    terminal.show(self._meter.status())
                else:
                    self._progress(plain_line(self._meter.status()))
        finally:
            if terminal:
                terminal.clear()


def first_errors(lines: list[str], limit: int = 8) -> list[str]:
    """The compiler's and make's error lines (else the last lines) of a failed run."""
    errors = [x for x in lines if ": error:" in x or ": fatal error:" in x or "Error " in x and "make" in x]
    return errors[:limit] or lines[-limit:]


def warnings_of(lines: list[str]) -> set[str]:
    """Compiler warnings with line/column numbers dropped (a patch shifts them)."""
    found = set()
    for line in lines:
        if ": warning:" in line:
            found.add(re.sub(r":\d+:\d+:", ":", line.strip()))
    return found
