"""No stage imports a later one.

The harness's data flow is build -> plan -> machine -> guest channel -> checks
-> run directory -> compare/report/export, with the commands (cli, runner,
nightly, reproduce) and the pytest side of a run on top. Imports follow it with
two differences, both because an owner imports its parts:

- the checks (`dmesg`, `diagnostics`) come before the plan: they are pure
  readers of kernel evidence (its log, its configuration) that need nothing
  but the base, and earlier stages use them: the launch plan carries the
  kernel's diagnostics (read from the image before launch; `--strict` refuses
  a kernel that cannot report), and the machine's boot wait ends on the dmesg
  rules' panic and oops patterns;
- the channels (`guest`, `ssh`, `qmp`, and `sysfs`/`hotplug` over them) come
  before the machine: the machine builds them (the serial agent whose
  greeting ends the boot wait, the SSH factory that prepares the argv, the QMP
  handshake), as QEMU's QEMUMachine builds its QMP and console socket. At run
  time the data flows from the machine to the channel; in imports the owner
  sits above its parts.

The run's event log (`events`) is in the base: every later stage stamps events
into it as they happen (the console reader, the QMP channel, the machine, the
pytest plugin, the runner), and it needs nothing but the standard library.
Reading it back into a timeline (`timeline`) belongs to the run directory.

Every import counts: at the top, inside a function (lazy), under TYPE_CHECKING.
A new module must be given a stage here.
"""

from __future__ import annotations

import ast
from pathlib import Path

from harness.paths import REPO

PACKAGE = REPO / "harness"

# Earliest first: a module may import its own stage and earlier ones. A
# subpackage (harness/build/, harness/probe/, ...) is one module here.
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("harness", "errors", "paths", "process", "hashing", "cpio", "events")),
    ("build", ("build", "identity", "kernel", "tools", "initramfs")),
    ("checks", ("dmesg", "diagnostics")),
    ("plan", ("profiles", "probe", "channel", "plan")),
    ("channels", ("guest", "ssh", "qmp", "sysfs", "hotplug", "hostpci", "hoststate", "assign")),
    ("machine", ("console", "qemuproc", "machine", "console_tty", "qemu_check")),
    ("run directory", ("results", "rundir", "verdict", "timeline")),
    ("compare/report/export", ("compare", "runindex", "report", "kcidb")),
    # Orchestration may import anything.
    ("orchestration", ("cli", "cli_args", "__main__", "runner", "nightly", "reproduce", "pytest_plugin",
                       "pytest_record", "pytest_main", "pytest_child", "pytest_boot", "probe_report", "bisect",
                       "bisect_git", "bisect_step", "bisect_record", "labplan", "labhost")),
)
RANK = {module: i for i, (_, modules) in enumerate(STAGES) for module in modules}


def unit_of(dotted: str) -> str:
    """`harness.probe.kvm` -> `probe`; `harness` -> `harness` (the package's __init__)."""
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def harness_imports(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, dotted module) for every import of the harness in `source`, wherever it stands.

    `from harness import x` names the submodule harness.x when there is one;
    relative imports are resolved against `module`.
    """
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                is_module = (REPO / Path(*sub.split("."))).is_dir() or (REPO / f"{sub.replace('.', '/')}.py").is_file()
                found.append((node.lineno, sub if is_module else base))
    return sorted({(line, name) for line, name in found if name == "harness" or name.startswith("harness.")})


def package_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_module_has_a_stage() -> None:
    units = {unit_of(module_name(p)) for p in package_files()}
    missing = sorted(units - RANK.keys())
    assert not missing, f"give these a stage in STAGES ({__file__}): {missing}"
    gone = sorted(RANK.keys() - units)
    assert not gone, f"STAGES names modules that no longer exist: {gone}"
    listed = [m for _, modules in STAGES for m in modules]
    assert len(listed) == len(set(listed)), "a module is listed in two stages"


def test_no_stage_imports_a_later_one() -> None:
    violations = []
    for path in package_files():
        module = module_name(path)
        here = unit_of(module)
        for line, target in harness_imports(path.read_text(), module, path.name == "__init__.py"):
            there = unit_of(target)
            if RANK[there] > RANK[here]:
                violations.append(f"{path.relative_to(REPO)}:{line} ({STAGES[RANK[here]][0]}) imports {target} "
                                  f"({STAGES[RANK[there]][0]}, a later stage)")
    assert not violations, "\n".join(violations)


def test_a_lazy_or_type_checking_import_counts() -> None:
    source = ("from typing import TYPE_CHECKING\n"
              "if TYPE_CHECKING:\n    from harness.plan import LaunchPlan\n"
              "def f():\n    from harness import runner\n    import harness.kcidb.run\n"
              "from . import dmesg\nfrom .probe import kvm\n")
    assert harness_imports(source, "harness.console") == [
        (3, "harness.plan"), (5, "harness.runner"), (6, "harness.kcidb.run"), (7, "harness.dmesg"),
        (8, "harness.probe.kvm")]


MAX_MODULE_LINES = 400


def test_no_module_is_over_400_lines() -> None:
    # One owner per module: past this size a module holds two things (issue 10's rule).
    big = [f"{p.relative_to(REPO)}: {n} lines" for p in package_files()
           if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    assert not big, "split these (one concern per module):\n" + "\n".join(big)
