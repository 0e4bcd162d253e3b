"""Image references: ``[host[:port]/]repo[:tag][@sha256:...]`` with Docker Hub defaults.

A first path component is a registry host when it holds a ``.`` or ``:`` or is
``localhost``; otherwise the registry is ``docker.io`` and a one-component repository
gets the ``library/`` prefix, as Docker and containerd normalize names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pycontainerd.errdefs import InvalidArgument

__all__ = ["DOCKER_HUB", "Reference", "normalize", "parse"]

DOCKER_HUB = "docker.io"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[a-f0-9]{64}$")
_HOST = re.compile(r"^(?:[a-zA-Z0-9-]+(?:\.[a-zA-Z0-9-]+)*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?$")


@dataclass(frozen=True, slots=True)
class Reference:
    host: str
    repository: str
    tag: str = ""
    digest: str = ""

    @property
    def name(self) -> str:
        """``host/repository`` (the image name without tag or digest)."""
        return f"{self.host}/{self.repository}"

    @property
    def object(self) -> str:
        """What to ask the registry's manifests endpoint for: the digest, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += ":" + self.tag
        if self.digest:
            out += "@" + self.digest
        return out


def parse(text: str) -> Reference:
    """Parse and normalize; InvalidArgument on bad syntax. No tag or digest means latest."""
    if not text or len(text) > 255 or text != text.strip():
        raise InvalidArgument(f"invalid reference {text!r}")
    rest, _, digest = text.partition("@")
    if digest and not _DIGEST.match(digest):
        raise InvalidArgument(f"invalid reference {text!r}: bad digest")
    host = DOCKER_HUB
    first, slash, remainder = rest.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        if not _HOST.match(first):
            raise InvalidArgument(f"invalid reference {text!r}: bad host {first!r}")
        host, rest = first, remainder
    name, colon, tag = rest.rpartition(":") if ":" in rest else (rest, "", "")
    if colon and not _TAG.match(tag):
        raise InvalidArgument(f"invalid reference {text!r}: bad tag {tag!r}")
    if host in ("index.docker.io", "registry-1.docker.io"):
        host = DOCKER_HUB
    if host == DOCKER_HUB and "/" not in name:
        name = "library/" + name
    if not _REPO.match(name):
        raise InvalidArgument(f"invalid reference {text!r}: bad repository {name!r}")
    if not tag and not digest:
        tag = "latest"
    return Reference(host, name, tag, digest)


def normalize(text: str) -> str:
    """The canonical string of a reference (``busybox`` -> ``docker.io/library/busybox:latest``)."""
    return str(parse(text))
