"""A profile's parameters: `{name}` templates filled from its `params:` and the
user's overrides, optional object properties checked before QEMU sees them, and
what `igvm` and `vfio_backend` add beyond templates."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import replace
from typing import Any

from harness.errors import BadInput
from harness.profiles.model import BUILTIN_PARAMS, Profile, size_mib


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
        changes["memory_mib"] = size_mib(overrides["memory"], f"{where}: parameter 'memory'")
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
