"""The harness against virtme-ng and raw QEMU, side by side on one kernel.

virtme-ng (`vng`) is the tool kernel developers use to boot a kernel under QEMU.
This bench installs it from PyPI into a venv of its own (under the harness's
cache, never the repository's .venv), builds one 6.12 kernel with the harness
(`--config base --config virtme-ng`: what both tools need, kconfigs/virtme-ng.config
says why each option), and times, interleaved (the order rotates every run):

- raw QEMU:  the kernel with the harness's busybox initramfs and an init that runs
             `uname -r` and powers off (q35, TCG, the emulated profile's CPUs and
             memory), from exec to QEMU's exit;
- vng:       `vng --run K --disable-kvm -- uname -r` (the host's / over 9p, as vng
             does on a host without virtiofsd);
- harness:   `harness run --kernel K -k test_reached_userspace` (the whole command:
             plan, initramfs from the cache, boot, the one guest test, shutdown,
             the results directory).

After one untimed run of each (what the harness makes on first use and caches:
the initramfs, guest tools, the host probe), each run's output is checked for
the kernel's release (the harness: its test passed). Prints each run, the
medians, their ratios and each run's own ratios; the goal is harness <= 0.6x
vng. The machine may be busy with other work: read the ratios, measured side by
side, not the times.
"""

from __future__ import annotations

import argparse
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

from boot_overhead import raw_initrd  # noqa: E402

from harness.build import BuildSpec, build  # noqa: E402
from harness.paths import cache_dir  # noqa: E402
from harness.runner import RunRequest, make_plan  # noqa: E402

SOURCE = "/usr/src/linux-source-6.12.tar.xz"
UNAME_INIT = b"#!/bin/sh\n/bin/busybox mount -t proc proc /proc 2>/dev/null\n/bin/busybox uname -r\n" \
             b"/bin/busybox poweroff -f\n"


def vng_venv() -> tuple[Path, str]:
    """The bench's own venv with virtme-ng from PyPI (made once); its bin and vng's version."""
    venv = cache_dir() / "bench" / "virtme-ng-venv"
    vng = venv / "bin" / "vng"
    if not vng.exists():
        print(f"installing virtme-ng from PyPI into {venv}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "virtme-ng"], check=True)
    version = subprocess.run([str(vng), "--version"], capture_output=True, text=True, check=True).stdout.strip()
    return venv / "bin", version


def timed(argv: list[str], release: str | None, env: dict[str, str] | None = None, cwd: Path | None = None,
          console: Path | None = None, ok: tuple[int, ...] = (0,)) -> tuple[float, bytes]:
    """Seconds from exec to exit and the output; SystemExit if the exit status is not in
    `ok` or `release` (unless None) is not in the output."""
    start = time.monotonic()
    proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, timeout=600, stdin=subprocess.DEVNULL)
    seconds = time.monotonic() - start
    out = proc.stdout + proc.stderr + (console.read_bytes() if console and console.exists() else b"")
    if proc.returncode not in ok or release is not None and release.encode() not in out:
        raise SystemExit(f"{argv[0]} ... failed (exit {proc.returncode}): {out[-2000:].decode(errors='replace')}")
    return seconds, out


