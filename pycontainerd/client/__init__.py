"""pycontainerd's asyncio SDK: a client of the containerd v1 gRPC API.

It drives our daemon and real containerd the same way (the calls ``ctr`` makes), so
everything here works against either. Errors are ``pycontainerd.errdefs`` classes.

    async with Client("/run/pycontainerd/pycontainerd.sock", namespace="default") as c:
        [image] = await c.import_archive("busybox.tar")

The names below are loaded on first use (PEP 562): a program that only pulls does not
pay for importing the container, task and archive modules (``pcd`` starts faster).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pycontainerd.client._client import Lease, Namespace
    from pycontainerd.client._sdk import Client
    from pycontainerd.client.cio import TaskIO
    from pycontainerd.client.containers import Container
    from pycontainerd.client.content import ContentInfo, ContentStore
    from pycontainerd.client.events import Event
    from pycontainerd.client.images import Image, ImageStore, ResolvedImage
    from pycontainerd.client.oci import Descriptor, Platform, host_platform
    from pycontainerd.client.pull import Progress
    from pycontainerd.client.reference import Reference
    from pycontainerd.client.registry import Registry, RegistryHost, Unauthorized
    from pycontainerd.client.spec import Mount, Resources
    from pycontainerd.client.tasks import ExitStatus, Metric, Process, Task

_WHERE = {
    "Client": "_sdk",
    "Container": "containers",
    "ContentInfo": "content",
    "ContentStore": "content",
    "Descriptor": "oci",
    "Event": "events",
    "ExitStatus": "tasks",
    "Image": "images",
    "ImageStore": "images",
    "Lease": "_client",
    "Metric": "tasks",
    "Mount": "spec",
    "Namespace": "_client",
    "Platform": "oci",
    "Process": "tasks",
    "Progress": "pull",
    "Reference": "reference",
    "Registry": "registry",
    "RegistryHost": "registry",
    "ResolvedImage": "images",
    "Resources": "spec",
    "Task": "tasks",
    "TaskIO": "cio",
    "Unauthorized": "registry",
    "host_platform": "oci",
}

__all__ = [
    "Client",
    "Container",
    "ContentInfo",
    "ContentStore",
    "Descriptor",
    "Event",
    "ExitStatus",
    "Image",
    "ImageStore",
    "Lease",
    "Metric",
    "Mount",
    "Namespace",
    "Platform",
    "Process",
    "Progress",
    "Reference",
    "Registry",
    "RegistryHost",
    "ResolvedImage",
    "Resources",
    "Task",
    "TaskIO",
    "Unauthorized",
    "host_platform",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({n for n in globals() if n.startswith("_")} | set(__all__))
