"""Where things live: the repository's data folders and the artifact cache."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness import cache_root

REPO = Path(__file__).resolve().parent.parent
PROFILES_DIR = REPO / "qemu_cmdlines"
KCONFIGS_DIR = REPO / "kconfigs"
GUEST_TESTS_DIR = REPO / "guest_tests"
# The main job's kernel: linux-source-6.12 + the sample series (kernels/).
SAMPLE_KERNEL = REPO / "kernels" / "coco-sample.yaml"
# The memo (see memo_get) of the YAML files load_yaml keeps parsed.
YAML_MEMO = "yaml.json"


def default_kernel() -> str:
    """`--kernel` when none is given: $HARNESS_KERNEL, else the sample build spec."""
    return os.environ.get("HARNESS_KERNEL") or str(SAMPLE_KERNEL)


def cache_dir() -> Path:
    """The artifact cache (kernels, initramfs images, probe results).

    `HARNESS_CACHE` overrides it; otherwise `$XDG_CACHE_HOME/coco-harness`.
    It lives outside the repository so that clones share it.
    """
    path = Path(cache_root())
    path.mkdir(parents=True, exist_ok=True)
    return path


def parse_yaml(text: str) -> Any:
    """`yaml.safe_load` with libyaml's parser where PyYAML was built with it: the same
    documents, ten times faster (the dmesg rules took 8 ms in Python on every run)."""
    import yaml

    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def load_yaml(path: Path, what: str, memo: bool = False) -> object:
    """YAML from a file the user named; BadInput (naming `what` and the file) if unreadable.

    `memo`: keep the parsed document in the cache, by the file's text, for a file that
    every run reads (a build spec): importing PyYAML cost each run 10-15 ms. Only a
    document that JSON gives back unchanged is kept."""
    from harness.errors import BadInput

    try:
        text = path.read_text()
    except OSError as e:
        raise BadInput(f"{what} {path}: {e.strerror}") from None
    key = str(path.resolve())
    kept = memo_get(YAML_MEMO, key, text) if memo else None
    if kept is not None:
        return kept
    import yaml

    try:
        data = parse_yaml(text)
    except yaml.YAMLError as e:
        raise BadInput(f"{what} {path}: malformed YAML: {getattr(e, 'problem', e)}") from None
    if memo and data is not None and _json_exact(data):
        memo_put(YAML_MEMO, key, text, data, keep=lambda k: Path(k).is_file())
    return data


def _json_exact(data: object) -> bool:
    try:
        return bool(json.loads(json.dumps(data)) == data)
    except (TypeError, ValueError):
        return False


def memo_get(name: str, key: str, stamp: str) -> Any:
    """What `memo_put` kept under `key` in the cache's memo file `name` (a JSON file under
    `cache_dir()`), if it was kept with this `stamp` (what the answer was worked out from:
    a file's size and time, a text, a state); else None. An unreadable memo is a miss."""
    entry = _memo(cache_dir() / name).get(key)
    if isinstance(entry, dict) and entry.get("stamp") == stamp:
        return entry.get("value")
    return None


def memo_put(name: str, key: str, stamp: str, value: Any, keep: Callable[[str], bool] | None = None) -> None:
    """Keep `value` (not None, as JSON keeps it) under `key` with its `stamp`; `keep`, if given,
    says which other keys stay. A cache that cannot be written is only asked again next time."""
    file = cache_dir() / name
    memo = {k: v for k, v in _memo(file).items() if keep is None or keep(k)}
    memo[key] = {"stamp": stamp, "value": value}
    try:
        atomic_write(file, json.dumps(memo, indent=1) + "\n")  # in order: a value may keep it
    except OSError:
        pass


def _memo(file: Path) -> dict[str, Any]:
    try:
        memo = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    return memo if isinstance(memo, dict) else {}


def atomic_write(path: Path, data: bytes | str, mode: int | None = None) -> None:
    """Write a file so that readers see the old or the new content, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    payload = data.encode() if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        # A full or read-only disk (or an interrupt) leaves no half-written temp file behind.
        tmp.unlink(missing_ok=True)
        raise

