"""The `harness` command: `entry()`; `main(argv)` returns the exit code (see errors.py)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, NoReturn

from harness.cli_args import build_parser, join_dash_values, parse_params
from harness.errors import EXIT_BAD_INPUT, BadInput, HarnessError, Terminated
from harness.process import raise_on_sigterm


def write_output(path: Path, text: str) -> None:
    """A report to the file the user named; BadInput (exit 2) naming it if it cannot be written."""
    try:
        path.write_text(text if text.endswith("\n") else text + "\n")
    except OSError as e:
        raise BadInput(f"--output {path}: {e.strerror}") from None


def entry() -> NoReturn:
    """The `harness` command (and `python -m harness`): `main`, then the process leaves.

    Tearing the interpreter down (freeing every module and object) took a run's end
    about 25 ms, after its results were written and closed. Where nothing else runs any
    more, the process leaves at once, its output flushed first."""
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BrokenPipeError:
        code = code or 1
    if threading.active_count() == 1:
        os._exit(code)
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    restore_sigterm = raise_on_sigterm()
    try:
        return _dispatch(args_list)
    except HarnessError as e:
        print(f"harness: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("harness: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except Terminated as e:
        print(f"harness: {e}", file=sys.stderr)
        return 128 + e.signum
    finally:
        restore_sigterm()


def _dispatch(argv: list[str]) -> int:
    parser = build_parser()
    passthrough: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, passthrough = argv[:i], argv[i + 1:]
    try:
        args, extra = parser.parse_known_args(join_dash_values(argv))
    except SystemExit as e:  # --help and --version
        return int(e.code or 0)
    if extra and args.command != "run":
        raise BadInput(f"harness {args.command}: unrecognized arguments: {' '.join(extra)}")
    if args.command == "probe":
        return _probe(args)
    if args.command == "run":
        return _run(args, [*extra, *passthrough], argv)
    if args.command == "boot":
        return _boot(args)
    if args.command == "build":
        return _build(args)
    if args.command == "reproduce":
        return _reproduce(args)
    if args.command == "bisect":
        return _bisect(args, passthrough, [*argv, "--", *passthrough] if passthrough else argv)
    if args.command == "compare":
        return _compare(args)
    if args.command == "nightly":
        return _nightly(args)
    if args.command == "host-state":
        from harness.hoststate import report

        return report(args.restore, args.json)
    if args.command == "export":
        return _export(args)
    return EXIT_BAD_INPUT


def _probe(args: argparse.Namespace) -> int:
    from harness.probe_report import probe

    return probe(args.qemu, use_cache=not args.no_cache, check_argv=args.check_argv, as_json=args.json)


def _run(args: argparse.Namespace, pytest_args: list[str], argv: list[str]) -> int:
    if args.json and not args.dry_run:
        raise BadInput("harness run: --json needs --dry-run")
    if args.label is not None and not args.label.strip():
        raise BadInput("harness run: --label needs a name")
    early = None
    if not args.dry_run and args.target is None and args.tests.is_dir():
        # The pytest child starts before the runner is even imported (see harness.pytest_child).
        from harness.pytest_child import EarlyPytest

        early = EarlyPytest(args.tests, pytest_args)
    try:
        from harness.runner import RunRequest, run

        req = RunRequest(kernel=args.kernel, profile=args.profile, append=args.append, results=args.results,
                         tests=args.tests, pytest_args=pytest_args, qemu_args=args.qemu_arg,
                         timeout=args.timeout, boot_timeout=args.boot_timeout, dry_run=args.dry_run,
                         json=args.json, params=parse_params(args.param, args.params), strict=args.strict,
                         force=args.force, channel=args.channel, target=args.target, identity=args.identity,
                         known_hosts=args.known_hosts, label=args.label.strip() if args.label else None)
        return run(req, argv, launcher=early)
    finally:
        if early is not None:
            early.stop()


def _build(args: argparse.Namespace) -> int:
    from harness.build import BuildFailed, BuildSpec, build, load_spec

    specs = [load_spec(p) for p in args.specs]
    if args.source:
        specs.append(BuildSpec(source=args.source, series=args.series, configs=args.config or ["base"]))
    elif args.series or args.config:
        raise BadInput("harness build: --series/--config need --source (or give SPEC.yaml files)")
    if not specs:
        raise BadInput("harness build: give SPEC.yaml files or --source")
    results = []
    for spec in specs:
        try:
            result = build(spec, per_patch=args.per_patch, allow_dropped=args.allow_dropped)
        except BuildFailed as e:
            if e.steps:
                _print_steps(e.steps)
            raise
        results.append(result)
        if args.json:
            continue
        if result.steps:
            _print_steps(result.steps)
        print(f"{result.artifact}/bzImage  {result.release}  "
              f"({'cache hit' if result.cached else 'built'} in {result.seconds:.1f}s)")
    if args.json:
        print(json.dumps([r.to_json() for r in results], indent=2))
    return 0


def _print_steps(steps: list[Any]) -> None:
    for s in steps:
        extra = f"  {len(s.new_warnings)} new warning(s): {s.new_warnings[0][:100]}" if s.new_warnings else ""
        extra += f"  {s.errors[0][:120]}" if s.errors else ""
        print(f"patch {s.index:2}  {s.status:6}  {s.seconds:6.1f}s  {s.subject}{extra}", file=sys.stderr)


def _boot(args: argparse.Namespace) -> int:
    from harness.reproduce import boot
    from harness.runner import RunRequest

    return boot(RunRequest(kernel=args.kernel, profile=args.profile, append=args.append,
                           qemu_args=args.qemu_arg, boot_timeout=args.boot_timeout,
                           params=parse_params(args.param, args.params), strict=args.strict,
                           force=args.force), args.results)


def _nightly(args: argparse.Namespace) -> int:
    from harness.nightly import jobs_default, merge_nights, run_nightly

    if (args.origin or args.log_url) and args.kcidb is None:
        raise BadInput("harness nightly: --origin and --log-url go with --kcidb FILE")
    if args.merge:
        night, code = args.results, merge_nights(args.merge, args.results)
    elif args.matrix is None:
        raise BadInput("harness nightly: give MATRIX.yaml (or --merge NIGHT...)")
    else:
        night, code = run_nightly(args.matrix, args.results, args.shard, args.jobs or jobs_default())
    if args.kcidb is not None:
        try:
            _write_kcidb([night], args.kcidb, args.origin, args.log_url)
        except HarnessError as e:
            # The night's own verdict comes first: a failed kernel stays exit 1.
            print(f"harness: KCIDB export of {night}: {e}", file=sys.stderr)
            return code or e.exit_code
    return code


def _write_kcidb(paths: list[Path], output: Path | None, origin: str | None, log_url: str | None) -> None:
    from harness.kcidb import DEFAULT_ORIGIN, export, write

    doc = export(paths, origin or DEFAULT_ORIGIN, log_url)
    try:
        text = write(doc, output)
    except OSError as e:
        raise BadInput(f"--output {output}: {e.strerror}") from None
    if output is None:
        print(text, end="")
    else:
        print(f"wrote {output}: KCIDB {doc['version']['major']}.{doc['version']['minor']}, "
              f"{len(doc['checkouts'])} checkout(s), {len(doc['builds'])} build(s), {len(doc['tests'])} test(s)",
              file=sys.stderr)


def _export(args: argparse.Namespace) -> int:
    _write_kcidb(args.results, args.output, args.origin, args.log_url)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from harness.compare import compare, load_run
    from harness.report import render
    from harness.runindex import history, indexed_runs

    rows: list[dict[str, Any]] | None = None
    if args.last is not None:
        if args.last < 1:
            raise BadInput("harness compare: --last takes a positive number")
        rows = history(args.results, args.last, args.test)
        runs = indexed_runs(rows)
    elif not args.runs:
        raise BadInput("harness compare: give RESULT directories, or --last N")
    else:
        runs = [load_run(p) for p in args.runs]
    text = render(args.format, compare(runs) if runs else None, rows, args.test)
    if args.output:
        write_output(args.output, text)
        print(f"wrote {args.output}")
    else:
        print(text)
    return 0


def _bisect(args: argparse.Namespace, pytest_args: list[str], argv: list[str]) -> int:
    from harness.bisect import bisect, spec_request
    from harness.bisect_record import BisectRequest

    req = BisectRequest(source=args.source or "", series=args.series, configs=args.config or ["base"],
                        good=args.good, bad=args.bad, profile=args.profile, append=args.append,
                        params=parse_params(args.param, args.params),
                        pytest_args=(["-k", args.keyword] if args.keyword else []) + pytest_args,
                        repeat=args.repeat, flaky_is=args.flaky_is, retries=args.retries, timeout=args.timeout,
                        results=str(args.results))
    if args.spec is not None:
        if args.source or args.series or args.config or args.good or args.bad:
            raise BadInput("harness bisect: SPEC.yaml or --source/--series/--config/--good/--bad, not both")
        req = spec_request(args.spec, req)
    elif not args.source:
        raise BadInput("harness bisect: give SPEC.yaml or --source")
    return bisect(req, argv, as_json=args.json)


def _reproduce(args: argparse.Namespace) -> int:
    from harness.reproduce import reproduce

    return reproduce(args.result, args.results, args.shell)