def vng_check(vng: list[str], release: str, env: dict[str, str], cwd: Path) -> bool:
    """Run vng once with --verbose (the guest's console shown) and check the command ran:
    True if it ran on vng's normal path (virtio-serial ports: output and exit status
    come back), False if on its console fallback.

    virtme-ng-init finds the command's ports as /dev/virtio-ports/virtme.*, which
    udev makes; it runs udevd from the host's root, shared into the guest. On a host
    without udev (a container) it runs the command on the serial console instead,
    and vng, with no exit status back, exits 255 (the output is only on the
    console, which vng sends to /dev/null unless --verbose)."""
    _, out = timed([*vng[:-3], "--verbose", *vng[-3:]], release, env=env, cwd=cwd, ok=(0, 255))
    if b"cannot find script I/O ports" not in out:
        return True
    if b"script exited with code 0" not in out:
        raise SystemExit(f"vng: the command failed on the console fallback: {out[-2000:].decode(errors='replace')}")
    print("vng: this host has no udev (systemd-udevd), so virtme-ng-init cannot find its virtio-serial ports and runs "
          "the command on the serial console; vng exits 255. A --verbose run showed the release and 'script exited "
          "with code 0'; the timed runs are the same command without --verbose.", flush=True)
    return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--source", default=SOURCE)
    args = ap.parse_args()
    bin_dir, vng_version = vng_venv()
    t = time.monotonic()
    kernel = build(BuildSpec(source=args.source, configs=["base", "virtme-ng"]))
    print(f"kernel {kernel.release} ({'cache hit' if kernel.cached else 'built'} in {time.monotonic() - t:.0f}s): "
          f"{kernel.artifact}", flush=True)
    image = str(kernel.artifact / "bzImage")
    plan, _ = make_plan(RunRequest(kernel=str(kernel.artifact), profile="emulated"))
    times: dict[str, list[float]] = {"raw": [], "vng": [], "harness": []}
    with tempfile.TemporaryDirectory(prefix="bench-vng-") as tmp:
        work = Path(tmp)
        initrd = work / "raw.cpio"
        raw_initrd(plan.initrd, initrd, "bench-uname", UNAME_INIT)
        console = work / "raw-console.log"
        raw = [plan.qemu, "-machine", f"q35,accel={plan.accel}", "-cpu", plan.profile.cpu_tcg,
               "-smp", str(plan.profile.smp), "-m", f"{plan.profile.memory_mib}M", "-nodefaults",
               "-no-user-config", "-display", "none", "-no-reboot", "-kernel", image, "-initrd", str(initrd),
               "-append", plan.cmdline + " rdinit=/bench-uname", "-serial", f"file:{console}"]
        vng_env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
        vng = [str(bin_dir / "vng"), "--run", image, "--disable-kvm", "--", "uname", "-r"]
        harness = [sys.executable, "-m", "harness", "run", "--kernel", str(kernel.artifact), "--results",
                   str(work / "results"), "-k", "test_reached_userspace"]
        print(f"virtme-ng {vng_version.removeprefix('virtme-ng ')}, accel {plan.accel}, {os.cpu_count()} host cores, "
              f"{args.runs} runs each, order rotating", flush=True)
        # One untimed run of each first: the harness's initramfs, guest tools and host probe
        # are made on first use and cached; the page cache gets what each reads.
        console.unlink(missing_ok=True)
        timed(raw, kernel.release, console=console)
        ports = vng_check(vng, kernel.release, vng_env, work)
        timed(harness, "passed", cwd=REPO)
        order = ["raw", "vng", "harness"]
        for i in range(args.runs):
            for what in order[i % 3:] + order[:i % 3]:
                if what == "raw":
                    console.unlink(missing_ok=True)
                    times["raw"].append(timed(raw, kernel.release, console=console)[0])
                elif what == "vng":
                    times["vng"].append(timed(vng, kernel.release if ports else None, env=vng_env, cwd=work,
                                              ok=(0,) if ports else (255,))[0])
                else:
                    times["harness"].append(timed(harness, "passed", cwd=REPO)[0])
            print(f"  run {i + 1}: raw {times['raw'][-1]:5.2f}s  vng {times['vng'][-1]:5.2f}s  "
                  f"harness {times['harness'][-1]:5.2f}s", flush=True)
        shutil.rmtree(work / "results", ignore_errors=True)
    raw_m, vng_m, har_m = (statistics.median(times[k]) for k in ("raw", "vng", "harness"))
    print(f"median raw QEMU (boot, uname -r, poweroff):      {raw_m:6.2f}s")
    print(f"median vng --run K --disable-kvm -- uname -r:    {vng_m:6.2f}s  {vng_m / raw_m:.2f}x raw")
    print(f"median harness run -k test_reached_userspace:    {har_m:6.2f}s  {har_m / raw_m:.2f}x raw  "
          f"{har_m / vng_m:.2f}x vng (goal <= 0.6x)")
    # Each run's three are back to back: their ratios are less moved by the machine's drift
    # (a vng run took 4.4 s and 7.4 s in one bench) than the ratio of the medians.
    for name, base in (("raw", times["raw"]), ("vng", times["vng"])):
        each = [h / b for h, b in zip(times["harness"], base, strict=True)]
        listed = ", ".join(f"{x:.2f}" for x in each)
        print(f"harness / {name} per run: median {statistics.median(each):.2f}x ({listed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
