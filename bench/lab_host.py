"""Each step of the lab-host twin's device-assignment workflow, timed, per vfio backend.

Runs `harness run --profile lab-host -k test_vfio` once per backend (iommufd,
container) and prints, side by side, the seconds of: L1 boot (TCG), L1 chroot
set-up, bind to vfio-pci (the host-state guard), L2 boot (KVM in L1),
hot-plug of the assigned functions, MMIO (edu's id and liveness registers
through the assigned BAR), DMA (dmastress write + verify on the assigned
NVMe), hot-unplug, restore, and the whole run. Also the L1 kernel's build
time (from its artifact) and which accelerator each level ran under.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness.paths import SAMPLE_KERNEL

REPO = Path(__file__).resolve().parent.parent


def run(results: Path, backend: str, kernel: str) -> dict[str, Any]:
    args = [sys.executable, "-m", "harness", "run", "--profile", "lab-host", "--kernel", kernel,
            "--param", f"vfio_backend={backend}", "--results", str(results), "-k", "test_vfio"]
    start = time.monotonic()
    proc = subprocess.run(args, capture_output=True, text=True, timeout=3600, cwd=REPO)
    wall = time.monotonic() - start
    run_dir = max((p for p in results.iterdir() if (p / "meta.json").is_file()), key=lambda p: p.stat().st_mtime)
    meta = json.loads((run_dir / "meta.json").read_text())
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-2000:])
        raise SystemExit(f"lab-host run ({backend}) failed (exit {proc.returncode}): {run_dir}")
    inner = run_dir / meta["inner"]["run_dir"]
    inner_meta = json.loads((inner / "meta.json").read_text())
    host = json.loads((inner / "host-state.json").read_text())
    records = {r["nodeid"].split("::")[-1]: r for r in json.loads((inner / "tests.json").read_text())}

    def test(name: str) -> float:
        return float(records[name]["seconds"])

    def prop(test_name: str, key: str) -> float:
        return float(records[test_name]["properties"][key])

    return {
        "L1 boot (TCG)": meta["timings"]["l1_boot"],
        "L1 chroot set-up": meta["timings"]["l1_setup"],
        "bind to vfio-pci": host["bind_seconds"],
        "L2 boot": inner_meta["timings"]["boot"],
        "hot-plug": prop("test_assigned_functions_are_the_hosts", "vfio_plug_seconds"),
        "MMIO (edu BAR)": test("test_assigned_edu_id_register_through_the_bar"),
        "DMA (NVMe >=24 MiB)": test("test_assigned_nvme_dma_verifies"),
        "DMA MB/s": prop("test_assigned_nvme_dma_verifies", "vfio_nvme_MBps"),
        "hot-unplug": prop("test_hot_unplug_gives_the_host_function_back", "vfio_unplug_seconds"),
        "restore": host["restore"]["seconds"],
        "inner run (L1)": meta["timings"]["inner"],
        "whole run": wall,
        "L2 accel": inner_meta["profile"]["accel"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", default=str(SAMPLE_KERNEL),
                        help="L2 kernel (default: the sample build; a Debian cloud kernel boots 3-5x slower in L2)")
    parser.add_argument("--backends", default="iommufd,container")
    args = parser.parse_args()
    backends = args.backends.split(",")
    with tempfile.TemporaryDirectory(prefix="bench-lab-") as tmp:
        columns = {b: run(Path(tmp) / b, b, args.kernel) for b in backends}
    from harness.kernel import resolve_kernel

    l1 = resolve_kernel(str(REPO / "kernels/lab-host.yaml"))
    build = json.loads((l1.image.parent / "harness-build.json").read_text())
    print(f"L1 kernel {l1.release}: built in {build['seconds']:.0f} s (cold), bzImage "
          f"{l1.image.stat().st_size / 2**20:.1f} MiB")
    print(f"{'step':22}" + "".join(f"{b:>12}" for b in backends))
    for step in columns[backends[0]]:
        cells = []
        for b in backends:
            value = columns[b][step]
            cells.append(f"{value:>12.2f}" if isinstance(value, float) else f"{value!s:>12}")
        print(f"{step:22}" + "".join(cells))


if __name__ == "__main__":
    main()
