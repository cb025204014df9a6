"""Golden files of the exact QEMU argv per profile.

Regenerate with HARNESS_REGEN_GOLDEN=1 after an intended change, and review the diff.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from harness.plan import build_argv
from harness.profiles import available, load_profile

GOLDEN = Path(__file__).parent / "golden"


@pytest.mark.parametrize("name", available())
@pytest.mark.parametrize("accel", ["tcg", "kvm"])
def test_argv_matches_golden(name: str, accel: str) -> None:
    argv = build_argv("qemu-system-x86_64", load_profile(name), accel, Path("/k/bzImage"), Path("/k/initrd.cpio"),
                      "console=ttyS0", "/sock", "harness-main")
    path = GOLDEN / f"{name}-{accel}.argv.json"
    if os.environ.get("HARNESS_REGEN_GOLDEN"):
        path.write_text(json.dumps(argv, indent=1) + "\n")
    assert argv == json.loads(path.read_text()), f"argv changed; regenerate with HARNESS_REGEN_GOLDEN=1 ({path})"


def test_argv_is_a_list_of_separate_words() -> None:
    argv = build_argv("qemu", load_profile("emulated"), "tcg", Path("/k"), Path("/i"),
                      "console=ttyS0 rdinit=/x y", "/s", "n")
    assert argv[argv.index("-append") + 1] == "console=ttyS0 rdinit=/x y"
    assert argv[argv.index("-machine") + 1] == "q35,accel=tcg"
