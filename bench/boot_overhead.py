"""Boot overhead of the harness against raw QEMU, run side by side.

harness: Machine.launch -> wait_boot (agent ready) -> one guest command -> shutdown.
raw:     the same QEMU binary, kernel, initramfs (plus a 1-file appended cpio whose
         rdinit powers off at once), the same machine options; Popen to exit.
         The machine only: no devices beyond the hotplug root ports.
raw VM:  the same, with the profile's whole VM: the harness's own argv (edu, NVMe
         and virtio-blk on their scratch disks, both serial ports, the monitor),
         its sockets replaced by a console file and null back-ends. The guest
         kernel probes those devices while it boots in both, so this is what
         the harness itself adds to booting that VM.
cli:     the whole command a user types, `harness run -k test_reached_userspace`
         (Python and pytest start-up, probe, results written), in a fresh process.
All are interleaved, their order rotated each round so none always runs
first on a loaded machine. Prints medians, the ratio of medians to each raw
baseline, and the median of the per-round ratios (each round's runs were
within seconds of each other).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from harness.cpio import CpioWriter
from harness.kernel import PREBUILT_KERNEL
from harness.machine import Machine
from harness.qemuproc import SocketDir
from harness.runner import RunRequest, make_plan

POWEROFF_INIT = b"#!/bin/sh\n/bin/busybox poweroff -f\n"


def raw_initrd(initrd: Path, out: Path, name: str = "bench-poweroff", init: bytes = POWEROFF_INIT) -> None:
    """`initrd` plus a one-file archive holding `init` as /NAME (boot it with rdinit=/NAME):
    the kernel unpacks concatenated cpio archives in order."""
    buf = io.BytesIO()
    w = CpioWriter(buf)
    w.file(name, init, 0o755)
    w.finish()
    out.write_bytes(initrd.read_bytes() + buf.getvalue())


def raw_vm_argv(argv: list[str], work: Path, initrd: Path) -> list[str]:
    """The harness's argv for a VM with no harness: the console to a file, the command channel
    and the monitor to null back-ends, `initrd` that powers off at once."""
    out = []
    for i, arg in enumerate(argv):
        prev = argv[i - 1] if i else ""
        if prev == "-chardev" and arg.startswith("socket,id=console,"):
            arg = f"file,id=console,path={work}/raw-vm-console.log"
        elif prev == "-chardev" and arg.startswith("socket,"):
            arg = "null,id=" + arg.split("id=", 1)[1].split(",", 1)[0]
        elif prev == "-initrd":
            arg = str(initrd)
        elif prev == "-append":
            arg += " rdinit=/bench-poweroff"
        out.append(arg)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--kernel", default=PREBUILT_KERNEL)
    ap.add_argument("--profile", default="emulated")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--also-tree", type=Path, default=None, metavar="DIR",
                    help="also time the CLI of another checkout of the harness (e.g. the commit before a "
                         "change, unpacked with git archive), in the same rounds")
    args = ap.parse_args()
    plan, _ = make_plan(RunRequest(kernel=args.kernel, profile=args.profile))
    print(f"kernel {plan.kernel.release}, profile {plan.profile.name}, accel {plan.accel}, {args.runs} runs each")
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        work = Path(tmp)
        initrd = work / "raw.cpio"
        raw_initrd(plan.initrd, initrd)
        raw_argv = [plan.qemu, "-machine", f"{plan.profile.machine},accel={plan.accel}",
                    "-cpu", plan.profile.cpu_tcg if plan.accel == "tcg" else plan.profile.cpu_kvm,
                    "-smp", str(plan.profile.smp), "-m", f"{plan.profile.memory_mib}M",
                    "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                    "-kernel", str(plan.kernel.image), "-initrd", str(initrd),
                    "-append", plan.cmdline + " rdinit=/bench-poweroff",
                    "-serial", f"file:{work}/raw-console.log"]
        for port in range(plan.profile.hotplug_ports):
            raw_argv += ["-device", f"pcie-root-port,id=hp{port},chassis={port + 1},slot={port + 1}"]

        def raw(i: int) -> None:
            subprocess.run(raw_argv, check=True, timeout=120, stdin=subprocess.DEVNULL)

        vm_dir = SocketDir("raw-vm", work)  # the scratch disk images, as a machine makes them
        vm_dir.scratch_disks(plan.profile.scratch_disks)
        vm_argv = raw_vm_argv(plan.argv(vm_dir.path, "bench-raw-vm"), work, initrd)

        def raw_vm(i: int) -> None:
            subprocess.run(vm_argv, check=True, timeout=120, stdin=subprocess.DEVNULL)

        def library(i: int) -> None:
            with Machine(plan, work / f"h{i}", name="bench", sock_parent=work / "s") as m:
                guest = m.wait_boot()
                assert guest.check("uname -r").strip() == plan.kernel.release

        def cli(tree: Path | None) -> Callable[[int], None]:
            env = dict(os.environ, PYTHONPATH=str(tree)) if tree else None

            def step(i: int) -> None:
                subprocess.run([sys.executable, "-m", "harness", "run", "--kernel", str(plan.kernel.image),
                                "--profile", args.profile, "--results", str(work / "results"),
                                "-k", "test_reached_userspace"],
                               check=True, timeout=300, stdout=subprocess.DEVNULL, env=env, cwd=tree)
            return step

        steps: list[tuple[str, Callable[[int], None]]] = [
            ("raw", raw), ("raw VM", raw_vm), ("harness", library), ("harness run (CLI)", cli(None))]
        if args.also_tree:
            steps.append((f"CLI of {args.also_tree}", cli(args.also_tree.resolve())))
        times: dict[str, list[float]] = {name: [] for name, _ in steps}
        for i in range(args.runs):
            k = i % len(steps)
            for name, step in steps[k:] + steps[:k]:
                start = time.monotonic()
                step(i)
                times[name].append(time.monotonic() - start)
            print(f"  run {i + 1}: " + "  ".join(f"{name} {t[-1]:.2f}s" for name, t in times.items()), flush=True)
    labels = {"raw": "raw QEMU boot->poweroff, machine only", "raw VM": "raw QEMU boot->poweroff, same VM",
              "harness": "harness boot+command+shutdown (library)",
              "harness run (CLI)": "`harness run -k test_reached_userspace` (CLI)"}
    for base in ("raw", "raw VM"):
        print(f"median {labels[base]}: {statistics.median(times[base]):.2f}s")
    for name, t in times.items():
        if name.startswith("raw"):
            continue
        med = statistics.median(t)
        ratios = []
        for base in ("raw VM", "raw"):
            raw_t = times[base]
            per_round = statistics.median(x / r for x, r in zip(t, raw_t, strict=True))
            ratios.append(f"{med / statistics.median(raw_t):.2f}x {base} (per round {per_round:.2f}x)")
        print(f"median {labels.get(name, name)}: {med:.2f}s  ratio " + ", ".join(ratios))
    if args.also_tree:
        this, other = times["harness run (CLI)"], times[f"CLI of {args.also_tree}"]
        paired = statistics.median(a / b for a, b in zip(this, other, strict=True))
        print(f"this CLI / CLI of {args.also_tree}: median per-round ratio {paired:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
