"""Patch series: an mbox, a quilt-style directory of patches, or a lore message-id."""

from __future__ import annotations

import hashlib
import re
import shutil
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from harness.build.command import git, run
from harness.errors import BadInput


@dataclass(frozen=True)
class Patch:
    path: str
    subject: str
    sha256: str
    data: bytes = field(repr=False)

    def to_json(self) -> dict[str, str]:
        return {"file": self.path, "subject": self.subject, "sha256": self.sha256}

    @cached_property
    def paths(self) -> frozenset[str]:
        """The files the patch names: both sides of each `diff --git`, `---`/`+++` and
        rename line (read from its text once, without a tree; /dev/null left out)."""
        text = self.data.decode("utf-8", "surrogateescape")
        found: set[str] = set()
        for m in _PATH_LINE.finditer(text):
            names = m.group(1).split(" b/", 1) if m.group(0).startswith("diff") else [m.group(2)]
            found.update(_unprefix(n.strip()) for n in names)
        found.discard("/dev/null")
        return frozenset(found)


# `diff --git a/X b/Y`, `--- a/X`, `+++ b/Y`, `rename from X`, `rename to Y`.
_PATH_LINE = re.compile(r"^(?:diff --git (.+)|(?:---|\+\+\+|rename from|rename to) (\S+).*)$", re.M)


def _unprefix(name: str) -> str:
    return name[2:] if name[:2] in ("a/", "b/") else name


def _subject(data: bytes, fallback: str) -> str:
    m = re.search(rb"^Subject: (.*(?:\n[ \t].*)*)", data, re.M)
    if not m:
        return fallback
    text = re.sub(r"\s+", " ", m.group(1).decode("utf-8", "replace")).strip()
    return re.sub(r"^\[[^\]]*PATCH[^\]]*\]\s*", "", text)


def _patch(path: Path, label: str) -> Patch:
    data = path.read_bytes()
    return Patch(label, _subject(data, path.name), hashlib.sha256(data).hexdigest(), data)


def load_series(spec: str | None, workdir: Path) -> list[Patch]:
    """An mbox, a directory of *.patch (ordered by a quilt `series` file if any), or
    a lore message-id fetched with b4. Raises BadInput naming what is wrong."""
    if not spec:
        return []
    path = Path(spec)
    if not path.exists():
        if "@" in spec and "/" not in spec:
            return _b4_series(spec, workdir)
        raise BadInput(f"series {spec}: no such file or directory")
    if path.is_dir():
        order_file = path / "series"
        if order_file.is_file():
            names = [line.split()[0] for line in order_file.read_text().splitlines()
                     if line.strip() and not line.lstrip().startswith("#")]
            missing = [n for n in names if not (path / n).is_file()]
            if missing:
                raise BadInput(f"series {order_file}: lists {missing[0]}, which is not in {path}")
        else:
            names = sorted(p.name for p in path.glob("*.patch"))
        if not names:
            raise BadInput(f"series {spec}: no *.patch files and no series file")
        return [_patch(path / n, str(path / n)) for n in names]
    data = path.read_bytes()
    if data.startswith(b"From ") and data.count(b"\nFrom ") >= 1:
        return _split_mbox(path, workdir)
    return [_patch(path, str(path))]


def _split_mbox(path: Path, workdir: Path) -> list[Patch]:
    out = workdir / "mbox"
    out.mkdir(parents=True, exist_ok=True)
    proc = git(None, "mailsplit", f"-o{out}", str(path), timeout=60)
    if not proc.ok:
        raise BadInput(f"series {path}: not a readable mbox: {proc.err.strip()}")
    parts = sorted(out.iterdir())
    return [_patch(p, f"{path}#{i + 1}") for i, p in enumerate(parts)]


def _b4_series(msgid: str, workdir: Path) -> list[Patch]:
    b4 = shutil.which("b4")
    if b4 is None:
        raise BadInput(f"series {msgid}: looks like a message-id, but b4 is not installed")
    out = workdir / "b4"
    out.mkdir(parents=True, exist_ok=True)
    proc = run([b4, "am", "-o", str(out), msgid], timeout=300)
    mboxes = sorted(out.glob("*.mbx"))
    if not proc.ok or not mboxes:
        raise BadInput(f"series {msgid}: b4 could not fetch it: {(proc.err or proc.out).strip()[-200:]}")
    return _split_mbox(mboxes[0], workdir)
