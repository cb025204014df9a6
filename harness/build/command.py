"""The build's git: every git call of the build, as the harness's identity.

Programs run through `harness.process.run`, the one door (an argument list, a
deadline, the whole process group killed when it passes or the harness is
interrupted); DEADLINE is the build's default for them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from harness.process import Ran, run

__all__ = ["DEADLINE", "Ran", "git", "run"]

DEADLINE = 600.0
# Who the cached trees' commits are by; no signing, whatever the user's git config says.
_GIT_ID = ("-c", "user.name=harness", "-c", "user.email=harness@localhost", "-c", "commit.gpgsign=false")


def git(tree: Path | None, *args: str, timeout: float = DEADLINE, input: bytes | None = None,
        env: Mapping[str, str] | None = None) -> Ran:
    """`git -C tree ARGS` (no -C for None) through `run`, as the harness's identity."""
    where = ("-C", str(tree)) if tree is not None else ()
    return run(["git", *_GIT_ID, *where, *args], timeout=timeout, input=input, env=env)
