"""A test harness for Linux kernels in confidential-computing guests."""

import os
import sys

__version__ = "0.1.0"


def cache_root() -> str:
    """The artifact cache's path (harness.paths.cache_dir makes it): `HARNESS_CACHE`, else
    `$XDG_CACHE_HOME/coco-harness`."""
    return os.environ.get("HARNESS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "coco-harness")


# The harness's bytecode lives in the cache, never beside the sources, and is
# written even where PYTHONDONTWRITEBYTECODE is set (CI machines, containers):
# compiling the modules a `harness run` imports took it 0.1 s on every run.
# The pytest child gets the same through PYTHONPYCACHEPREFIX (harness.pytest_child).
if sys.pycache_prefix is None:
    sys.pycache_prefix = os.path.join(cache_root(), "pycache")
    sys.dont_write_bytecode = False
