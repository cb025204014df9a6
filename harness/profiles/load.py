"""Loading profiles: `qemu_cmdlines/<name>.yaml`, its keys checked against the
schema, `extends:` resolved (`+key:` appends to the parent's list), into a `Profile`."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

from harness.errors import BadInput
from harness.paths import PROFILES_DIR, memo_get, memo_put, parse_yaml
from harness.profiles.model import COCO_KINDS, NEEDS, Profile, Timeouts, size_mib
from harness.profiles.params import apply_params

_LIST_KEYS = ("cmdline", "devices", "args", "modules", "needs", "hotplug", "scratch_disks")
_SCALARS: dict[str, type | tuple[type, ...]] = {
    "description": str, "machine": str, "accel": str, "smp": int, "memory": (int, str),
    "hotplug_ports": int, "twin": (str, type(None)), "extends": str, "cpu": dict,
    "timeouts": dict, "coco": str, "firmware": (str, type(None)), "params": dict,
    "object": dict, "object_params": dict,
}
KNOWN_KEYS = sorted([*_SCALARS, *_LIST_KEYS, *(f"+{k}" for k in _LIST_KEYS)])


def available(directory: Path = PROFILES_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.yaml"))


def _read(name: str, directory: Path) -> tuple[Path, dict[str, Any]]:
    path = directory / f"{name}.yaml"
    if not path.is_file():
        names = ", ".join(available(directory))
        raise BadInput(f"unknown profile {name!r}; available: {names}")
    data = _parse(name, path)
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


def _parse(name: str, path: Path) -> Any:
    """A profile file's document. What a file's text parsed to is kept in the cache (as JSON,
    with the text): parsing, most of it importing PyYAML and libyaml, took every run 30-40 ms
    before its VM could start."""
    text = path.read_text()
    kept = memo_get(PARSED, str(path), text)
    if kept is not None:
        return kept
    import yaml  # here: a profile taken from the cache, or a plan read back, needs no YAML

    try:
        data = parse_yaml(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark else ""
        raise BadInput(f"profile {name} ({path}{at}): malformed YAML: {getattr(e, 'problem', e)}") from None
    try:
        if json.loads(json.dumps(data)) == data:  # what JSON keeps as it is (no dates, no number keys)
            # The profiles of removed directories (a test's) go.
            memo_put(PARSED, str(path), text, data, keep=lambda k: Path(k).is_file())
    except (TypeError, ValueError):
        pass  # parsed again next time
    return data


PARSED = "profiles.json"  # what profile files parsed to, in the cache


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
        if not (directory / f"{parent}.yaml").is_file():
            raise BadInput(f"profile {name} ({path}): key 'extends' names {parent!r}, which is not a profile in "
                           f"{directory}")
        merged, sources = _merged(parent, directory, (*chain, name))
    for key, value in data.items():
        if key == "extends":
            continue
        if key.startswith("+"):
            merged[key[1:]] = [*merged.get(key[1:], []), *value]
        elif key in ("cpu", "timeouts", "params", "object", "object_params"):
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
        kwargs["memory_mib"] = size_mib(data["memory"], where)
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
        size_mib(size, f"{where}: key 'scratch_disks'")
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
    obj = data.get("object", {})
    if obj:
        if list(obj)[:2] != ["qom-type", "id"] or not all(isinstance(v, (str, int)) for v in obj.values()):
            raise BadInput(f"{where}: key 'object' starts with qom-type and id, then properties (strings or numbers)")
        kwargs["coco_object"] = tuple((str(k), str(v)) for k, v in obj.items())
    for param, prop in data.get("object_params", {}).items():
        if param not in params or not isinstance(prop, str):
            raise BadInput(f"{where}: key 'object_params.{param}' must name a declared parameter and a property")
    kwargs["object_params"] = tuple((str(k), str(v)) for k, v in data.get("object_params", {}).items())
    profile = Profile(**kwargs)
    # A template naming a parameter the profile does not declare is a profile bug: say so now.
    apply_params(profile, {})
    return profile
