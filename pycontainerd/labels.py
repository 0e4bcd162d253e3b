"""Labels: validation and field-path updates shared by every labelled object.

containerd limits a label's key plus value to 4096 bytes and updates labels through
field-mask paths: ``labels`` replaces the whole map, ``labels.<key>`` sets one key (an
empty value deletes it).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from pycontainerd.errdefs import InvalidArgument

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

MAX_LABEL_SIZE = 4096


def validate(labels: Mapping[str, str]) -> dict[str, str]:
    """Return a plain copy of ``labels``; InvalidArgument for an oversized or empty key."""
    out: dict[str, str] = {}
    for k, v in labels.items():
        if not k:
            raise InvalidArgument("label key must not be empty")
        if len(k.encode()) + len(v.encode()) > MAX_LABEL_SIZE:
            raise InvalidArgument(
                f"label key and value greater than maximum size ({MAX_LABEL_SIZE} bytes), "
                f"key: {k[:10]}"
            )
        out[k] = v
    return out


def apply_paths(
    current: Mapping[str, str], incoming: Mapping[str, str], paths: Iterable[str], what: str
) -> dict[str, str] | None:
    """Apply ``labels`` / ``labels.<k>`` field paths; None when no path concerns labels.

    Any other path is left for the caller: it returns the remaining paths through
    ``other_paths``. Unknown paths are the caller's to reject.
    """
    result = dict(current)
    touched = False
    for path in paths:
        if path == "labels":
            result = dict(incoming)
            touched = True
        elif path.startswith("labels."):
            key = path[len("labels.") :]
            value = incoming.get(key, "")
            if value:
                result[key] = value
            else:
                result.pop(key, None)
            touched = True
        else:
            raise InvalidArgument(f"cannot update {path!r} field on {what}")
    return validate(result) if touched else None


def dumps(labels: Mapping[str, str]) -> str:
    return json.dumps(dict(labels), separators=(",", ":"), sort_keys=True)


def loads(text: str | None) -> dict[str, str]:
    if not text:
        return {}
    value = json.loads(text)
    return {str(k): str(v) for k, v in value.items()}
