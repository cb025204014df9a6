"""Kernel builds: a source, a patch series and config fragments -> a cached artifact.

One module per stage: `spec` (the YAML a user writes), `series` (patches),
`kconfig` (fragments and the dropped-option check), `source` (the source's
identity and its git copy in the cache), `history` (a cached clone with history,
where a bisect over a git range builds), `make` (toolchain, make and its
output), `kernelbuild` (the make phases: configure, compile, per-patch,
collect), `pipeline` (`build`: cache key, lock, publish). Every program they
start goes through `command`.
"""

from __future__ import annotations

from harness.build.artifact import ARTIFACT_META, FORMAT
from harness.build.history import HistoryRepo, open_history
from harness.build.kconfig import Dropped, Fragment, dropped_options, load_fragment, parse_fragment, read_config
from harness.build.kernelbuild import BuildFailed, PatchStep
from harness.build.make import ARCH, first_errors, toolchain, warnings_of
from harness.build.pipeline import BuildResult, build, build_checkout
from harness.build.series import Patch, load_series
from harness.build.source import CachedTree, Source, import_tree, resolve_source
from harness.build.spec import BuildSpec, load_spec

__all__ = [
    "ARCH", "ARTIFACT_META", "FORMAT", "BuildFailed", "BuildResult", "BuildSpec", "CachedTree", "Dropped",
    "Fragment", "HistoryRepo", "Patch", "PatchStep", "Source", "build", "build_checkout", "dropped_options",
    "first_errors", "import_tree", "load_fragment", "load_series", "load_spec", "open_history", "parse_fragment",
    "read_config", "resolve_source", "toolchain", "warnings_of",
]
