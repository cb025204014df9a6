"""Bad input, as a hostile but realistic user gives it: each case gets the
documented exit code (2), one line naming the thing, no traceback, and nothing
left behind (no run directory, no QEMU, nothing in TMPDIR: the `cli` fixture
checks the last two).

Every case is cheap: it must be refused before a kernel is built or booted.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.errors import BadInput
from harness.profiles import load_profile
from harness.results import TestRecord, write_records
from harness.rundir import KernelRecord, ProfileRecord, RunRecord, RunStatus, write_run
from tests.conftest import Cli

# (id, argv with {tmp} for a private directory, what the one line must contain)
CASES: list[tuple[str, list[str], str]] = [
    ("unknown-profile", ["run", "--profile", "snpp", "--dry-run"], "unknown profile 'snpp'; available: "),
    ("unclosed-append-quote", ["run", "--append", 'bar="x', "--dry-run"], "--append 'bar=\"x': unclosed double quote"),
    ("results-is-a-file", ["run", "--results", "{tmp}/file", "-k", "userspace"],
     "--results {tmp}/file: not a directory"),
    ("boot-timeout-zero", ["run", "--boot-timeout", "0", "--dry-run"],
     "argument --boot-timeout: expected a positive number of seconds, not '0'"),
    ("boot-timeout-negative", ["run", "--boot-timeout", "-5", "--dry-run"],
     "argument --boot-timeout: expected a positive number of seconds, not '-5'"),
    ("timeout-negative", ["run", "--timeout", "-1", "--dry-run"],
     "argument --timeout: expected a positive number of seconds, not '-1'"),
    ("nightly-jobs-zero", ["nightly", "{tmp}/matrix.yaml", "--jobs", "0"],
     "argument --jobs: expected a positive number of entries, not '0'"),
    ("missing-kernel", ["run", "--kernel", "{tmp}/nope/bzImage", "--dry-run"],
     "kernel {tmp}/nope/bzImage: no such file"),
    ("not-a-bzimage", ["run", "--kernel", "{tmp}/file", "--dry-run"], "kernel {tmp}/file: not a bzImage"),
    ("bad-param", ["run", "--param", "nokey", "--dry-run"], "--param 'nokey': expected KEY=VALUE"),
    ("unknown-param", ["run", "--param", "colour=red", "--dry-run"], "colour"),
    ("compare-output-unwritable", ["compare", "{tmp}/run", "--output", "/proc/nope/x.html"],
     "--output /proc/nope/x.html: "),
    ("compare-corrupt-meta", ["compare", "{tmp}/corrupt"], "{tmp}/corrupt/meta.json"),
    ("reproduce-corrupt-meta", ["reproduce", "{tmp}/corrupt"], "{tmp}/corrupt/meta.json"),
    ("reproduce-not-a-run", ["reproduce", "{tmp}"], "not a run directory (no meta.json)"),
    ("build-fragment-not-kconfig", ["build", "--source", "/usr/src/linux-source-6.12.tar.xz", "--config",
                                    "{tmp}/bad.config"], "config fragment {tmp}/bad.config:2: not a Kconfig line"),
    ("build-missing-series", ["build", "--source", "/usr/src/linux-source-6.12.tar.xz", "--series", "{tmp}/nope"],
     "series {tmp}/nope: no such file or directory"),
    ("export-unwritable", ["export", "--kcidb", "{tmp}/run", "--output", "/proc/nope/k.json"],
     "--output /proc/nope/k.json: "),
    ("unknown-command-option", ["probe", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    ("nightly-profiles-not-a-list", ["nightly", "{tmp}/m-profiles-3.yaml"],
     "matrix {tmp}/m-profiles-3.yaml: key 'profiles' must be a list, not 3"),
    ("nightly-unknown-profile", ["nightly", "{tmp}/m-snpp.yaml"],
     "matrix {tmp}/m-snpp.yaml: profiles[0]: unknown profile 'snpp'; available: "),
    ("nightly-bad-timeout", ["nightly", "{tmp}/m-timeout.yaml"],
     "matrix {tmp}/m-timeout.yaml: key 'timeout' must be a number > 0, not -5"),
    ("nightly-bad-repeat", ["nightly", "{tmp}/m-repeat.yaml"],
     "matrix {tmp}/m-repeat.yaml: key 'repeat' must be a number >= 1, not 'often'"),
]


def _inputs(tmp: Path) -> None:
    """The files the cases name: a plain file, a corrupt run, a good-looking run, a bad fragment, a matrix."""
    (tmp / "file").write_text("not a kernel\n")
    (tmp / "corrupt").mkdir()
    (tmp / "corrupt" / "meta.json").write_text("{ not json")
    (tmp / "bad.config").write_text("# harness-base: tinyconfig\nthis is not kconfig\n")
    kernels = "kernels: [debian:linux-image-cloud-amd64]\n"
    (tmp / "matrix.yaml").write_text(kernels + "profiles: [emulated]\n")
    (tmp / "m-profiles-3.yaml").write_text(kernels + "profiles: 3\n")
    (tmp / "m-snpp.yaml").write_text(kernels + "profiles: [emulated, snpp]\n".replace("emulated, ", ""))
    (tmp / "m-timeout.yaml").write_text(kernels + "profiles: [emulated]\ntimeout: -5\n")
    (tmp / "m-repeat.yaml").write_text(kernels + "profiles: [emulated]\nrepeat: often\n")
    run = tmp / "run"
    run.mkdir()
    write_run(run, RunRecord(run_id="r", status=RunStatus.PASSED, started="2026-11-01T00:00:00",
                             kernel=KernelRecord("6.1"), profile=ProfileRecord("emulated", "emulated")))
    write_records(run, [TestRecord("test_boot.py::test_reached_userspace", "passed")])


@pytest.mark.parametrize(("argv", "names"), [pytest.param(a, n, id=i) for i, a, n in CASES])
def test_bad_input_is_exit_2_with_one_line_naming_the_thing(cli: Cli, argv: list[str], names: str) -> None:
    tmp = cli.tmp.parent / "in"
    tmp.mkdir()
    _inputs(tmp)
    args = [a.replace("{tmp}", str(tmp)) for a in argv]
    if args[0] in ("run", "nightly") and "--results" not in args:
        args += ["--results", str(cli.results)]
    proc = cli(*args, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stdout[-1000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert lines and lines[-1].startswith("harness: "), proc.stderr
    assert names.replace("{tmp}", str(tmp)) in lines[-1], lines[-1]
    assert cli.run_dirs() == [], "bad input left a run directory"
    assert not cli.results.exists() or not list(cli.results.glob("nightly-*")), "a refused night left a tree"


def test_qemu_arg_takes_a_value_that_starts_with_a_dash(cli: Cli) -> None:
    proc = cli("run", "--qemu-arg", "-S", "--qemu-arg", "-no-hpet", "--append", "-x", "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    argv = json.loads(proc.stdout)["argv"]
    assert argv[-2:] == ["-S", "-no-hpet"]


def test_append_keeps_the_kernels_double_quotes(cli: Cli) -> None:
    proc = cli("run", "--append", 'b="x y" c=1', "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["cmdline"].endswith(' b="x y" c=1')


def test_a_profile_extending_a_missing_parent_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "child.yaml").write_text("extends: no-such-parent\n")
    with pytest.raises(BadInput) as e:
        load_profile("child", tmp_path)
    assert str(e.value) == (f"profile child ({tmp_path / 'child.yaml'}): key 'extends' names 'no-such-parent', "
                            f"which is not a profile in {tmp_path}")
