"""KCIDB ids and names: content-hash ids, the patchset hash, a test's path."""

from __future__ import annotations

import hashlib
import re


def object_id(origin: str, kind: str, *parts: str) -> str:
    """`<origin>:<kind>-` and a hash of what the object is: exporting again gives the same id."""
    digest = hashlib.sha256("\n".join((kind, *parts)).encode()).hexdigest()
    return f"{origin}:{kind}-{digest[:32]}"


def patchset_hash(patch_sha256s: list[str]) -> str:
    """KCIDB's patchset hash: sha256 over each patch's sha256 and a newline, in order; "" for none."""
    if not patch_sha256s:
        return ""
    return hashlib.sha256("".join(f"{h}\n" for h in patch_sha256s).encode()).hexdigest()


def kcidb_path(nodeid: str) -> str:
    """`test_dma.py::test_dma_stress_verifies[4-nvme]` -> `coco.dma.stress_verifies.4-nvme`.

    The module loses `test_` and `.py` (its directories become levels), a
    class loses `Test`, the test loses `test_` and its module's name as a
    prefix, a parameter set is the last level; characters the schema does not
    allow in a level become `_`.
    """
    head, _, param = nodeid.partition("[")
    module, *inner = head.split("::")
    *dirs, stem = module.removesuffix(".py").split("/")
    stem = stem.removeprefix("test_")
    levels = [*dirs, stem, *(c.removeprefix("Test") for c in inner[:-1])]
    if inner:
        levels.append(inner[-1].removeprefix("test_").removeprefix(f"{stem}_"))
    if param:
        levels.append(param.removesuffix("]"))
    clean = [re.sub(r"[^A-Za-z0-9_-]+", "_", level).strip("_") or "_" for level in levels]
    return ".".join(["coco", *clean])
