"""Where things live: the repository's data folders and the artifact cache."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from harness import cache_root

REPO = Path(__file__).resolve().parent.parent
PROFILES_DIR = REPO / "qemu_cmdlines"
KCONFIGS_DIR = REPO / "kconfigs"
GUEST_TESTS_DIR = REPO / "guest_tests"
# The main job's kernel: linux-source-6.12 + the sample series (kernels/).
SAMPLE_KERNEL = REPO / "kernels" / "coco-sample.yaml"


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


def load_yaml(path: Path, what: str) -> object:
    """YAML from a file the user named; BadInput (naming `what` and the file) if unreadable."""
    import yaml

    from harness.errors import BadInput

    try:
        return parse_yaml(path.read_text())
    except OSError as e:
        raise BadInput(f"{what} {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise BadInput(f"{what} {path}: malformed YAML: {getattr(e, 'problem', e)}") from None


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

