"""What a profile is: the frozen `Profile` and its `Timeouts`, the values its
keys may take, and its confidential-guest object as `-object` arguments."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields
from typing import Any

from harness.errors import BadInput

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


def size_mib(value: int | str, where: str) -> int:
    """A size in MiB: a number of MiB, `512M` or `2G`. Raises BadInput naming `where`."""
    if isinstance(value, int):
        return value
    text = value.strip().upper().removesuffix("B")
    scale = {"M": 1, "G": 1024}.get(text[-1:], None)
    number = text[:-1] if scale else text
    if not number.isdigit():
        raise BadInput(f"{where}: memory {value!r} is not a size like 1024, 512M or 2G")
    return int(number) * (scale or 1)
