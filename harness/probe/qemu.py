"""What the QEMU binary can do: where it is, its version, its confidential-guest
objects and their properties (through QMP), and vfio-pci's TIO and iommufd properties."""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import process
from harness.errors import BadInput, InfraError
from harness.probe.facts import Fact

QEMU_CANDIDATES = ("qemu-system-x86_64",)
# Objects whose presence decides profiles and parameters (`-object help`).
QEMU_OBJECTS = ("sev-guest", "sev-snp-guest", "tdx-guest", "igvm-cfg", "iommufd")
# Objects whose properties decide optional profile parameters (QMP qom-list-properties).
QEMU_PROPERTY_OBJECTS = ("sev-guest", "sev-snp-guest", "tdx-guest")
_TIO_PROPERTIES = ("x-tio", "tio", "x-secure-mode", "secure-mode")


def find_qemu(override: str | None = None) -> str | None:
    """`--qemu PATH` if given, else $HARNESS_QEMU, else qemu-system-x86_64 on PATH."""
    if override:
        return override
    env = os.environ.get("HARNESS_QEMU")
    if env:
        return env
    for name in QEMU_CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def qemu_origin(given: str | None, qemu: str | None) -> str:
    """The evidence for which QEMU was probed: given, from the environment, or found on PATH."""
    if qemu is None:
        return "qemu-system-x86_64 not on PATH (set HARNESS_QEMU or pass --qemu)"
    if given:
        return "given with --qemu"
    return "from HARNESS_QEMU" if os.environ.get("HARNESS_QEMU") else "found on PATH"


def check_qemu_binary(path: str, what: str) -> None:
    """BadInput (exit 2) unless `path` is an executable file."""
    if not (Path(path).is_file() and os.access(path, os.X_OK)):
        raise BadInput(f"{what} {path}: not an executable file")


def qemu_version(qemu: str) -> str:
    out = process.run([qemu, "--version"], timeout=10).out
    m = re.search(r"version (\d+\.\d+(?:\.\d+)?)", out)
    return m.group(1) if m else "unknown"


def qemu_objects(qemu: str) -> list[str]:
    """Which confidential-guest (and IGVM, iommufd) objects this QEMU was built with (`-object help`)."""
    out = process.run([qemu, "-object", "help"], timeout=10).out
    listed = {line.strip() for line in out.splitlines()}
    return [o for o in QEMU_OBJECTS if o in listed]


def parse_property_help(text: str) -> list[str]:
    """Property names from `-device <dev>,help` output.

    QEMU prints a header (`vfio-pci options:`) and then one indented
    `  name=<type>  - description` line per property.
    """
    return sorted({m.group(1) for m in re.finditer(r"^\s+([\w.-]+)=", text, re.M)})


def qemu_object_properties(qemu: str, qom_types: list[str]) -> dict[str, Fact]:
    """The properties of each object type, through QMP `qom-list-properties`.

    Not `-object <type>,help`: that lists class properties only, and tdx-guest
    adds all of its properties per instance ("There are no options for
    tdx-guest" in QEMU 10.2). qom-list-properties makes an instance, so it sees
    them. One `-machine none` QEMU answers for all types.
    """
    requests = [{"execute": "qmp_capabilities"},
                *({"execute": "qom-list-properties", "arguments": {"typename": t}} for t in qom_types),
                {"execute": "quit"}]
    what = f"{qemu} QMP qom-list-properties"
    try:
        proc = process.run([qemu, "-machine", "none", "-nodefaults", "-display", "none", "-qmp", "stdio"],
                           input=("\n".join(json.dumps(r) for r in requests) + "\n").encode(), timeout=20)
    except InfraError as e:
        return {t: Fact(None, f"{what}: {e}") for t in qom_types}
    answers = []
    for line in proc.out.splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if "return" in msg or "error" in msg:
            answers.append(msg)
    found: dict[str, Fact] = {}
    for qom_type, answer in zip(qom_types, answers[1:], strict=False):
        if isinstance(answer.get("return"), list):
            names = sorted(str(p["name"]) for p in answer["return"] if p.get("name") != "type")
            found[qom_type] = Fact(",".join(names), f"{what} {qom_type}")
        else:
            found[qom_type] = Fact(None, f"{what} {qom_type}: {answer.get('error', {}).get('desc', 'no answer')}")
    for qom_type in qom_types:
        found.setdefault(qom_type, Fact(None, f"{what} {qom_type}: no answer"))
    return found


