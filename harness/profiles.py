"""QEMU launch profiles: `qemu_cmdlines/<name>.yaml` loaded into frozen objects.

A profile may `extends:` another; its keys replace the parent's, except keys
written `+key:` whose list is appended to the parent's (`+cmdline: [swiotlb=force]`).
Unknown keys, wrong types and unknown names are BadInput naming the file and key.

The confidential-guest object is data too (`object:`), so that optional
properties (`object_params:`) appear only when their parameter is set, and the
object switches to QEMU's JSON `-object` form when a property is structured
(TDX's `quote-generation-socket` is a SocketAddress, which the key=value form
cannot carry).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
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
         "qemu:sev-snp-guest", "qemu:tdx-guest", "qemu:vfio-tio", "qemu:iommufd", "qemu:vfio-iommufd",
         "qemu:igvm-cfg")
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
    # The confidential-guest object, in order: ("qom-type", ...), ("id", ...), properties.
    coco_object: tuple[tuple[str, str], ...] = ()
    # Optional object properties: (parameter, property), added when the parameter is set.
    object_params: tuple[tuple[str, str], ...] = ()
    # Further -object arguments derived from parameters (igvm-cfg, iommufd).
    objects: tuple[str, ...] = ()

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
        out["coco_object"] = [list(kv) for kv in self.coco_object]
        out["object_params"] = [list(kv) for kv in self.object_params]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Profile:
        """Rebuild a profile exactly as a plan recorded it (YAML may have changed since)."""
        kwargs = dict(data)
        for f in fields(cls):
            if isinstance(f.default, tuple) or f.name in ("cmdline", "source"):
                kwargs[f.name] = tuple(kwargs.get(f.name) or ())
        kwargs["params"] = tuple(sorted((str(k), str(v)) for k, v in (data.get("params") or {}).items()))
        for key in ("coco_object", "object_params"):
            kwargs[key] = tuple((str(k), str(v)) for k, v in data.get(key) or ())
        kwargs["timeouts"] = Timeouts(**data.get("timeouts", {}))
        return cls(**kwargs)

    def object_argv(self) -> list[str]:
        """`-object` arguments: the confidential-guest object, then the derived ones.

        The key=value form unless a property is structured (a JSON object), then
        QEMU's JSON form, where booleans and numbers must be typed. A structured
        value is JSON text starting with `{"` (a template like `{cbitpos}` is not).
        """
        argv: list[str] = []
        if self.coco_object:
            if any(v.startswith('{"') for _, v in self.coco_object):
                argv += ["-object", json.dumps({k: _json_value(v) for k, v in self.coco_object},
                                               separators=(",", ":"))]
            else:
                (_, qom_type), *props = self.coco_object
                argv += ["-object", ",".join([qom_type, *(f"{k}={v}" for k, v in props)])]
        for obj in self.objects:
            argv += ["-object", obj]
        return argv


def _json_value(value: str) -> object:
    """A key=value property as JSON: on/off -> bool, 51 or 0x30000 -> int, {...} -> object."""
    if value.startswith('{"'):
        return json.loads(value)
    if value in ("on", "true", "yes", "off", "false", "no"):
        return value in ("on", "true", "yes")
    if re.fullmatch(r"0x[0-9a-fA-F]+|[0-9]+", value):
        return int(value, 0)
    return value


_SCALARS: dict[str, type | tuple[type, ...]] = {
    "description": str, "machine": str, "accel": str, "smp": int, "memory": (int, str),
    "hotplug_ports": int, "twin": (str, type(None)), "extends": str, "cpu": dict,
    "timeouts": dict, "coco": str, "firmware": (str, type(None)), "params": dict,
    "object": dict, "object_params": dict,
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
    obj = [(k, _expand(v, values, f"{where}: key 'object.{k}'")) for k, v in profile.coco_object]
    for param, prop in profile.object_params:
        if values.get(param, ""):
            obj.append((prop, _property_value(param, prop, values[param], where)))
    changes["coco_object"] = tuple(obj)
    changes.update(_derived_objects(profile, values, changes, where))
    if "memory" in overrides:
        changes["memory_mib"] = _memory_mib(overrides["memory"], f"{where}: parameter 'memory'")
    if "smp" in overrides:
        if not str(overrides["smp"]).isdigit() or int(overrides["smp"]) < 1:
            raise BadInput(f"{where}: parameter 'smp' must be a positive integer")
        changes["smp"] = int(overrides["smp"])
    changes["params"] = tuple(sorted(values.items()))
    return replace(profile, **changes)


# Optional object properties whose values are checked before QEMU sees them:
# property -> (decoded size in bytes of a base64 blob) per QEMU's qapi/qom.json.
_BASE64_SIZES = {"mrconfigid": 48, "mrowner": 48, "mrownerconfig": 48, "host-data": 32,
                 "id-block": 96, "id-auth": 4096}
_BOOL_PROPERTIES = ("secure-tsc", "author-key-enabled")


def socket_address(param: str, text: str, where: str) -> str:
    """`vsock:CID:PORT` or `unix:PATH` -> a QAPI SocketAddress as JSON text."""
    kind, _, rest = text.partition(":")
    if kind == "vsock":
        cid, _, port = rest.partition(":")
        if cid.isdigit() and port.isdigit():
            return json.dumps({"type": "vsock", "cid": cid, "port": port})
    elif kind == "unix" and rest.startswith("/"):
        return json.dumps({"type": "unix", "path": rest})
    raise BadInput(f"{where}: parameter '{param}' must be vsock:CID:PORT or unix:/PATH, got {text!r}")


def _property_value(param: str, prop: str, value: str, where: str) -> str:
    if prop == "quote-generation-socket":
        return socket_address(param, value, where)
    if prop in _BOOL_PROPERTIES:
        if value not in ("on", "off"):
            raise BadInput(f"{where}: parameter '{param}' must be on or off, got {value!r}")
    elif prop == "tsc-frequency":
        if not value.isdigit() or not 0 < int(value) < 1 << 32:
            raise BadInput(f"{where}: parameter '{param}' must be a frequency in Hz (uint32), got {value!r}")
    elif prop in _BASE64_SIZES:
        try:
            size = len(base64.b64decode(value, validate=True))
        except (binascii.Error, ValueError):
            size = -1
        if size != _BASE64_SIZES[prop]:
            raise BadInput(f"{where}: parameter '{param}' must be base64 of {_BASE64_SIZES[prop]} bytes "
                           f"(QEMU property {prop})")
    return value


VFIO_BACKENDS = ("iommufd", "container")
IOMMUFD_ID = "iommufd0"
IGVM_ID = "igvm0"


def _derived_objects(profile: Profile, values: dict[str, str], changes: dict[str, Any],
                     where: str) -> dict[str, Any]:
    """What the `igvm` and `vfio_backend` parameters add beyond templates.

    igvm: `-object igvm-cfg,id=igvm0,file=PATH`, the machine's `igvm-cfg=igvm0`
    (QEMU 10.1+), and no -bios: QEMU refuses -bios together with IGVM
    (docs/system/igvm.rst). vfio_backend=iommufd: `-object iommufd,id=iommufd0`
    and `iommufd=iommufd0` on every hot-plugged vfio-pci device (what AMD's TIO
    QEMU requires); container: the legacy VFIO container, nothing added.
    """
    out: dict[str, Any] = {}
    objects: list[str] = []
    igvm = values.get("igvm", "")
    if igvm:
        if "," in igvm:
            raise BadInput(f"{where}: parameter 'igvm' is a file path without commas, got {igvm!r}")
        objects.append(f"igvm-cfg,id={IGVM_ID},file={igvm}")
        out["machine"] = f"{changes['machine']},igvm-cfg={IGVM_ID}"
        out["firmware"] = None
    backend = values.get("vfio_backend")
    if backend is not None:
        if backend not in VFIO_BACKENDS:
            raise BadInput(f"{where}: parameter 'vfio_backend' must be one of {', '.join(VFIO_BACKENDS)}, "
                           f"got {backend!r}")
        if backend == "iommufd":
            objects.insert(0, f"iommufd,id={IOMMUFD_ID}")
            out["hotplug"] = tuple(_with_iommufd(spec) for spec in changes["hotplug"])
    out["objects"] = tuple(objects)
    return out


def _with_iommufd(spec: str) -> str:
    driver, _, rest = spec.partition(",")
    if driver != "vfio-pci" or "iommufd=" in spec:
        return spec
    props = rest.split(",") if rest else []
    # After host= (the device's identity), before the rest, as AMD's and Intel's examples write it.
    at = next((i + 1 for i, p in enumerate(props) if p.startswith("host=")), 0)
    props.insert(at, f"iommufd={IOMMUFD_ID}")
    return ",".join([driver, *props])
