"""The `harness` command line: every sub-command's arguments, and the checks
argparse can make on them (positive deadlines, values that start with a dash).
A bad argument is BadInput (exit 2) with one line, never argparse's usage dump."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from harness import __version__
from harness.errors import BadInput
from harness.paths import GUEST_TESTS_DIR
from harness.profiles import available

DEFAULT_PROFILE = "emulated"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise BadInput(f"{self.prog}: {message}")


def _positive(kind: type[int] | type[float], unit: str) -> Any:
    """An argparse type: a number above zero (a deadline of 0 s, or 0 jobs, is not a choice)."""
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive number of {unit}, not {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number of {unit}, not {text!r}")
        return value
    return parse


# Options whose value may itself start with a dash (`--qemu-arg -S`, `--append -x`):
# argparse would take such a value for an option, so they are joined with `=` first.
_DASH_VALUES = ("--qemu-arg", "--append")


def join_dash_values(argv: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in _DASH_VALUES and i + 1 < len(argv) and argv[i + 1].startswith("-"):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def _add_launch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernel", default=None,
                   help="bzImage, build artifact dir, build spec YAML, or debian:<linux-image package> "
                        "(default: $HARNESS_KERNEL, else kernels/coco-sample.yaml)")
    p.add_argument("--profile", default=DEFAULT_PROFILE,
                   help=f"QEMU profile from qemu_cmdlines/ (default {DEFAULT_PROFILE}; available: "
                        f"{', '.join(available())})")
    p.add_argument("--append", default="", metavar="ARGS", help="extra kernel command-line arguments")
    p.add_argument("--qemu-arg", action="append", default=[], metavar="ARG",
                   help="extra QEMU argument (repeat for each), appended after the profile's")
    p.add_argument("--boot-timeout", type=_positive(float, "seconds"), default=None, metavar="S",
                   help="seconds to reach userspace (default: the profile's timeouts.boot)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="profile parameter (memory, smp, cbitpos, firmware, host_bdf, ...); repeatable")
    p.add_argument("--params", type=Path, default=None, metavar="FILE.yaml",
                   help="profile parameters from a YAML mapping (--param wins)")
    p.add_argument("--strict", action="store_true",
                   help="exit 3 instead of falling back when the host lacks the profile's hardware")
    p.add_argument("--force", action="store_true",
                   help="launch the requested profile even where the probe says the host lacks what it needs")


def _add_build_inputs(p: argparse.ArgumentParser, source: str, series: str, fragments: str) -> None:
    p.add_argument("--source", help=source)
    p.add_argument("--series", help=series)
    p.add_argument("--config", action="append", default=[], metavar="FRAGMENT",
                   help=f"config fragment from kconfigs/ by name, or a path; repeatable, {fragments}")


def _add_kcidb_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--origin", default=None, metavar="NAME",
                   help="KCIDB origin: the CI system's name, prefix of every id (default coco_harness)")
    p.add_argument("--log-url", default=None, metavar="BASE",
                   help="URL where the directory holding RESULT/NIGHT is published; log URLs are made from it")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="harness", description="Linux kernel test harness for confidential-computing guests")
    parser.add_argument("--version", action="version", version=f"harness {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("probe", help="host capabilities: KVM, SEV/SNP/TDX, IOMMU, vfio, QEMU, firmware")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-cache", action="store_true",
                   help="probe everything again (KVM probe guest, QEMU queries, host dmesg) and refresh the "
                        "answers later runs take from the cache")
    p.add_argument("--check-argv", action="store_true",
                   help="also start each profile's capable-host argv with -S and report QEMU's verdict")
    p.add_argument("--qemu", metavar="PATH",
                   help="probe this QEMU binary (default: $HARNESS_QEMU, else qemu-system-x86_64 on PATH; "
                        "bin/build-qemu prints the newest one built here)")

    p = sub.add_parser("run", help="boot a kernel under a profile and run the guest tests",
                       epilog="Other arguments (-k EXPR, -n N, -x ...) are passed to pytest; "
                              "so is everything after --.")
    _add_launch_args(p)
    p.add_argument("--results", type=Path, default=Path("results"), help="results root (default results/)")
    p.add_argument("--tests", type=Path, default=GUEST_TESTS_DIR, help="guest test directory")
    p.add_argument("--timeout", type=_positive(float, "seconds"), default=1800.0,
                   help="deadline for all guest tests, seconds")
    p.add_argument("--dry-run", action="store_true", help="print the launch plan, start nothing")
    p.add_argument("--channel", choices=("auto", "serial", "virtio", "ssh"), default="auto",
                   help="command channel to our guest: a virtio-serial port where the kernel has the driver and "
                        "the profile is not confidential (auto, the default), its second serial port (ttyS1; "
                        "for a kernel whose virtio is under test), virtio, or SSH (dropbear, per-run keys)")
    p.add_argument("--target", default=None, metavar="ssh://USER@HOST[:PORT]",
                   help="run the guest tests on an existing machine over SSH instead of booting one")
    p.add_argument("--identity", type=Path, default=None, help="private key for --target")
    p.add_argument("--known-hosts", type=Path, default=None,
                   help="known_hosts file pinning --target's host key (default: ~/.ssh/known_hosts)")
    p.add_argument("--json", action="store_true", help="with --dry-run: the plan as JSON")
    p.add_argument("--label", default=None, metavar="NAME",
                   help="name the kernel build for people: compare, the run index and nightly summaries show "
                        "NAME instead of its release and series (recorded in meta.json; reproduce keeps it)")

    p = sub.add_parser("build", help="build a kernel: source + patch series + config fragments, cached")
    p.add_argument("specs", nargs="*", type=Path, metavar="SPEC.yaml",
                   help="build spec files {source, series, configs}")
    _add_build_inputs(p, "kernel tarball, git work tree[@ref] or unpacked tree",
                      "mbox, directory of *.patch (quilt series file honoured), or a message-id (b4)",
                      "merged in order")
    p.add_argument("--per-patch", action="store_true", help="build after each patch; report build/warnings per patch")
    p.add_argument("--allow-dropped", action="store_true", help="build even if requested options did not survive")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("boot", help="boot and attach the terminal to the guest console (Ctrl-] leaves)")
    _add_launch_args(p)
    p.add_argument("--results", type=Path, default=Path("results"))

    p = sub.add_parser("compare", help="compare runs across kernel builds (transitions, dmesg ids, deltas)")
    p.add_argument("runs", nargs="*", type=Path, metavar="RESULT",
                   help="results/<run-id> directories; the first one's build is the base")
    p.add_argument("--format", choices=("text", "json", "html"), default="text")
    p.add_argument("--output", type=Path, default=None, help="write the report here instead of stdout")
    p.add_argument("--last", type=int, default=None, metavar="N",
                   help="the last N runs from the run index, then their comparison (oldest build first)")
    p.add_argument("--test", default=None, help="with --last: this test's status in each run")
    p.add_argument("--results", type=Path, default=Path("results"), help="results root holding index.sqlite")

    p = sub.add_parser("nightly", help="kernels x profiles x suites into one results tree, JUnit, exit code")
    p.add_argument("matrix", nargs="?", type=Path, help="MATRIX.yaml")
    p.add_argument("--results", type=Path, default=Path("results"), help="results root (default results/)")
    p.add_argument("--shard", default=None, metavar="I/N", help="run every N-th entry starting at I (1-based)")
    p.add_argument("--jobs", type=_positive(int, "entries"), default=None,
                   help="entries at a time (default: half the cores)")
    p.add_argument("--merge", type=Path, nargs="+", default=None, metavar="NIGHT",
                   help="merge shard trees (nightly-*/ directories) into --results instead of running")
    p.add_argument("--kcidb", type=Path, default=None, metavar="FILE", help="also write the night as KCIDB JSON")
    _add_kcidb_args(p)

    p = sub.add_parser("export", help="results as KCIDB JSON (KernelCI's common results schema), validated")
    p.add_argument("results", nargs="*", type=Path, metavar="RESULT|NIGHT",
                   help="results/<run-id> directories or a nightly tree")
    p.add_argument("--kcidb", action="store_true", required=True, help="KCIDB JSON (the export format)")
    p.add_argument("--output", type=Path, default=None, help="write it here instead of stdout")
    _add_kcidb_args(p)

    p = sub.add_parser("bisect", help="first bad patch of a series (or commit of a git range) for a failing test",
                       epilog="-k EXPR selects the guest tests; other pytest arguments go after --. "
                              "Exit 0: a culprit named; 1: only patches that do not build were left between "
                              "good and bad; 2: bad input (ends that do not behave included); 3: infrastructure; "
                              "128+N: a signal.")
    p.add_argument("spec", nargs="?", type=Path, metavar="SPEC.yaml",
                   help="build spec {source, series, configs}, or {source, configs, good, bad} for a git range")
    _add_build_inputs(p, "kernel tarball, tree or git repository (with --good/--bad: its history)",
                      "the series to bisect: mbox, directory of *.patch (quilt series file honoured)",
                      "default base")
    p.add_argument("--good", metavar="COMMIT", help="with --bad: bisect this git range with git bisect run")
    p.add_argument("--bad", metavar="COMMIT", help="the first commit known to fail")
    p.add_argument("--profile", default=DEFAULT_PROFILE, help=f"QEMU profile (default {DEFAULT_PROFILE})")
    p.add_argument("--append", default="", metavar="ARGS", help="extra kernel command-line arguments")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="profile parameter; repeatable")
    p.add_argument("--params", type=Path, default=None, metavar="FILE.yaml", help="profile parameters from YAML")
    p.add_argument("-k", dest="keyword", metavar="EXPR", help="guest tests to judge each step by (pytest -k)")
    p.add_argument("--repeat", type=int, default=1, metavar="N", help="runs per step (default 1)")
    p.add_argument("--flaky-is", choices=("good", "bad"), default="bad",
                   help="what a step that fails some but not all of its runs counts as (default bad)")
    p.add_argument("--retries", type=int, default=2, metavar="N",
                   help="extra attempts for a build or run that breaks on infrastructure (exit 3); default 2")
    p.add_argument("--timeout", type=float, default=1800.0, help="deadline for each run's guest tests, seconds")
    p.add_argument("--results", type=Path, default=Path("results"), help="results root (default results/)")
    p.add_argument("--json", action="store_true", help="print bisect.json at the end")

    p = sub.add_parser("host-state", help="host bindings harness runs hold (vfio-pci, driver_override, "
                                          "module parameters), and putting them back")
    p.add_argument("--restore", action="store_true",
                   help="put back what runs that died (SIGKILL) left bound; runs still going keep theirs")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("reproduce", help="re-run a recorded run exactly")
    p.add_argument("result", type=Path, help="a results/<run-id> directory, or results/<run-id>/tests/<name>")
    p.add_argument("--results", type=Path, default=None, help="results root (default: beside RESULT)")
    p.add_argument("--shell", action="store_true",
                   help="boot it exactly as recorded and hand over the guest console instead of running tests")
    return parser


def parse_params(pairs: list[str], file: Path | None) -> dict[str, str]:
    """--params FILE.yaml then --param KEY=VALUE (later wins). Raises BadInput."""
    params: dict[str, str] = {}
    if file is not None:
        from harness.paths import load_yaml

        data = load_yaml(file, "params file")
        if not isinstance(data, dict):
            raise BadInput(f"params file {file}: expected a mapping of parameter: value")
        for key, value in data.items():
            if isinstance(value, (dict, list)) or value is None:
                raise BadInput(f"params file {file}: key {key!r}: expected a string or a number")
            params[str(key)] = str(value).lower() if isinstance(value, bool) else str(value)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise BadInput(f"--param {pair!r}: expected KEY=VALUE")
        params[key] = value
    return params
