"""The pytest child of `harness run`: `python -m harness.pytest_main ARGS` is `python -m pytest ARGS`
that leaves without tearing the interpreter down.

Once pytest.main has returned, the session is over: every VM is stopped, every
result file written and closed (atomic writes, fsynced). Freeing the objects
and modules of pytest, asyncio, QMP and the rest then took 0.13-0.2 s of
every run, after the last test, for nothing; os._exit skips it. Output is
flushed first.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
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
