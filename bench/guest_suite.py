"""Wall time of the emulated guest suite, per workload, serial and with -n 2.

Baseline in the same run: raw QEMU booting the same kernel and initramfs
straight to poweroff (bench/boot_overhead's raw run), before, between and after
the suites; their median is the unit. Prints seconds and ratios. `--also-tree
DIR` runs another checkout's suites in the same rounds (before/after).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from boot_overhead import raw_initrd

from harness.kernel import PREBUILT_KERNEL
from harness.runner import RunRequest, make_plan


def run_suite(results: Path, workers: int, profile: str, kernel: str,
              tree: Path | None = None) -> tuple[float, dict[str, float], dict[str, int], dict[str, float]]:
    args = [sys.executable, "-m", "harness", "run", "--profile", profile, "--kernel", kernel,
            "--results", str(results)]
    if workers > 1:
        args += ["-n", str(workers)]
    env = dict(os.environ, PYTHONPATH=str(tree)) if tree else None
    start = time.monotonic()
    proc = subprocess.run(args, capture_output=True, text=True, timeout=900, env=env, cwd=tree)
    wall = time.monotonic() - start
    run_dir = max((p for p in results.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    meta = json.loads((run_dir / "meta.json").read_text())
    if proc.returncode != 0:
        print(proc.stdout[-2000:])
        raise SystemExit(f"suite failed (exit {proc.returncode}): {run_dir}")
    per: dict[str, float] = defaultdict(float)
    tests: dict[str, float] = {}
    for rec in json.loads((run_dir / "tests.json").read_text()):
        per[rec["nodeid"].split("::")[0].removeprefix("test_").removesuffix(".py")] += rec["seconds"]
        tests[rec["nodeid"]] = rec["seconds"]
    return wall, dict(per), meta["tests"], tests


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--profile", default="emulated")
    ap.add_argument("--kernel", default=PREBUILT_KERNEL)
    ap.add_argument("--slowest", type=int, default=10, metavar="N", help="list the N slowest tests")
    ap.add_argument("--rounds", type=int, default=1, metavar="N",
                    help="run each suite N times (interleaved; medians)")
    ap.add_argument("--also-tree", type=Path, default=None, metavar="DIR",
                    help="also run the suites with another checkout of the harness (e.g. the commit before a "
                         "change, unpacked with git archive), interleaved with this one")
    args = ap.parse_args()
    plan, _ = make_plan(RunRequest(kernel=args.kernel, profile=args.profile))
    trees: list[tuple[str, Path | None]] = [("this tree", None)]
    if args.also_tree:
        trees.append((str(args.also_tree), args.also_tree.resolve()))
    walls: dict[tuple[str, int], list[float]] = defaultdict(list)
    per: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    tests: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    counts: dict[str, dict[str, int]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-suite-") as tmp:
        work = Path(tmp)
        initrd = work / "raw.cpio"
        raw_initrd(plan.initrd, initrd)
        raw_argv = [plan.qemu, "-machine", f"q35,accel={plan.accel}", "-cpu", plan.profile.cpu_tcg,
                    "-m", f"{plan.profile.memory_mib}M", "-nodefaults", "-display", "none", "-no-reboot",
                    "-kernel", str(plan.kernel.image), "-initrd", str(initrd),
                    "-append", plan.cmdline + " rdinit=/bench-poweroff", "-serial", "null"]
        raws: list[float] = []

        def raw() -> None:
            start = time.monotonic()
            subprocess.run(raw_argv, check=True, timeout=120)
            raws.append(time.monotonic() - start)

        raw()
        for r in range(args.rounds):
            order = trees if r % 2 == 0 else trees[::-1]
            for workers in (1, 2):
                for name, tree in order:
                    wall, p, c, t = run_suite(work / f"{len(raws)}", workers, args.profile,
                                              str(plan.kernel.image), tree)
                    walls[(name, workers)].append(wall)
                    if workers == 1:
                        counts[name] = c
                        for k, v in p.items():
                            per[name][k].append(v)
                        for k, v in t.items():
                            tests[name][k].append(v)
                    raw()
    unit = statistics.median(raws)
    print(f"kernel {plan.kernel.release}, profile {args.profile}, accel {plan.accel}, {args.rounds} round(s)")
    print(f"raw QEMU boot->poweroff (baseline):  {unit:6.2f}s  (median of {', '.join(f'{r:.2f}' for r in raws)})")
    for name, _ in trees:
        serial = statistics.median(walls[(name, 1)])
        parallel = statistics.median(walls[(name, 2)])
        print(f"{name}: tests {counts[name]}")
        print(f"  whole suite, 1 VM:                 {serial:6.2f}s  ({serial / unit:.1f}x the raw boot)")
        print(f"  whole suite, -n 2 (2 VMs):         {parallel:6.2f}s  ({parallel / unit:.1f}x the raw boot, "
              f"speed-up {serial / parallel:.2f}x)")
        for k, v in sorted(per[name].items(), key=lambda kv: -statistics.median(kv[1])):
            med = statistics.median(v)
            print(f"    {k:10} {med:6.2f}s  ({med / unit:.2f}x the raw boot)")
        print("  slowest tests (1 VM; the first one's time includes the boot):")
        slow = sorted(tests[name].items(), key=lambda kv: -statistics.median(kv[1]))[:args.slowest]
        for nodeid, v in slow:
            print(f"    {statistics.median(v):6.2f}s  {nodeid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
