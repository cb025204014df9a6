"""`harness export --kcidb`: runs and nights as KCIDB JSON, KernelCI's common results schema.

One document holds three kinds of object, linked by id:

- a checkout per kernel source: the source identity (a tarball's hash, a git
  commit, a Debian package) and the patchset hash, which KCIDB defines as the
  sha256 over the newline-terminated sha256 of each patch in order, the same
  hashes `harness-build.json` records for the series;
- a build per kernel artifact (or prebuilt image): config fragments, compiler,
  duration and the tail of build.log;
- a test per guest test per run: `coco.<module>.<test>[.<parameter>]`, its
  status (passed/failed/error/skipped -> PASS/FAIL/ERROR/SKIP, the same verdicts
  junit.xml carries), duration, the profile requested -> effective as its
  environment, and the failure message, dmesg error ids and the offending
  kernel lines in `log_excerpt` and `misc`.

Ids are `<origin>:` and a hash of what the object is (source identity and
patchset; kernel image sha256; build, run id and node id), so exporting the
same results again yields the same ids and a re-submission updates the objects
instead of adding copies. The schema version is the newest that kcidb-io
validates; every document is validated before it is written.

Log URLs: with `--log-url BASE` a file's URL is BASE/<its path relative to the
directory holding the exported RESULT or NIGHT>, i.e. BASE is where that
directory is published (a CI job's artifact URL). Without it no URLs are
written and `misc` keeps the paths.

The parts, in the order the data flows: `run` reads a run directory (the
`read_run` adapter) and finds a night's runs; `objects` makes the checkout,
build and test objects; `ids` the content-hash ids and names; `exporter`
collects them deduplicated; `document` validates and writes.
"""

from harness.kcidb.document import validate, write
from harness.kcidb.exporter import DEFAULT_ORIGIN, Exporter, export
from harness.kcidb.ids import kcidb_path, patchset_hash
from harness.kcidb.objects import BUILD_LOG_LINES, EXCERPT_MAX
from harness.kcidb.run import BOOT_LINES, BuildArtifact, RunView, TestResult, read_run, rfc3339

__all__ = [
    "BOOT_LINES", "BUILD_LOG_LINES", "DEFAULT_ORIGIN", "EXCERPT_MAX", "BuildArtifact", "Exporter", "RunView",
    "TestResult", "export", "kcidb_path", "patchset_hash", "read_run", "rfc3339", "validate", "write",
]
