"""QEMU launch profiles: `qemu_cmdlines/<name>.yaml` loaded into frozen objects.

A profile may `extends:` another; its keys replace the parent's, except keys
written `+key:` whose list is appended to the parent's (`+cmdline: [swiotlb=force]`).
Unknown keys, wrong types and unknown names are BadInput naming the file and key.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from harness.errors import BadInput
from harness.paths import PROFILES_DIR

_LIST_KEYS = ("cmdline", "devices", "args", "modules", "needs")


@dataclass(frozen=True)
class Timeouts:
    boot: float = 60.0
    command: float = 60.0
    shutdown: float = 10.0


@dataclass(frozen=True)
class Profile:
    name: str
    description: str = ""
    machine: str = "q35"
    accel: str = "auto"
    cpu_kvm: str = "host"
    cpu_tcg: str = "max"
    smp: int = 1
    memory_mib: int = 1024
    cmdline: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    hotplug_ports: int = 0
    modules: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()
    twin: str | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)
    source: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Timeouts):
                value = {t.name: getattr(value, t.name) for t in fields(Timeouts)}
            out[f.name] = value
        return out


_SCALARS: dict[str, type | tuple[type, ...]] = {
    "description": str, "machine": str, "accel": str, "smp": int, "memory": (int, str),
    "hotplug_ports": int, "twin": (str, type(None)), "extends": str, "cpu": dict,
    "timeouts": dict,
}
KNOWN_KEYS = sorted([*_SCALARS, *_LIST_KEYS, *(f"+{k}" for k in _LIST_KEYS)])


def available(directory: Path = PROFILES_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.yaml"))


def _memory_mib(value: int | str, where: str) -> int:
    if isinstance(value, int):
        return value
    text = value.strip().upper().removesuffix("B")
    scale = {"M": 1, "G": 1024}.get(text[-1:], None)
    number = text[:-1] if scale else text
    if not number.isdigit():
        raise BadInput(f"{where}: memory {value!r} is not a size like 1024, 512M or 2G")
    return int(number) * (scale or 1)


def _read(name: str, directory: Path) -> tuple[Path, dict[str, Any]]:
    path = directory / f"{name}.yaml"
    if not path.is_file():
        names = ", ".join(available(directory))
        raise BadInput(f"unknown profile {name!r}; available: {names}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark else ""
        raise BadInput(f"profile {name} ({path}{at}): malformed YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise BadInput(f"profile {name} ({path}): expected a mapping at the top level")
    for key, value in data.items():
        where = f"profile {name} ({path}): key {key!r}"
        if key not in KNOWN_KEYS:
            raise BadInput(f"profile {name} ({path}): unknown key {key!r}; known: {', '.join(KNOWN_KEYS)}")
        base = key.lstrip("+")
        if base in _LIST_KEYS:
            if not isinstance(value, list) or not all(isinstance(v, (str, int)) for v in value):
                raise BadInput(f"{where}: expected a list of strings")
        elif not isinstance(value, _SCALARS[key]) or isinstance(value, bool):
            raise BadInput(f"{where}: expected {_type_name(_SCALARS[key])}, got {type(value).__name__}")
    return path, data


def _type_name(t: type | tuple[type, ...]) -> str:
    if isinstance(t, tuple):
        return " or ".join(x.__name__ for x in t if x is not type(None))
    return t.__name__


def _merged(name: str, directory: Path, chain: tuple[str, ...] = ()) -> tuple[dict[str, Any], tuple[str, ...]]:
    if name in chain:
        raise BadInput(f"profile {name}: 'extends' loop: {' -> '.join((*chain, name))}")
    path, data = _read(name, directory)
    merged: dict[str, Any] = {}
    sources: tuple[str, ...] = ()
    parent = data.get("extends")
    if parent:
        merged, sources = _merged(parent, directory, (*chain, name))
    for key, value in data.items():
        if key == "extends":
            continue
        if key.startswith("+"):
            merged[key[1:]] = [*merged.get(key[1:], []), *value]
        elif key in ("cpu", "timeouts"):
            merged[key] = {**merged.get(key, {}), **value}
        else:
            merged[key] = value
    return merged, (*sources, str(path))


def load_profile(name: str, directory: Path = PROFILES_DIR) -> Profile:
    """Load a profile by name. Raises BadInput naming the file and key at fault."""
    data, sources = _merged(name, directory)
    where = f"profile {name}"
    kwargs: dict[str, Any] = {"name": name, "source": sources}
    for key in ("description", "machine", "accel", "smp", "hotplug_ports", "twin"):
        if key in data:
            kwargs[key] = data[key]
    if "memory" in data:
        kwargs["memory_mib"] = _memory_mib(data["memory"], where)
    for key in _LIST_KEYS:
        if key in data:
            kwargs[key] = tuple(str(v) for v in data[key])
    cpu = data.get("cpu", {})
    for mode, value in cpu.items():
        if mode not in ("kvm", "tcg") or not isinstance(value, str):
            raise BadInput(f"{where}: key 'cpu' takes {{kvm: <model>, tcg: <model>}}, got {mode!r}")
        kwargs[f"cpu_{mode}"] = value
    times = data.get("timeouts", {})
    allowed = [t.name for t in fields(Timeouts)]
    for key, value in times.items():
        if key not in allowed or not isinstance(value, (int, float)) or value <= 0:
            raise BadInput(f"{where}: key 'timeouts.{key}' must be one of {allowed} with a positive number")
    kwargs["timeouts"] = Timeouts(**{k: float(v) for k, v in times.items()})
    if kwargs.get("accel", "auto") not in ("auto", "kvm", "tcg"):
        raise BadInput(f"{where}: key 'accel' must be auto, kvm or tcg")
    return Profile(**kwargs)
