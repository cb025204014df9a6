"""The dmesg rule engine: rules as data (dmesg_rules.yaml), stable error ids.

Input: kernel log lines as `dmesg` prints them (`[    1.234567] text`), the
console log, or printk lines with a `<N>` level or `[    T1]` caller prefix.
Each line is claimed by the first matching rule. An error id is the rule id
plus a hash of the line with what changes between runs and kernels
(timestamps, addresses, offsets, PIDs, CPU numbers, versions, source line
numbers, other numbers) normalised away: the same bug on two kernels gets the
same id.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from harness.errors import BadInput
from harness.paths import parse_yaml

RULES_FILE = Path(__file__).resolve().parent / "dmesg_rules.yaml"
SEVERITIES = ("error", "warning")


@dataclass(frozen=True)
class DmesgRule:
    id: str
    category: str
    severity: str
    pattern: re.Pattern[str]


@dataclass(frozen=True)
class DmesgHit:
    rule: str
    category: str
    severity: str
    line: str
    error_id: str


@dataclass(frozen=True)
class Allow:
    """An allowlist entry: lines of `rule` (or any rule) matching `pattern` are known noise."""

    pattern: re.Pattern[str]
    rule: str | None
    reason: str


def _compile(text: str, where: str) -> re.Pattern[str]:
    try:
        return re.compile(text)
    except re.error as e:
        raise BadInput(f"{where}: bad pattern {text!r}: {e}") from None


def load_rules(path: Path = RULES_FILE) -> tuple[DmesgRule, ...]:
    """Rules from YAML. Raises BadInput naming the file, entry and key."""
    import yaml  # here: the console reader's patterns need no YAML

    try:
        data = parse_yaml(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise BadInput(f"dmesg rules {path}: {e}") from None
    if not isinstance(data, list):
        raise BadInput(f"dmesg rules {path}: expected a list of rules")
    rules = []
    for i, entry in enumerate(data):
        where = f"dmesg rules {path}: entry {i + 1}"
        if not isinstance(entry, dict) or set(entry) != {"id", "category", "severity", "pattern"}:
            raise BadInput(f"{where}: needs exactly the keys id, category, severity, pattern")
        if entry["severity"] not in SEVERITIES:
            raise BadInput(f"{where} ({entry['id']}): key 'severity' must be error or warning")
        rules.append(DmesgRule(str(entry["id"]), str(entry["category"]), entry["severity"],
                               _compile(str(entry["pattern"]), where)))
    return tuple(rules)


def load_allowlist(path: Path) -> tuple[Allow, ...]:
    """Allowlist YAML: a list of {pattern, reason[, rule]}. A missing file allows nothing."""
    if not path.exists():
        return ()
    import yaml

    try:
        data = parse_yaml(path.read_text()) or []
    except yaml.YAMLError as e:
        raise BadInput(f"dmesg allowlist {path}: malformed YAML: {getattr(e, 'problem', e)}") from None
    out = []
    for i, entry in enumerate(data):
        where = f"dmesg allowlist {path}: entry {i + 1}"
        if not isinstance(entry, dict) or "pattern" not in entry or "reason" not in entry:
            raise BadInput(f"{where}: needs the keys pattern and reason (rule is optional)")
        out.append(Allow(_compile(str(entry["pattern"]), where), entry.get("rule"), str(entry["reason"])))
    return tuple(out)


_PREFIX = re.compile(r"^(<\d+>)?(\[\s*\d+\.\d+\]\s*)?(\[\s*[TC]\d+\]\s*)?")
_NORMALISE = (
    (re.compile(r"\+0x[0-9a-f]+/0x[0-9a-f]+"), ""),                     # symbol+off/len
    (re.compile(r"\b(Not tainted|Tainted: ).*"), ""),                     # taint flags, release, build
    (re.compile(r"\b\d+\.\d+\.\d+[-+.\w]*"), "<ver>"),                    # kernel versions
    (re.compile(r"\b(CPU|PID|cpu|pid)(: ?|=)\d+"), r"\1\2<n>"),
    (re.compile(r"(\.[ch]):\d+"), r"\1:<n>"),                           # source line numbers
    (re.compile(r"\b0x[0-9a-fA-F]+\b"), "<hex>"),
    (re.compile(r"\b[0-9a-fA-F]{8,}\b"), "<hex>"),                       # bare addresses
    (re.compile(r"\d+"), "<n>"),
    (re.compile(r"\s+"), " "),
)


def normalise(line: str) -> str:
    text = _PREFIX.sub("", line.strip())
    for pattern, repl in _NORMALISE:
        text = pattern.sub(repl, text)
    return text.strip()


def error_id(rule: str, line: str) -> str:
    return f"{rule}-{hashlib.sha1(normalise(line).encode()).hexdigest()[:10]}"


_DEFAULT: tuple[DmesgRule, ...] | None = None


def default_rules() -> tuple[DmesgRule, ...]:
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = load_rules()
    return _DEFAULT


def scan(lines: Iterable[str], rules: tuple[DmesgRule, ...] | None = None,
         allow: tuple[Allow, ...] = ()) -> list[DmesgHit]:
    """Every line some rule claims, minus the allowlisted ones, in order."""
    hits = []
    for line in lines:
        for rule in rules or default_rules():
            if rule.pattern.search(line):
                if not any(a.pattern.search(line) and a.rule in (None, rule.id) for a in allow):
                    hits.append(DmesgHit(rule.id, rule.category, rule.severity, line.rstrip(),
                                         error_id(rule.id, line)))
                break
    return hits


def errors(hits: Iterable[DmesgHit]) -> list[DmesgHit]:
    return [h for h in hits if h.severity == "error"]


def describe(hits: list[DmesgHit], limit: int = 5) -> str:
    shown = " | ".join(f"{h.error_id}: {_PREFIX.sub('', h.line)[:160]}" for h in hits[:limit])
    more = f" (+{len(hits) - limit} more)" if len(hits) > limit else ""
    return shown + more
