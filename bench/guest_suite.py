"""Wall time of the emulated guest suite, per workload, serial and with -n 2.

Baseline in the same run: raw QEMU booting the same kernel and initramfs
straight to poweroff (bench/boot_overhead's raw run), before, between and after
the two suites; their median is the unit. Prints seconds and ratios.
"""

from __future__ import annotations

import argparse
import json
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


def run_suite(results: Path, workers: int, profile: str,
              kernel: str) -> tuple[float, dict[str, float], dict[str, int], dict[str, float]]:
    args = [sys.executable, "-m", "harness", "run", "--profile", profile, "--kernel", kernel,
            "--results", str(results)]
    if workers > 1:
        args += ["-n", str(workers)]
    start = time.monotonic()
    proc = subprocess.run(args, capture_output=True, text=True, timeout=900)
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
    args = ap.parse_args()
    plan, _ = make_plan(RunRequest(kernel=args.kernel, profile=args.profile))
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
        serial, per, counts, tests = run_suite(work / "serial", 1, args.profile, str(plan.kernel.image))
        raw()
        parallel, _, _, _ = run_suite(work / "parallel", 2, args.profile, str(plan.kernel.image))
        raw()
    unit = statistics.median(raws)
    print(f"kernel {plan.kernel.release}, profile {args.profile}, accel {plan.accel}; tests {counts}")
    print(f"raw QEMU boot->poweroff (baseline):  {unit:6.2f}s  (median of {', '.join(f'{r:.2f}' for r in raws)})")
    print(f"whole suite, 1 VM:                   {serial:6.2f}s  ({serial / unit:.1f}x the raw boot)")
    print(f"whole suite, -n 2 (2 VMs):           {parallel:6.2f}s  ({parallel / unit:.1f}x the raw boot, "
          f"speed-up {serial / parallel:.2f}x)")
    for name, seconds in sorted(per.items(), key=lambda kv: -kv[1]):
        print(f"  {name:10} {seconds:6.2f}s  ({seconds / unit:.2f}x the raw boot)")
    print("slowest tests (1 VM; the first one's time includes the boot):")
    for nodeid, seconds in sorted(tests.items(), key=lambda kv: -kv[1])[:args.slowest]:
        print(f"  {seconds:6.2f}s  {nodeid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
