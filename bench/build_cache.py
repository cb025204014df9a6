"""Kernel builds against plain make, side by side on the same tree, config and cores.

Each repetition runs, in rotating order:

- plain make: `make O=<fresh dir> -jN bzImage` on the same source tree (imported
  once, untimed, by the harness's own import, with the series applied) with the
  same .config (made the harness's way: base target, fragments, olddefconfig);
  no ccache, as a developer would run it.
- harness cold: `harness build SPEC` with an empty cache (import included) and an
  empty ccache (CCACHE_DIR fresh: ccache on, as the harness ships, with nothing
  in it). Its phases (import, apply, configure, compile, collect) come from the
  artifact's harness-build.json.
- harness warm tree: the source already imported, nothing compiled for this
  configuration (the artifact and its O= directory removed, a fresh CCACHE_DIR):
  what a new series that does not change Kconfig costs on a source and
  fragments the harness has seen (its .config comes from the cache's configs/).

With `--before CHECKOUT`, an earlier checkout's harness is timed the same way in
the same repetitions (before and after, side by side). Then, once per harness:
the same inputs again (a cache hit), and after editing one patch of the series
(an incremental rebuild). Prints each run, the medians, and each median's ratio
to plain make's, of wall time and of CPU time (user + system of all processes).
The machine may be loaded by other work: read the ratios, measured side by
side, not the absolute times; CPU time is the less disturbed by other load.

Nothing is deleted while a repetition runs: what a run leaves (an O= directory,
a cache) is moved aside and deleted after the repetition, followed by a pause
(`--settle`, default 60 s). On a guest whose freed memory goes back to the
hypervisor (virtio-balloon free page reporting, as on our 2-core machines), the
gigabytes of page cache a deletion frees must be faulted back in by whatever
writes next: `tar -x` of linux-source-6.12 took 36-50 s (sys time 35-50 s)
right after deleting a kernel tree, 11 s without one, 8 s a minute later. A
deletion just before a timed run would charge that to the run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from harness.build import load_fragment, load_series, load_spec, resolve_source  # noqa: E402
from harness.build.source import import_tree  # noqa: E402


class Timed:
    """Wall and CPU seconds (user + system of every process it started) of one run."""

    def __init__(self, wall: float, cpu: float) -> None:
        self.wall, self.cpu = wall, cpu

    def __str__(self) -> str:
        return f"{self.wall:6.1f}s (cpu {self.cpu:6.1f}s)"


def timed(argv: list[str], env: dict[str, str], cwd: Path = REPO) -> tuple[Timed, str]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=7200,
                          stdin=subprocess.DEVNULL)
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{argv[:4]} failed: {proc.stdout[-1000:]} {proc.stderr[-1500:]}")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return Timed(wall, cpu), proc.stdout


class Harness:
    """One checkout of the harness whose `harness build` is timed: this one, or an earlier one."""

    def __init__(self, name: str, checkout: Path) -> None:
        self.name = name
        self.checkout = checkout
        self.cold: list[Timed] = []
        self.warm: list[Timed] = []
        self.phases: list[dict[str, float]] = []
        self.warm_phases: list[dict[str, float]] = []
        self.cache = Path()

    def build(self, spec: Path, env: dict[str, str]) -> tuple[Timed, Path]:
        # Run from the checkout: `python -m harness` imports that checkout's package.
        seconds, out = timed([sys.executable, "-m", "harness", "build", "--json", str(spec)], env, self.checkout)
        return seconds, Path(json.loads(out)[0]["artifact"])


class Bench:
    def __init__(self, spec_path: Path, work: Path, harnesses: list[Harness], settle: float) -> None:
        self.spec_path = spec_path
        self.spec = load_spec(spec_path)
        self.work = work
        self.trash = work / "trash"
        self.settle = settle
        self.jobs = os.cpu_count() or 1
        self.harnesses = harnesses
        self.plain_runs: list[Timed] = []
        self.release = ""

    def prepare(self) -> None:
        """The reference tree (imported the harness's way, the series applied) and its .config."""
        ref = self.work / "ref"
        ref.mkdir()
        env_cache = os.environ.get("HARNESS_CACHE")
        os.environ["HARNESS_CACHE"] = str(ref / "cache")   # the tarball's hash is remembered here
        try:
            tree = import_tree(resolve_source(self.spec.source), ref)
        finally:
            if env_cache is None:
                os.environ.pop("HARNESS_CACHE")
            else:
                os.environ["HARNESS_CACHE"] = env_cache
        self.tree = tree.path
        for patch in load_series(self.spec.series, self.work):
            subprocess.run(["git", "-C", str(self.tree), "apply", "-"], input=patch.data, check=True)
        fragments = [load_fragment(name) for name in self.spec.configs]
        base = next((f.base for f in fragments if f.base), "tinyconfig")
        cfg = self.work / "config-out"
        self.make(cfg, base)
        with open(cfg / ".config", "a") as f:
            for frag in fragments:
                f.write(f"\n{frag.text}\n")
        self.make(cfg, "olddefconfig")
        self.config = cfg / ".config"

    def make(self, out: Path, *targets: str, jobs: int = 1) -> Timed:
        seconds, _ = timed(["make", "-C", str(self.tree), f"O={out}", "ARCH=x86_64", f"-j{jobs}", *targets],
                           dict(os.environ))
        return seconds

    def plain(self, i: int) -> None:
        out = self.work / f"plain-{i}"
        out.mkdir()
        shutil.copy2(self.config, out / ".config")
        self.plain_runs.append(self.make(out, "bzImage", jobs=self.jobs))
        self.discard(out)

    def discard(self, path: Path) -> None:
        """Out of the way now (a rename), deleted after the repetition (see the module's doc)."""
        self.trash.mkdir(exist_ok=True)
        path.rename(self.trash / f"{len(list(self.trash.iterdir()))}-{path.name}")

    def empty_trash(self, pause: bool = True) -> None:
        if self.trash.exists():
            shutil.rmtree(self.trash)
            os.sync()
            if pause:
                print(f"  (deleted what the repetition left; {self.settle:.0f}s pause)", flush=True)
                time.sleep(self.settle)

    def env(self, cache: Path, ccache: Path) -> dict[str, str]:
        return dict(os.environ, HARNESS_CACHE=str(cache), CCACHE_DIR=str(ccache))

    def cold_and_warm(self, h: Harness, i: int) -> None:
        h.cache = cache = self.work / f"{h.name}-{i}"
        seconds, artifact = h.build(self.spec_path, self.env(cache, cache / "ccache-cold"))
        h.cold.append(seconds)
        meta = json.loads((artifact / "harness-build.json").read_text())
        h.phases.append(meta.get("phases", {}))
        self.release = meta["release"]
        if (artifact / "config").read_text() != self.config.read_text():
            raise SystemExit(f"{h.name}'s .config differs from the plain build's ({artifact / 'config'})")
        # Warm tree: imported, nothing built for this configuration.
        self.discard(artifact)
        for out_dir in (cache / "src").glob("*/out-*"):
            self.discard(out_dir)
        self.discard(cache / "ccache-cold")
        seconds, artifact = h.build(self.spec_path, self.env(cache, cache / "ccache-warm"))
        h.warm.append(seconds)
        h.warm_phases.append(json.loads((artifact / "harness-build.json").read_text()).get("phases", {}))

    def hit_and_incremental(self, h: Harness) -> tuple[Timed, Timed]:
        series = self.work / f"series-{h.name}"
        shutil.copytree(Path(self.spec.series or ""), series)
        spec = self.work / f"spec-{h.name}.yaml"
        spec.write_text(f"source: {self.spec.source}\nseries: {series}\nconfigs: {json.dumps(self.spec.configs)}\n")
        env = self.env(h.cache, h.cache / "ccache-warm")
        h.build(spec, env)          # the copied series: the same kernel, a hit
        hit, _ = h.build(spec, env)
        last = sorted(series.glob("*.patch"))[-1]
        text = last.read_text()
        edited = text.replace("coco-harness-sample v1 slabs", "coco-harness-sample v1b slabs")
        if edited == text:
            raise SystemExit(f"{last}: nothing to edit (the bench edits the sample series' version string)")
        last.write_text(edited)
        incremental, _ = h.build(spec, env)
        return hit, incremental


def median(runs: list[Timed]) -> Timed:
    return Timed(statistics.median(r.wall for r in runs), statistics.median(r.cpu for r in runs))


def ratio(a: Timed, b: Timed) -> str:
    return f"{a.wall / b.wall:.2f}x (cpu {a.cpu / b.cpu:.2f}x)"


def paired(runs: list[Timed], plain: list[Timed]) -> str:
    """Each repetition's run against that repetition's plain make (the machine's pace
    drifts between repetitions: a plain make took 207 s in one and 266 s in the next)."""
    each = [r.wall / p.wall for r, p in zip(runs, plain, strict=True)]
    return f"paired {statistics.median(each):.2f}x ({', '.join(f'{x:.2f}' for x in each)})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", type=Path, default=REPO / "kernels" / "coco-sample.yaml")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--before", type=Path, metavar="CHECKOUT",
                    help="an earlier checkout of the harness (e.g. `git worktree add /tmp/old COMMIT`) timed beside "
                         "this one in the same repetitions")
    ap.add_argument("--work", type=Path, help="work directory (default: a temporary one, removed at the end)")
    ap.add_argument("--settle", type=float, default=60.0, metavar="SECONDS",
                    help="pause after deleting what a repetition left (default 60; see above)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-build-", dir=os.environ.get("BENCH_TMP")))
    work.mkdir(parents=True, exist_ok=True)
    harnesses = [Harness("harness", REPO)] + ([Harness("before", args.before.resolve())] if args.before else [])
    bench = Bench(args.spec.resolve(), work, harnesses, args.settle)
    try:
        bench.prepare()
        print(f"{args.spec.name}: {bench.jobs} cores, {args.reps} repetitions, work in {work}", flush=True)
        steps: list[Harness | None] = [None, *harnesses]
        for i in range(args.reps):
            for step in steps[i % len(steps):] + steps[:i % len(steps)]:
                if step is None:
                    bench.plain(i)
                else:
                    bench.cold_and_warm(step, i)
            print(f"  rep {i + 1}: plain make {bench.plain_runs[-1]}", flush=True)
            for h in harnesses:
                print(f"         {h.name}: cold {h.cold[-1]} {h.phases[-1]}", flush=True)
                print(f"         {h.name}: warm tree {h.warm[-1]} {h.warm_phases[-1]}", flush=True)
                if i + 1 < args.reps:
                    bench.discard(h.cache)
            bench.empty_trash(pause=i + 1 < args.reps)
        after = {h.name: bench.hit_and_incremental(h) for h in harnesses}
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    plain = median(bench.plain_runs)
    print(f"kernel {bench.release}, medians of {args.reps}; ratios to plain make, wall (and CPU time)")
    print(f"plain make O= -j{bench.jobs} bzImage (no ccache):    {plain}")
    for h in harnesses:
        cold, warm = median(h.cold), median(h.warm)
        hit, incremental = after[h.name]
        print(f"{h.name + ':':9} cold build (import, empty ccache):  {cold}  {ratio(cold, plain)}  "
              f"{paired(h.cold, bench.plain_runs)}")
        print(f"{h.name + ':':9} warm tree (imported, new series):   {warm}  {ratio(warm, plain)}  "
              f"{paired(h.warm, bench.plain_runs)}")
        print(f"{h.name + ':':9} identical inputs (cache hit):       {hit}  {hit.wall / plain.wall:.4f}x")
        print(f"{h.name + ':':9} after editing one patch:            {incremental}  {ratio(incremental, plain)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
