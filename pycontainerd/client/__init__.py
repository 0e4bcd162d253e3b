"""pycontainerd's asyncio SDK: a client of the containerd v1 gRPC API.

It drives our daemon and real containerd the same way (the calls ``ctr`` makes), so
everything here works against either. Errors are ``pycontainerd.errdefs`` classes.

    async with Client("/run/pycontainerd/pycontainerd.sock", namespace="default") as c:
        [image] = await c.import_archive("busybox.tar")
"""

from __future__ import annotations

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
