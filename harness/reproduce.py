"""`harness reproduce` and `harness boot`: a recorded run again, and a kernel
booted with its console on this terminal (the developer reproducing a boot).

A run is reproduced from its record (meta.json): the same kernel image (its
sha256 checked), profile and parameters, kernel command line, QEMU arguments
and test selection; `RESULT/tests/<name>` narrows it to that one test.
"""

from __future__ import annotations

import shlex
import sys
import tempfile
import time
from pathlib import Path

from harness.errors import BadInput
from harness.kernel import file_sha256
from harness.process import sweep_stale
from harness.results import read_records
from harness.rundir import RunRecord, is_run_dir, new_run_id, read_run
from harness.runner import RunRequest, make_plan, run


def boot(req: RunRequest, results: Path) -> int:
    """Boot the plan of `req` with the guest console on this terminal (Ctrl-] leaves).

    Returns 0 when the guest stopped normally, 1 otherwise. Raises BadInput/InfraError as make_plan does.
    """
    from harness.console_tty import attach, write_through
    from harness.machine import Machine

    plan, _ = make_plan(req)
    sweep_stale()
    log_dir = results.resolve() / ("boot-" + new_run_id(plan.kernel.release, plan.profile.name))
    print(f"booting {plan.kernel.release} under {plan.profile.name} ({plan.accel}); "
          f"console log {log_dir}/console.log; Ctrl-] leaves", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="harness-") as socks, \
            Machine(plan, log_dir, name="harness-boot", sock_parent=Path(socks),
                    console_sink=write_through) as machine:
        status = attach(machine)
    print(f"\r\nharness: guest stopped; console log {log_dir}/console.log", file=sys.stderr)
    return 0 if status == 0 else 1


def locate(result: Path) -> tuple[Path, list[str]]:
    """The run directory RESULT names, and the node ids of the test(s) it narrows to (none: all).

    Raises BadInput when RESULT is neither a run directory nor one of its tests.
    """
    resolved = result.resolve()
    run_dir = resolved.parent.parent
    if resolved.parent.name == "tests" and is_run_dir(run_dir):
        # RESULT/tests/<name>: that one test, by the node id the run recorded for it.
        match = [r.nodeid for r in read_records(run_dir) if r.dirname == resolved.name]
        if not match:
            raise BadInput(f"{result}: no test of run {run_dir.name} is recorded under that name")
        return run_dir, match
    if not is_run_dir(resolved):
        raise BadInput(f"{result}: not a run directory (no meta.json)")
    return resolved, []


def request_for(record: RunRecord, run_dir: Path, selection: list[str], results: Path | None) -> RunRequest:
    """The request that re-runs `record` exactly. Raises BadInput when it cannot be re-run here."""
    inv = record.invocation
    if inv is None:
        raise BadInput(f"{run_dir}/meta.json: no 'invocation' key to reproduce from")
    if inv.target is not None:
        raise BadInput(f"{run_dir}: a remote-target run is reproduced by running it again on its target")
    if record.kernel.image is None or record.kernel.sha256 is None:
        raise BadInput(f"{run_dir}/meta.json: no kernel image recorded to reproduce with")
    image = Path(record.kernel.image)
    if not image.is_file() or file_sha256(image) != record.kernel.sha256:
        raise BadInput(f"kernel {image} of run {record.run_id} is missing or changed since (sha256)")
    pytest_args = [str(Path(inv.tests) / n) for n in selection] if selection else list(inv.pytest_args)
    return RunRequest.from_invocation(inv, kernel=str(image), results=results or run_dir.parent,
                                      pytest_args=pytest_args, reproduces=record.run_id)


def reproduce(result: Path, results: Path | None = None, shell: bool = False) -> int:
    """Re-run the run (or test) RESULT names, into `results` (default: beside it); returns its exit code.

    With `shell`, boot it as recorded and hand over the guest console instead.
    Raises BadInput for a RESULT that cannot be reproduced (see request_for).
    """
    run_dir, selection = locate(result)
    record = read_run(run_dir)
    req = request_for(record, run_dir, selection, results)
    if shell:
        print(f"booting {record.run_id} as recorded; the guest console is yours (Ctrl-] leaves)", flush=True)
        return boot(req, req.results)
    what = f"{selection[0]} of " if selection else ""
    print(f"reproducing {what}{record.run_id}: {shlex.join(record.command)}", flush=True)
    start = time.monotonic()
    code = run(req, ["reproduce", str(run_dir)])
    print(f"reproduce of {record.run_id}: exit {code} (recorded exit {record.exit_code}) "
          f"in {time.monotonic() - start:.1f}s")
    return code
