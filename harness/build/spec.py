"""Build specs: a YAML file naming a kernel's source, series and config fragments."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from harness.errors import BadInput
from harness.paths import KCONFIGS_DIR, load_yaml


@dataclass
class BuildSpec:
    source: str
    series: str | None = None
    configs: list[str] = field(default_factory=lambda: ["base"])


def load_spec(path: Path, extra_keys: tuple[str, ...] = ()) -> BuildSpec:
    """A build spec YAML: {source, series, configs}; relative paths are relative to the file.
    `extra_keys` are allowed beside them and left to the caller (bisect's good and bad)."""
    data = load_yaml(path, "build spec", memo=True)
    if not isinstance(data, dict) or "source" not in data:
        raise BadInput(f"build spec {path}: needs a 'source' key")
    known = ("source", "series", "configs", *extra_keys)
    unknown = set(data) - set(known)
    if unknown:
        raise BadInput(f"build spec {path}: unknown key {sorted(unknown)[0]!r}; known: {', '.join(known)}")

    def rel(value: str | None) -> str | None:
        if value is None or "@" in value and "/" not in value or Path(value).is_absolute():
            return value
        return str((path.parent / value).resolve())

    configs = data.get("configs", ["base"])
    if not isinstance(configs, list):
        raise BadInput(f"build spec {path}: key 'configs' must be a list")
    return BuildSpec(source=str(rel(str(data["source"]))), series=rel(data.get("series")),
                     configs=[c if (KCONFIGS_DIR / f"{c}.config").exists() else str(rel(c)) for c in configs])
