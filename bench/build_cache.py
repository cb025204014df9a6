"""Kernel build cache against plain make, side by side on the same tree.

harness: a cold build (empty artifact cache and empty ccache), the same build
again (cache hit), and a rebuild after editing one patch of the series.
plain make: the same tarball extracted, the same series applied with patch(1),
the same .config, `make -j$(nproc) bzImage` without ccache.
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

REPO = Path(__file__).resolve().parent.parent


def timed(argv: list[str], env: dict[str, str], cwd: Path | None = None) -> tuple[float, str]:
    start = time.monotonic()
    proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=7200)
    if proc.returncode != 0:
        raise SystemExit(f"{argv[:4]} failed: {proc.stderr[-1500:]}")
    return time.monotonic() - start, proc.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--spec", type=Path, default=REPO / "kernels" / "coco-sample.yaml")
    args = ap.parse_args()
    spec_text = args.spec.read_text()
    with tempfile.TemporaryDirectory(prefix="bench-build-") as tmp:
        work = Path(tmp)
        env = dict(os.environ, HARNESS_CACHE=str(work / "cache"), CCACHE_DIR=str(work / "ccache"))
        harness = [sys.executable, "-m", "harness", "build", "--json"]
        series = work / "series"
        shutil.copytree(args.spec.parent / "coco-sample", series)
        spec = work / "spec.yaml"
        spec.write_text(spec_text.replace("series: coco-sample", f"series: {series}"))
        cold, out = timed([*harness, str(spec)], env)
        result = json.loads(out)[0]
        hit, _ = timed([*harness, str(spec)], env)
        last = sorted(series.glob("*.patch"))[-1]
        last.write_text(last.read_text().replace("coco-harness-sample v1 slabs", "coco-harness-sample v1b slabs"))
        incremental, _ = timed([*harness, str(spec)], env)
        plain_tree = work / "plain"
        plain_tree.mkdir()
        subprocess.run(["tar", "-xf", "/usr/src/linux-source-6.12.tar.xz", "-C", str(plain_tree),
                        "--strip-components=1"], check=True)
        for patch in sorted((args.spec.parent / "coco-sample").glob("*.patch")):
            subprocess.run(["patch", "-s", "-p1", "-i", str(patch)], cwd=plain_tree, check=True)
        shutil.copy2(Path(result["artifact"]) / "config", plain_tree / ".config")
        subprocess.run(["make", "ARCH=x86_64", "olddefconfig"], cwd=plain_tree, check=True, capture_output=True)
        plain, _ = timed(["make", "ARCH=x86_64", f"-j{os.cpu_count()}", "bzImage"], dict(os.environ),
                         cwd=plain_tree)
    print(f"kernel {result['release']} ({args.spec.name}), {os.cpu_count()} cores")
    print(f"plain make bzImage (baseline, no ccache): {plain:7.1f}s")
    print(f"harness cold build (import+config+make):  {cold:7.1f}s  {cold / plain:.2f}x plain make")
    print(f"harness identical inputs (cache hit):     {hit:7.1f}s  {hit / plain:.4f}x plain make")
    print(f"harness after editing one patch:          {incremental:7.1f}s  {incremental / plain:.3f}x plain make")
    return 0


if __name__ == "__main__":
    sys.exit(main())
