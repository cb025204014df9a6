"""The run index: results/index.sqlite, to which every run adds itself.

It answers `harness compare --last N [--test NAME]`: the last N runs, each
with its kernel named by its build (the label it was run with, else the
release and series, told apart from the other builds in the window), and
since when a test has been failing. An index written by an older harness
gains the build columns on first use; its rows know only their release.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.errors import BadInput
from harness.identity import BuildIdentity, names_by_key
from harness.results import read_records
from harness.rundir import read_run

if TYPE_CHECKING:
    from harness.compare import RunSummary

INDEX = "index.sqlite"
_COLUMNS = (("run_id", "TEXT PRIMARY KEY"), ("dir", "TEXT"), ("started", "TEXT"), ("kernel", "TEXT"),
            ("profile", "TEXT"), ("status", "TEXT"), ("boot", "REAL"), ("build", "TEXT"), ("label", "TEXT"))


def _open(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=30)
    db.execute(f"CREATE TABLE IF NOT EXISTS runs ({', '.join(f'{n} {t}' for n, t in _COLUMNS)})")
    db.execute("CREATE TABLE IF NOT EXISTS tests (run_id TEXT, nodeid TEXT, status TEXT, "
               "PRIMARY KEY (run_id, nodeid))")
    have = {row[1] for row in db.execute("PRAGMA table_info(runs)")}
    for name, kind in _COLUMNS:
        if name not in have:
            db.execute(f"ALTER TABLE runs ADD COLUMN {name} {kind}")
    return db


def index_run(run_dir: Path) -> None:
    """Add (or replace) one run in index.sqlite beside it. Raises BadInput for a bad run directory."""
    record, tests = read_run(run_dir), read_records(run_dir)
    boot = record.timings.boot if record.timings else None
    identity = record.kernel.identity(record.target)
    db = _open(run_dir.parent / INDEX)
    try:
        with db:
            db.execute(f"INSERT OR REPLACE INTO runs ({', '.join(n for n, _ in _COLUMNS)}) "
                       f"VALUES ({', '.join('?' for _ in _COLUMNS)})",
                       (record.run_id, str(run_dir), record.started, str(record.kernel.release),
                        record.profile.label, record.status.value, boot, json.dumps(identity.to_json()),
                        record.kernel.label))
            db.execute("DELETE FROM tests WHERE run_id = ?", (record.run_id,))
            db.executemany("INSERT INTO tests VALUES (?, ?, ?)",
                           [(record.run_id, t.nodeid, t.status) for t in tests])
    finally:
        db.close()


def _identity(row: dict[str, Any]) -> BuildIdentity:
    if row.get("build"):
        try:
            return BuildIdentity.from_json(json.loads(row["build"]))
        except (ValueError, KeyError, TypeError):
            pass
    # A row an older harness wrote: its run's record still tells the image, while it exists.
    try:
        record = read_run(Path(row["dir"]))
        return record.kernel.identity(record.target)
    except BadInput:
        release = str(row.get("kernel") or "unknown")
        return BuildIdentity(f"release:{release}", release)


def history(results_root: Path, last: int, test: str | None) -> list[dict[str, Any]]:
    """The last N indexed runs (newest first), optionally with one test's status in each.

    Each row has `name` (its build's name in this window) and `build` (the full identity).
    Raises BadInput when there is no index.
    """
    path = results_root / INDEX
    if not path.exists():
        raise BadInput(f"{path}: no run index yet (runs written with `harness run` add themselves)")
    db = _open(path)
    try:
        db.row_factory = sqlite3.Row
        rows = db.execute("SELECT * FROM runs ORDER BY started DESC, run_id DESC LIMIT ?", (last,)).fetchall()
        out = []
        for row in rows:
            item = dict(row)
            if test is not None:
                hit = db.execute("SELECT nodeid, status FROM tests WHERE run_id = ? AND (nodeid = ? OR nodeid "
                                 "LIKE ?)", (row["run_id"], test, f"%::{test}")).fetchone()
                item["test"] = hit["nodeid"] if hit else test
                item["test_status"] = hit["status"] if hit else "absent"
            out.append(item)
    finally:
        db.close()
    identities = [_identity(item) for item in out]
    names = names_by_key([(identity, item.get("label")) for identity, item in zip(identities, out, strict=True)])
    for identity, item in zip(identities, out, strict=True):
        item["build"], item["name"] = identity.to_json(), names[identity.key]
    return out


def render_history(rows: list[dict[str, Any]], test: str | None) -> str:
    width = max([len(str(row["name"])) for row in rows] + [6])
    lines = []
    for row in rows:
        extra = f"  {row['test_status']:8}" if test else ""
        key = BuildIdentity(row["build"]["key"], "").short_key
        lines.append(f"{row['started'][:19]:19}  {row['run_id']:60}  {row['name']:{width}}  {key:21}  "
                     f"{row['status']:11}{extra}".rstrip())
    if test:
        lines.append(failing_since(rows, test))
    return "\n".join(lines) if lines else "(no runs)"


def failing_since(rows: list[dict[str, Any]], test: str) -> str:
    """Rows newest first: the oldest run of the current failing streak, or why there is none."""
    bad = ("failed", "error")
    streak = 0
    while streak < len(rows) and rows[streak]["test_status"] in bad:
        streak += 1
    if streak == 0:
        return f"{test}: not failing in the newest run"
    start = rows[streak - 1]
    more = " (or earlier: the window ends here)" if streak == len(rows) else ""
    return f"{test} has failed since {start['run_id']} (kernel {start.get('name') or start['kernel']}){more}"


def indexed_runs(rows: list[dict[str, Any]]) -> list[RunSummary]:
    """The runs of `rows` (newest first) read back from their directories, oldest first: the order
    `compare` takes its base from. A directory removed since is named on stderr and left out."""
    from harness.compare import load_run  # here: a run adding itself to the index needs none of it

    runs = []
    for row in reversed(rows):
        try:
            runs.append(load_run(Path(row["dir"])))
        except BadInput as e:
            print(f"warning: run {row['run_id']} left out: {e}", file=sys.stderr)
    return runs
