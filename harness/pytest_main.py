"""The pytest child of `harness run`: `python -m harness.pytest_main ARGS` is `python -m pytest ARGS`
that starts booting its VM before it imports pytest (harness.pytest_boot) and leaves without
tearing the interpreter down.

Once pytest.main has returned, the session is over: every VM is stopped, every
result file written and closed (atomic writes, fsynced). Freeing the objects
and modules of pytest, asyncio, QMP and the rest then took 0.13-0.2 s of
every run, after the last test, for nothing; os._exit skips it. Output is
flushed first.
"""

from __future__ import annotations

import os
import sys


def _early_boot(argv: list[str]) -> list[str]:
    """Start the VM's early boot (harness.pytest_boot) if this pytest runs its tests itself;
    returns the arguments for pytest (the plan pipe is then the early boot's)."""
    from harness import pytest_boot

    for option in ("--harness-plan-fd", "--harness-run-dir"):
        if option in argv[:-1]:
            break
    else:
        return argv
    if not pytest_boot.single_process(argv, os.environ.get("PYTEST_ADDOPTS", "")):
        return argv
    i = argv.index(option)
    value = argv[i + 1]
    if option == "--harness-plan-fd":
        pytest_boot.current = pytest_boot.EarlyBoot(fd=int(value))
        return [*argv[:i], *argv[i + 2:]]
    pytest_boot.current = pytest_boot.EarlyBoot(run_dir=value)
    return argv


def _wait_imported() -> None:
    """Until the early boot has its imports (see harness.pytest_boot), at most a second."""
    from harness import pytest_boot

    if pytest_boot.current is not None:
        pytest_boot.current.imported.wait(1.0)


def main() -> None:
    sys.argv[1:] = _early_boot(sys.argv[1:])
    _wait_imported()
    import pytest

    sys.argv[0] = "pytest"  # what pytest's usage lines call the program
    code = 1
    try:
        code = int(pytest.main())
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:
        code = 1  # as `python -m pytest` does when its output is gone (EPIPE)
    finally:
        os._exit(code)


if __name__ == "__main__":
    main()
