"""The run directory's records: results/<run-id>/meta.json and machines/<worker>.json.

`RunRecord` is meta.json: written with status `incomplete` before anything
starts, and again at the end. `MachineRecord` is one VM's
machines/<worker>.json, rewritten by the pytest plugin at each step of its
life (booting, booted or boot-failed, stopped). Both are dataclasses with one
writer (atomic: a reader sees the old record or the new one, never half) and
are read back as the same types. The JSON keys are the documented layout: a
field marked `_optional()` is left out while it is None, because its presence
says something (the run ended, it failed, it ran on a remote target) or it
does not apply to every kind of run.
"""

from __future__ import annotations

import json
import secrets
import sys
import time
import types
from dataclasses import MISSING, dataclass, field, fields
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any, Self, TypeVar, Union, get_args, get_origin, get_type_hints

from harness import __version__
from harness.diagnostics import Diagnostics
from harness.errors import BadInput
from harness.identity import BuildIdentity
from harness.kernel import Kernel
from harness.paths import atomic_write

META = "meta.json"
MACHINES = "machines"
_OMIT = "omitted while None"


def _optional() -> Any:
    """A field left out of the JSON while it is None (see the module's docstring)."""
    return field(default=None, metadata={_OMIT: True})


class RecordError(ValueError):
    """A record's JSON is not what its type says; the message names the key."""


class RunStatus(StrEnum):
    INCOMPLETE = "incomplete"      # until the end: a killed run stays so
    PASSED = "passed"
    FAILED = "failed"              # the kernel under test misbehaved
    ERROR = "error"                # infrastructure
    INTERRUPTED = "interrupted"    # a signal


class MachineStatus(StrEnum):
    BOOTING = "booting"
    BOOT_FAILED = "boot-failed"
    BOOTED = "booted"
    STOPPED = "stopped"


@dataclass
class Record:
    """A JSON record: dumped field by field, read back (and checked) by the fields' types."""

    def to_json(self) -> dict[str, Any]:
        return {f.name: _dump(getattr(self, f.name)) for f in fields(self)
                if not (f.metadata.get(_OMIT) and getattr(self, f.name) is None)}

    @classmethod
    def from_json(cls, data: object, where: str = "") -> Self:
        """The record `data` holds; keys it does not know (a newer harness's) are ignored.

        Raises RecordError naming the key that is missing or of the wrong type.
        """
        if not isinstance(data, dict):
            raise _wrong(where or "the top level", "an object", data)
        hints = get_type_hints(cls)
        values = {}
        for f in fields(cls):
            key = f"{where}.{f.name}" if where else f.name
            if f.name in data:
                values[f.name] = _load(hints[f.name], data[f.name], key)
            elif f.default is MISSING and f.default_factory is MISSING:
                raise RecordError(f"{key}: missing")
        return cls(**values)


def _dump(value: Any) -> Any:
    if isinstance(value, (Record, Diagnostics, BuildIdentity)):
        return value.to_json()
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, list):
        return [_dump(v) for v in value]
    if isinstance(value, dict):
        return {k: _dump(v) for k, v in value.items()}
    return value


