"""Digest strings: the only form in which a digest may become a file name."""

from __future__ import annotations

import re

from pycontainerd.errdefs import InvalidArgument

_SHA256 = re.compile(r"^sha256:[a-f0-9]{64}$")


def validate(digest: str) -> str:
    """Return ``digest`` if it is ``sha256:<64 lowercase hex>``, else InvalidArgument."""
    if not _SHA256.match(digest):
        if ":" not in digest:
            raise InvalidArgument(f"invalid digest {digest!r}: invalid checksum digest format")
        raise InvalidArgument(f"invalid digest {digest!r}")
    return digest


def hex_of(digest: str) -> str:
    return validate(digest)[len("sha256:") :]
