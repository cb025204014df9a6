"""Shared fixtures for the harness's own tests.

`cli` runs the real `harness` command in a subprocess with a private TMPDIR
and results root, and afterwards checks the process table and the TMPDIR: a
QEMU process or socket directory left behind fails the test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from harness.kernel import PREBUILT_KERNEL, Kernel, resolve_kernel
from harness.process import processes

REPO = Path(__file__).resolve().parent.parent


def qemu_processes_mentioning(text: str) -> list[str]:
    found = []
    for pid, argv in processes():
        line = b" ".join(argv).decode(errors="replace")
        if "qemu-system" in line and text in line:
            found.append(f"{pid}: {line[:200]}")
    return found


@dataclass
class Cli:
    tmp: Path
    results: Path

    def env(self) -> dict[str, str]:
        # The prebuilt Debian kernel unless a test names another: the sample
        # build (the README's default) has its own tests in test_build.py.
        env = {"HARNESS_KERNEL": PREBUILT_KERNEL, **os.environ}
        env.update(TMPDIR=str(self.tmp), PYTHONDONTWRITEBYTECODE="1")
        return env

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "harness", *args]

    def __call__(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*args), env=self.env(), cwd=REPO, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def run_dirs(self) -> list[Path]:
        if not self.results.is_dir():
            return []
        return sorted(p for p in self.results.iterdir() if (p / "meta.json").exists())

    def sigkill_once_booting(self, *args: str, console_glob: str) -> None:
        """Start `harness ARGS`, SIGKILL it once a console.log matching the glob exists,
        and assert that every QEMU it started dies with it (PDEATHSIG)."""
        proc = subprocess.Popen(self.argv(*args), env=self.env(), cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not list(self.results.glob(console_glob)):
            assert time.monotonic() < deadline and proc.poll() is None, "it never started booting"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 15
        while qemu_processes_mentioning(str(self.tmp)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not qemu_processes_mentioning(str(self.tmp))

    def only_run(self) -> Path:
        dirs = self.run_dirs()
        assert len(dirs) == 1, dirs
        return dirs[0]


def check_golden(argv: list[str], path: Path) -> None:
    """`argv` is the golden file's; HARNESS_REGEN_GOLDEN=1 writes it instead (review the diff)."""
    if os.environ.get("HARNESS_REGEN_GOLDEN"):
        path.write_text(json.dumps(argv, indent=1) + "\n")
    assert argv == json.loads(path.read_text()), f"argv changed; regenerate with HARNESS_REGEN_GOLDEN=1 ({path})"


def write_meta_json(run: Path, meta: dict[str, object]) -> None:
    """A hand-written meta.json with only the keys the reader under test needs."""
    (run / "meta.json").write_text(json.dumps(meta))


def meta(run_dir: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((run_dir / "meta.json").read_text())
    return data


@pytest.fixture
def cli() -> Iterator[Cli]:
    # Short paths: unix socket paths must stay under 108 bytes.
    tmp = Path(tempfile.mkdtemp(prefix="ht-", dir="/tmp"))
    (tmp / "t").mkdir()
    c = Cli(tmp / "t", tmp / "results")
    try:
        yield c
        deadline = time.monotonic() + 5
        while qemu_processes_mentioning(str(tmp)) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = qemu_processes_mentioning(str(tmp))
        assert not left, f"QEMU left running: {left}"
        leftovers = [p.name for p in (tmp / "t").iterdir()]
        assert not leftovers, f"left in TMPDIR: {leftovers}"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def debian_kernel() -> Kernel:
    """The default kernel (a real Debian cloud kernel, cached after the first download)."""
    return resolve_kernel(PREBUILT_KERNEL)
