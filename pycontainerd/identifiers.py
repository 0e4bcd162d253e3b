"""Identifier rules shared with containerd: namespaces, container ids and topic parts.

An identifier is 1-76 characters of ``[A-Za-z0-9]`` runs joined by single ``.``, ``_`` or
``-``. Such names become path components (bundle dirs, shim socket hashes), so they are
checked before anything touches the filesystem.
"""

from __future__ import annotations

import re

from pycontainerd.errdefs import InvalidArgument

MAX_LENGTH = 76
_IDENTIFIER = re.compile(r"^[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*$")


def validate(value: str) -> str:
    """Return ``value`` unchanged, or raise InvalidArgument explaining why it is no identifier."""
    if not value:
        raise InvalidArgument("identifier must not be empty")
    if len(value) > MAX_LENGTH:
        raise InvalidArgument(
            f"identifier {value!r} greater than maximum length ({MAX_LENGTH} characters)"
        )
    if not _IDENTIFIER.match(value):
        raise InvalidArgument(f"identifier {value!r} must match {_IDENTIFIER.pattern}")
    return value