def _load(hint: Any, value: object, where: str) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _load(inner, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise _wrong(where, "a list", value)
        return [_load(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _wrong(where, "an object", value)
        return {str(k): _load(args[1], v, f"{where}.{k}") for k, v in value.items()}
    if issubclass(hint, Record):
        return hint.from_json(value, where)
    if hint is Diagnostics:
        if not isinstance(value, dict):
            raise _wrong(where, "an object", value)
        return Diagnostics.from_json(value)
    if hint is BuildIdentity:
        if not isinstance(value, dict):
            raise _wrong(where, "an object", value)
        try:
            return BuildIdentity.from_json(value)
        except (KeyError, TypeError, ValueError) as e:
            raise RecordError(f"{where}: not a build identity: {e}") from None
    if issubclass(hint, Enum):
        try:
            return hint(value)
        except ValueError:
            raise RecordError(f"{where}: {value!r} is not one of {', '.join(str(m.value) for m in hint)}") from None
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    # bool is an int to Python, not to a record.
    if isinstance(value, hint) and (hint is bool or not isinstance(value, bool)):
        return value
    raise _wrong(where, hint.__name__, value)


def _wrong(where: str, expected: str, value: object) -> RecordError:
    return RecordError(f"{where}: expected {expected}, got {type(value).__name__}")


@dataclass
class FileRecord(Record):
    path: str
    sha256: str


@dataclass
class QemuRecord(Record):
    path: str
    version: str | None = None


@dataclass
class KernelRecord(Record):
    release: str | None = None
    spec: str | None = None
    image: str | None = _optional()
    sha256: str | None = _optional()
    modules_dir: str | None = None
    package: str | None = None
    series: list[str] | None = _optional()
    # What the kernel can report (WARN/BUG, KALLSYMS, sanitizers); absent when nobody looked.
    diagnostics: Diagnostics | None = _optional()
    # Which build it is (harness/identity.py); absent in records of older harnesses and remote runs.
    build: BuildIdentity | None = _optional()
    label: str | None = _optional()       # --label: the build's name for people

    @classmethod
    def of(cls, kernel: Kernel, diagnostics: Diagnostics, label: str | None = None) -> KernelRecord:
        return cls(release=kernel.release, spec=kernel.spec, image=str(kernel.image), sha256=kernel.sha256,
                   modules_dir=str(kernel.modules_dir) if kernel.modules_dir else None, package=kernel.package,
                   series=list(kernel.series), diagnostics=diagnostics, build=kernel.identity, label=label)

    def identity(self, target: str | None = None) -> BuildIdentity:
        """The recorded build; for a record without one, the image's hash, else the release on `target`."""
        if self.build is not None:
            return self.build
        release = self.release or "unknown"
        if self.sha256:
            return BuildIdentity(f"image:{self.sha256}", release)
        return BuildIdentity(f"release:{release}" + (f"@{target}" if target else ""), release)

    def name(self, target: str | None = None) -> str:
        """The label, else the build's name (the release and its series)."""
        return self.label or self.identity(target).name()


@dataclass
class ProfileRecord(Record):
    requested: str
    effective: str
    reasons: list[str] = field(default_factory=list)
    accel: str | None = None
    accel_reason: str | None = _optional()
    params: dict[str, str] | None = _optional()
    requested_params: dict[str, str] | None = _optional()

    @property
    def fell_back(self) -> bool:
        return self.effective != self.requested

    @property
    def label(self) -> str:
        """`snp->coco-emulated` for a fallback, else the profile's name."""
        return self.requested + (f"->{self.effective}" if self.fell_back else "")


@dataclass
class Invocation(Record):
    """What the run was asked to do: `harness reproduce` rebuilds its request from this."""

    tests: str
    pytest_args: list[str] = field(default_factory=list)
    kernel: str | None = None
    profile: str = ""
    append: str = ""
    qemu_args: list[str] = field(default_factory=list)
    timeout: float = 1800.0
    boot_timeout: float | None = None
    params: dict[str, str] = field(default_factory=dict)
    strict: bool = False
    force: bool = False
    channel: str = "serial"
    target: str | None = _optional()
    label: str | None = _optional()


@dataclass
class Timings(Record):
    boot: float | None = None      # the first VM's, seconds to userspace
    tests: float = 0.0
    total: float = 0.0


@dataclass
class Failure(Record):
    """What made the run fail: a boot failure, the runner's own note, or the first failing test."""

    message: str
    kind: str | None = _optional()
    test: str | None = _optional()
    lines: list[str] | None = _optional()


@dataclass
class MachineRecord(Record):
    """One VM of a run (machines/<worker>.json)."""

    name: str
    worker: str
    console: str
    status: MachineStatus = MachineStatus.BOOTING
    argv: list[str] | None = None
    boot_seconds: float | None = None
    channel: str | None = None
    release: str | None = None
    exit_status: int | None = None
    error: str | None = None
    error_type: str | None = None
    lines: list[str] = field(default_factory=list)
    dmesg_error: str | None = None


@dataclass
class RunRecord(Record):
    """meta.json."""

    run_id: str
    profile: ProfileRecord
    status: RunStatus = RunStatus.INCOMPLETE
    harness_version: str = __version__
    started: str = ""
    command: list[str] = field(default_factory=list)
    invocation: Invocation | None = _optional()
    reproduces: str | None = None
    target: str | None = _optional()
    host: dict[str, Any] | None = _optional()          # the probe's facts, as `harness probe --json` shows them
    qemu: QemuRecord | None = _optional()
    firmware: dict[str, FileRecord] | None = _optional()
    kernel: KernelRecord = field(default_factory=KernelRecord)
    series: list[str] | None = _optional()
    initramfs: FileRecord | None = _optional()
    cmdline: str | None = _optional()
    # Written at the end:
    exit_code: int | None = _optional()
    finished: str | None = _optional()
    timings: Timings | None = _optional()
    machines: list[MachineRecord] | None = _optional()
    tests: dict[str, int] | None = _optional()
    failure: Failure | None = _optional()


def new_run_id(release: str, profile: str) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{profile}-{release}-{secrets.token_hex(2)}"


def timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def is_run_dir(path: Path) -> bool:
    return (path / META).is_file()


def _write(path: Path, record: Record) -> None:
    atomic_write(path, json.dumps(record.to_json(), indent=2, sort_keys=True) + "\n")


_R = TypeVar("_R", bound=Record)


def write_run(run_dir: Path, record: RunRecord) -> None:
    _write(run_dir / META, record)


def write_machine(run_dir: Path, record: MachineRecord) -> None:
    _write(run_dir / MACHINES / f"{record.worker}.json", record)


def _read(path: Path, cls: type[_R]) -> _R:
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise BadInput(f"{path}: {e.strerror}") from None
    except ValueError as e:
        raise BadInput(f"{path}: not valid JSON: {e}") from None
    try:
        return cls.from_json(data)
    except RecordError as e:
        raise BadInput(f"{path}: not a {cls.__name__}: {e}") from None


def read_run(run_dir: Path) -> RunRecord:
    """meta.json of `run_dir`. Raises BadInput naming the directory or the file."""
    if not is_run_dir(run_dir):
        raise BadInput(f"{run_dir}: not a run directory (no {META})")
    return _read(run_dir / META, RunRecord)


def read_machines(run_dir: Path) -> list[MachineRecord]:
    """The VMs' records by worker name; an unreadable one is named on stderr and left out."""
    out = []
    for path in sorted((run_dir / MACHINES).glob("*.json")):
        try:
            out.append(_read(path, MachineRecord))
        except BadInput as e:
            print(f"warning: {e}", file=sys.stderr)
    return out
