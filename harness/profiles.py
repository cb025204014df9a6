"""QEMU launch profiles: `qemu_cmdlines/<name>.yaml` loaded into frozen objects.

A profile may `extends:` another; its keys replace the parent's, except keys
written `+key:` whose list is appended to the parent's (`+cmdline: [swiotlb=force]`).
Unknown keys, wrong types and unknown names are BadInput naming the file and key.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from harness.errors import BadInput
from harness.paths import PROFILES_DIR

_LIST_KEYS = ("cmdline", "devices", "args", "modules", "needs", "hotplug", "scratch_disks")
COCO_KINDS = ("none", "sev", "sev-es", "snp", "tdx")
# What a profile may say it needs; HostCaps.check() decides each one.
NEEDS = ("kvm", "sev", "sev_es", "sev_snp", "tdx", "iommu", "vfio_pci", "firmware", "qemu:sev-guest",
         "qemu:sev-snp-guest", "qemu:tdx-guest", "qemu:vfio-tio")
# Parameters every profile takes; a profile's `params:` adds its own with defaults.
BUILTIN_PARAMS = ("memory", "smp")


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
    coco: str = "none"
    firmware: str | None = None
    hotplug: tuple[str, ...] = ()
    scratch_disks: tuple[str, ...] = ()
    params: tuple[tuple[str, str], ...] = ()
    timeouts: Timeouts = field(default_factory=Timeouts)
    source: tuple[str, ...] = ()

    def param(self, name: str) -> str | None:
        return dict(self.params).get(name)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Timeouts):
                value = {t.name: getattr(value, t.name) for t in fields(Timeouts)}
            out[f.name] = value
        out["params"] = dict(self.params)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Profile:
        """Rebuild a profile exactly as a plan recorded it (YAML may have changed since)."""
        kwargs = dict(data)
        for f in fields(cls):
            if isinstance(f.default, tuple) or f.name in ("cmdline", "source"):
                kwargs[f.name] = tuple(kwargs.get(f.name) or ())
        kwargs["params"] = tuple(sorted((str(k), str(v)) for k, v in (data.get("params") or {}).items()))
        kwargs["timeouts"] = Timeouts(**data.get("timeouts", {}))
        return cls(**kwargs)


_SCALARS: dict[str, type | tuple[type, ...]] = {
    "description": str, "machine": str, "accel": str, "smp": int, "memory": (int, str),
    "hotplug_ports": int, "twin": (str, type(None)), "extends": str, "cpu": dict,
    "timeouts": dict, "coco": str, "firmware": (str, type(None)), "params": dict,
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
        elif key in ("cpu", "timeouts", "params"):
            merged[key] = {**merged.get(key, {}), **value}
        else:
            merged[key] = value
    return merged, (*sources, str(path))


def load_profile(name: str, directory: Path = PROFILES_DIR) -> Profile:
    """Load a profile by name. Raises BadInput naming the file and key at fault."""
    data, sources = _merged(name, directory)
    where = f"profile {name}"
    kwargs: dict[str, Any] = {"name": name, "source": sources}
    for key in ("description", "machine", "accel", "smp", "hotplug_ports", "twin", "coco", "firmware"):
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
    for disk in kwargs.get("scratch_disks", ()):
        node, _, size = disk.partition(":")
        if not node.isidentifier() or not size:
            raise BadInput(f"{where}: key 'scratch_disks': {disk!r} is not <node-name>:<size>")
        _memory_mib(size, f"{where}: key 'scratch_disks'")
    if kwargs.get("coco", "none") not in COCO_KINDS:
        raise BadInput(f"{where}: key 'coco' must be one of {', '.join(COCO_KINDS)}")
    for need in kwargs.get("needs", ()):
        if need not in NEEDS:
            raise BadInput(f"{where}: key 'needs': unknown capability {need!r}; known: {', '.join(NEEDS)}")
    params = data.get("params", {})
    for key, value in params.items():
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise BadInput(f"{where}: key 'params.{key}' must be a string or a number")
    kwargs["params"] = tuple(sorted((str(k), str(v)) for k, v in params.items()))
    profile = Profile(**kwargs)
    # A template naming a parameter the profile does not declare is a profile bug: say so now.
    apply_params(profile, {})
    return profile


def _expand(text: str, values: dict[str, str], where: str) -> str:
    try:
        return text.format_map(values)
    except KeyError as e:
        raise BadInput(f"{where}: {{{e.args[0]}}} is not a parameter of the profile") from None
    except (ValueError, IndexError) as e:
        raise BadInput(f"{where}: bad template {text!r}: {e}") from None


def apply_params(profile: Profile, overrides: dict[str, str], strict: bool = True) -> Profile:
    """Fill `{name}` templates with the profile's parameters and the user's overrides.

    `memory` and `smp` set the machine size. An override the profile does not
    declare is BadInput when `strict` (the requested profile), ignored otherwise
    (a fallback twin does not take, say, the C-bit position).
    """
    values = dict(profile.params)
    for key, value in overrides.items():
        if key not in values and key not in BUILTIN_PARAMS:
            if strict:
                known = ", ".join(sorted([*values, *BUILTIN_PARAMS]))
                raise BadInput(f"profile {profile.name}: unknown parameter {key!r}; known: {known}")
            continue
        values[key] = value
    where = f"profile {profile.name}"
    changes: dict[str, Any] = {
        key: tuple(_expand(v, values, f"{where}: key '{key}'") for v in getattr(profile, key))
        for key in ("cmdline", "devices", "args", "hotplug")
    }
    changes["machine"] = _expand(profile.machine, values, f"{where}: key 'machine'")
    if profile.firmware is not None:
        changes["firmware"] = _expand(profile.firmware, values, f"{where}: key 'firmware'")
    if "memory" in overrides:
        changes["memory_mib"] = _memory_mib(overrides["memory"], f"{where}: parameter 'memory'")
    if "smp" in overrides:
        if not str(overrides["smp"]).isdigit() or int(overrides["smp"]) < 1:
            raise BadInput(f"{where}: parameter 'smp' must be a positive integer")
        changes["smp"] = int(overrides["smp"])
    changes["params"] = tuple(sorted(values.items()))
    return replace(profile, **changes)