def qemu_vfio_tio(qemu: str, names: list[str] | None = None) -> Fact:
    """The TIO property of vfio-pci, if this QEMU has one (`-device vfio-pci,help`).

    AMD's SEV-TIO tree adds `x-tio` (SEV-TIO RFC, linux-coco, 2024-25); Intel's TDX Connect tree
    (intel/lkvs) `x-secure-mode`. `names`: vfio-pci's properties if already asked.
    """
    found = set(_vfio_pci_properties(qemu) if names is None else names)
    for prop in _TIO_PROPERTIES:
        if prop in found:
            return Fact(prop, f"{qemu} -device vfio-pci,help lists {prop}")
    if not found:
        return Fact(None, f"{qemu} has no vfio-pci device")
    return Fact(None, f"none of {', '.join(_TIO_PROPERTIES)} in {qemu} -device vfio-pci,help")


def _vfio_pci_properties(qemu: str) -> list[str]:
    return parse_property_help(process.run([qemu, "-device", "vfio-pci,help"], timeout=10).out)


def qemu_vfio_iommufd(qemu: str, names: list[str] | None = None) -> Fact:
    """Whether vfio-pci takes `iommufd=` (QEMU 8.2+ with iommufd support built in)."""
    if "iommufd" in (_vfio_pci_properties(qemu) if names is None else names):
        return Fact(True, f"{qemu} -device vfio-pci,help lists iommufd")
    return Fact(False, f"no iommufd property in {qemu} -device vfio-pci,help")


@dataclass(frozen=True)
class QemuAnswers:
    """Everything the probe asks one QEMU binary (four QEMU start-ups), kept as one record
    so that `harness.probe.cache` can store it."""

    version: str
    objects: tuple[str, ...]
    properties: dict[str, Fact]
    vfio_tio: Fact
    vfio_iommufd: Fact

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "objects": list(self.objects),
                "properties": {t: [f.value, f.evidence] for t, f in self.properties.items()},
                "vfio_tio": [self.vfio_tio.value, self.vfio_tio.evidence],
                "vfio_iommufd": [self.vfio_iommufd.value, self.vfio_iommufd.evidence]}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> QemuAnswers:
        """The record `to_json` wrote; KeyError/TypeError/ValueError if it is not one."""
        return cls(version=str(doc["version"]), objects=tuple(str(o) for o in doc["objects"]),
                   properties={str(t): Fact(v, str(e)) for t, (v, e) in doc["properties"].items()},
                   vfio_tio=Fact(doc["vfio_tio"][0], str(doc["vfio_tio"][1])),
                   vfio_iommufd=Fact(doc["vfio_iommufd"][0], str(doc["vfio_iommufd"][1])))


def ask_qemu(qemu: str) -> QemuAnswers:
    """Run the QEMU queries: --version, -object help, QMP qom-list-properties, -device vfio-pci,help."""
    objects = qemu_objects(qemu)
    vfio = _vfio_pci_properties(qemu)
    return QemuAnswers(version=qemu_version(qemu), objects=tuple(objects),
                       properties=qemu_object_properties(qemu, [t for t in QEMU_PROPERTY_OBJECTS if t in objects]),
                       vfio_tio=qemu_vfio_tio(qemu, vfio), vfio_iommufd=qemu_vfio_iommufd(qemu, vfio))
