"""The finished document: kcidb-io's verdict on it, and its text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harness.errors import InfraError
from harness.paths import atomic_write


def validate(doc: dict[str, Any]) -> None:
    """kcidb-io's verdict on the document, for its own version of the schema. Raises InfraError."""
    import jsonschema
    from kcidb_io.schema import LATEST

    try:
        LATEST.validate_exactly(doc)
    except jsonschema.exceptions.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        raise InfraError(f"KCIDB export does not validate at {where or 'the top'}: {e.message}") from None


def write(doc: dict[str, Any], output: Path | None) -> str:
    """The document as text; written atomically to `output` when given."""
    text = json.dumps(doc, indent=1, sort_keys=True) + "\n"
    if output is not None:
        atomic_write(output, text)
    return text
