"""A first, small set of dmesg rules: what no healthy boot prints.

Input: dmesg lines as `dmesg` prints them (`[    1.234567] text`), or the
console log. Each rule is data: an id, a category, a pattern.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class DmesgRule:
    id: str
    category: str
    pattern: re.Pattern[str]


@dataclass(frozen=True)
class DmesgHit:
    rule: str
    category: str
    line: str


RULES: tuple[DmesgRule, ...] = (
    DmesgRule("panic", "crash", re.compile(r"Kernel panic - not syncing")),
    DmesgRule("oops", "crash", re.compile(r"\bOops: |general protection fault")),
    DmesgRule("bug", "crash", re.compile(r"\bBUG: ")),
    DmesgRule("warning", "warning", re.compile(r"WARNING: (CPU|at) |------------\[ cut here \]------------")),
    DmesgRule("call-trace", "warning", re.compile(r"\bCall Trace:")),
)


def scan(lines: Iterable[str], rules: tuple[DmesgRule, ...] = RULES) -> list[DmesgHit]:
    hits = []
    for line in lines:
        for rule in rules:
            if rule.pattern.search(line):
                hits.append(DmesgHit(rule.id, rule.category, line.rstrip()))
                break
    return hits
