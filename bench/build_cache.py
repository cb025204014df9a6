"""Kernel builds against plain make, side by side on the same tree, config and cores.

Each repetition runs, in alternating order (ABC, then CBA, ...):

- plain make: `make O=<fresh dir> -jN bzImage` on the same source tree (imported
  once, untimed, by the harness's own import, with the series applied) with the
  same .config (made the harness's way: base target, fragments, olddefconfig);
  no ccache, as a developer would run it.
- harness cold: `harness build SPEC` with an empty cache (import included) and an
  empty ccache (CCACHE_DIR fresh: ccache on, as the harness ships, with nothing
  in it). Its phases (import, configure, compile, collect) come from the
  artifact's harness-build.json.
- harness warm tree: the source already imported, nothing built for this config
  (the artifact and its O= directory removed, a fresh CCACHE_DIR): a new
  configuration of a source the harness has seen.

Then, once: the same inputs again (a cache hit), and after editing one patch of
the series (an incremental rebuild). Prints each run, the medians, and each
median's ratio to plain make's. The machine may be loaded by other work: read
the ratios, which are measured side by side, not the absolute times.
"""

from __future__ import annotations

import argparse
import json
import os
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


def timed(argv: list[str], env: dict[str, str], cwd: Path = REPO) -> tuple[float, str]:
    start = time.monotonic()
    proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=7200,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise SystemExit(f"{argv[:4]} failed: {proc.stdout[-1000:]} {proc.stderr[-1500:]}")
    return time.monotonic() - start, proc.stdout


class Bench:
    def __init__(self, spec_path: Path, work: Path) -> None:
        self.spec_path = spec_path
        self.spec = load_spec(spec_path)
        self.work = work
        self.jobs = os.cpu_count() or 1
        self.harness = [sys.executable, "-m", "harness", "build", "--json"]
        self.runs: dict[str, list[float]] = {"plain": [], "cold": [], "warm": []}
        self.phases: list[dict[str, float]] = []
        self.warm_phases: list[dict[str, float]] = []
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

    def make(self, out: Path, *targets: str, jobs: int = 1) -> float:
        seconds, _ = timed(["make", "-C", str(self.tree), f"O={out}", "ARCH=x86_64", f"-j{jobs}", *targets],
                           dict(os.environ))
        return seconds

    def plain(self, i: int) -> None:
        out = self.work / f"plain-{i}"
        out.mkdir()
        shutil.copy2(self.config, out / ".config")
        self.runs["plain"].append(self.make(out, "bzImage", jobs=self.jobs))
        shutil.rmtree(out)

    def env(self, cache: Path, ccache: Path) -> dict[str, str]:
        return dict(os.environ, HARNESS_CACHE=str(cache), CCACHE_DIR=str(ccache))

    def cold_and_warm(self, i: int) -> tuple[Path, Path]:
        cache = self.work / f"harness-{i}"
        seconds, out = timed([*self.harness, str(self.spec_path)], self.env(cache, cache / "ccache-cold"))
        self.runs["cold"].append(seconds)
        artifact = Path(json.loads(out)[0]["artifact"])
        meta = json.loads((artifact / "harness-build.json").read_text())
        self.phases.append(meta.get("phases", {}))
        self.release = meta["release"]
        built = (artifact / "config").read_text()
        if built != self.config.read_text():
            raise SystemExit(f"the harness's .config differs from the plain build's ({artifact / 'config'})")
        # Warm tree: imported, nothing built for this configuration.
        shutil.rmtree(artifact)
        for out_dir in (cache / "src").glob("*/out-*"):
            shutil.rmtree(out_dir)
        shutil.rmtree(cache / "ccache-cold")
        seconds, out = timed([*self.harness, str(self.spec_path)], self.env(cache, cache / "ccache-warm"))
        self.runs["warm"].append(seconds)
        meta = json.loads((Path(json.loads(out)[0]["artifact"]) / "harness-build.json").read_text())
        self.warm_phases.append(meta.get("phases", {}))
        return cache, cache / "ccache-warm"

    def hit_and_incremental(self, cache: Path, ccache: Path) -> tuple[float, float]:
        series = self.work / "series"
        shutil.copytree(Path(self.spec.series or ""), series)
        spec = self.work / "spec.yaml"
        spec.write_text(f"source: {self.spec.source}\nseries: {series}\nconfigs: {json.dumps(self.spec.configs)}\n")
        env = self.env(cache, ccache)
        timed([*self.harness, str(spec)], env)          # the copied series: the same kernel, a hit
        hit, _ = timed([*self.harness, str(spec)], env)
        last = sorted(series.glob("*.patch"))[-1]
        text = last.read_text()
        edited = text.replace("coco-harness-sample v1 slabs", "coco-harness-sample v1b slabs")
        if edited == text:
            raise SystemExit(f"{last}: nothing to edit (the bench edits the sample series' version string)")
        last.write_text(edited)
        incremental, _ = timed([*self.harness, str(spec)], env)
        return hit, incremental


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", type=Path, default=REPO / "kernels" / "coco-sample.yaml")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--work", type=Path, help="work directory (default: a temporary one, removed at the end)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-build-", dir=os.environ.get("BENCH_TMP")))
    work.mkdir(parents=True, exist_ok=True)
    bench = Bench(args.spec.resolve(), work)
    try:
        bench.prepare()
        print(f"{args.spec.name}: {bench.jobs} cores, {args.reps} repetitions, work in {work}", flush=True)
        cache = ccache = Path()
        for i in range(args.reps):
            order = ["plain", "harness"] if i % 2 else ["harness", "plain"]
            for what in order:
                if what == "plain":
                    bench.plain(i)
                else:
                    if i:
                        shutil.rmtree(cache)
                    cache, ccache = bench.cold_and_warm(i)
            print(f"  rep {i + 1}: plain {bench.runs['plain'][-1]:6.1f}s  harness cold {bench.runs['cold'][-1]:6.1f}s "
                  f"{bench.phases[-1]}  warm tree {bench.runs['warm'][-1]:6.1f}s {bench.warm_phases[-1]}", flush=True)
        hit, incremental = bench.hit_and_incremental(cache, ccache)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    plain, cold, warm = (statistics.median(bench.runs[k]) for k in ("plain", "cold", "warm"))
    print(f"kernel {bench.release}, medians of {args.reps}")
    print(f"plain make O= -j{bench.jobs} bzImage (no ccache):   {plain:7.1f}s")
    print(f"harness cold build (import, empty ccache):  {cold:7.1f}s  {cold / plain:.2f}x plain make")
    print(f"harness warm tree (imported, new config):   {warm:7.1f}s  {warm / plain:.2f}x plain make")
    print(f"harness identical inputs (cache hit):       {hit:7.2f}s  {hit / plain:.4f}x plain make")
    print(f"harness after editing one patch:            {incremental:7.1f}s  {incremental / plain:.3f}x plain make")
    return 0


if __name__ == "__main__":
    sys.exit(main())
