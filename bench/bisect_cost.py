"""What `harness bisect` costs beyond the builds and runs it needs.

A 4-patch bisect (tests/data/series/bisect-fault-at-3: the runtime fault of
patch 3, seen by test_dma_bounces_through_swiotlb under coco-emulated) from
an empty artifact cache and an empty ccache, timed. Then, from another empty
cache and ccache, the same work by hand with the ordinary commands, in the
order the bisect took it: `harness build` of each prefix it tried (the first
one cold, the others incremental) and `harness run` of each. The bisect's
overhead is its time minus that sum; it must stay under 10% of the sum. The
bisect's own accounting (wall time against the seconds its steps spent in
builds and runs) is printed too: it does not depend on how busy the machine
was during the other half.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness.errors import Terminated
from harness.process import raise_on_sigterm, stop_group

REPO = Path(__file__).resolve().parent.parent
TARBALL = "/usr/src/linux-source-6.12.tar.xz"
SELECTION = ["--profile", "coco-emulated"]
TESTS = ["-k", "test_dma_bounces_through_swiotlb"]
LIMIT = 0.10


def timed(argv: list[str], env: dict[str, str], ok: tuple[int, ...] = (0,)) -> tuple[float, str]:
    """Run a harness command, timed. On Ctrl-C or SIGTERM it gets SIGTERM first, so it stops
    its build or VM itself, and the interrupt goes on (the work directory is removed)."""
    start = time.monotonic()
    child = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        out, err = child.communicate(timeout=4 * 3600)
    except BaseException:
        stop_group(child, term_wait=120.0)  # type: ignore[arg-type]
        raise
    if child.returncode not in ok:
        raise SystemExit(f"{' '.join(argv[2:5])} failed (exit {child.returncode}): {err[-1500:]}")
    return time.monotonic() - start, out


def fresh_env(work: Path, name: str) -> dict[str, str]:
    return dict(os.environ, HARNESS_CACHE=str(work / name / "cache"), CCACHE_DIR=str(work / name / "ccache"))


def prefix_series(series: Path, patches: list[Path], n: int, where: Path) -> Path:
    """A directory holding the first n patches of the series, in order (same bytes, same cache key)."""
    out = where / f"prefix-{n}"
    out.mkdir(parents=True)
    for i, patch in enumerate(patches[:n], 1):
        shutil.copyfile(patch, out / f"{i:04d}.patch")
    (out / "series").write_text("".join(f"{i:04d}.patch\n" for i in range(1, n + 1)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--series", type=Path, default=REPO / "tests" / "data" / "series" / "bisect-fault-at-3")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (caches, results)")
    args = ap.parse_args()
    raise_on_sigterm()
    harness = [sys.executable, "-m", "harness"]
    order = [line.split()[0] for line in (args.series / "series").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    patches = [(args.series / name).resolve() for name in order]
    work = Path(tempfile.mkdtemp(prefix="bench-bisect-", dir=os.environ.get("BENCH_DIR")))
    try:
        env = fresh_env(work, "bisect")
        wall, out = timed([*harness, "bisect", "--source", TARBALL, "--series", str(args.series), "--config", "base",
                           *SELECTION, *TESTS, "--results", str(work / "bisect" / "results"), "--json"], env)
        record: dict[str, Any] = json.loads(out)
        steps = record["steps"]
        inside = sum(s["build"]["seconds"] + sum(r["seconds"] for r in s["runs"]) for s in steps)
        print(f"bisect: {record['message']} in {len(steps)} steps, {wall:.1f} s wall", flush=True)

        env = fresh_env(work, "by-hand")
        rows = []
        for step in steps:
            n = step["target"]["index"]
            series = [] if n == 0 else ["--series", str(prefix_series(args.series, patches, n, work))]
            build, out = timed([*harness, "build", "--source", TARBALL, *series, "--config", "base", "--json"], env)
            artifact = json.loads(out)[0]["artifact"]
            run, _ = timed([*harness, "run", "--kernel", artifact, *SELECTION, "--results",
                            str(work / "by-hand" / "results"), "--", *TESTS], env, ok=(0, 1))
            rows.append((n, build, run))
            print(f"by hand: prefix {n}: build {build:7.1f} s, run {run:5.1f} s", flush=True)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    cold = rows[0][1]
    rest = sum(b + r for _, b, r in rows[1:]) + rows[0][2]
    reference = cold + rest
    overhead = wall - reference
    print()
    print(f"{len(patches)}-patch bisect, {len(steps)} steps, {os.cpu_count()} cores")
    print(f"one cold build:                                   {cold:8.1f} s")
    print(f"+ {len(steps)} runs and {len(steps) - 1} incremental builds by hand:        {rest:8.1f} s")
    print(f"= reference:                                      {reference:8.1f} s")
    print(f"harness bisect (wall):                            {wall:8.1f} s")
    print(f"overhead against the reference:                   {overhead:+8.1f} s  {overhead / reference:+.1%}")
    print(f"bisect's own steps (builds + runs it timed):      {inside:8.1f} s")
    print(f"bisect wall outside its builds and runs:          {wall - inside:8.1f} s  {(wall - inside) / wall:.1%}")
    if overhead / reference < LIMIT:
        print(f"PASS: overhead under {LIMIT:.0%} of the reference")
        return 0
    print(f"FAIL: overhead not under {LIMIT:.0%} of the reference")
    return 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit("bench/bisect: interrupted")
    except Terminated as e:
        print(f"bench/bisect: {e}", file=sys.stderr)
        sys.exit(128 + e.signum)
