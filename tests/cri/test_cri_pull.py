"""PullImage from a real registry on 127.0.0.1 (plain HTTP, allowed by the plugin's
``insecure_registries``), then ImageStatus, ListImages and RemoveImage."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from pycontainerd.api.cri.runtime.v1 import api_pb2
from pycontainerd.client import Client, Registry, RegistryHost
from tests.support.tasks import IMAGE, import_busybox

if TYPE_CHECKING:
    from tests.client.registry_support import RegistryServer
    from tests.cri.conftest import CRI
    from tests.support.daemon import Daemon

pytestmark = [pytest.mark.root]


async def test_pull_status_remove(cri: CRI, cri_daemon: Daemon, registry: RegistryServer) -> None:
    ref = f"{registry.host}/cri/busybox:1"
    async with Client(cri_daemon.address, "k8s.io") as c:
        await c.push(ref, IMAGE, Registry({registry.host: RegistryHost(insecure=True)}))
    pulled = await cri.images.PullImage(
        api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=ref), auth=api_pb2.AuthConfig())
    )
    assert pulled.image_ref.startswith("sha256:")
    st = await cri.images.ImageStatus(
        api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=ref))
    )
    assert st.image.id == pulled.image_ref
    assert ref in st.image.repo_tags
    assert any(d.startswith(f"{registry.host}/cri/busybox@sha256:") for d in st.image.repo_digests)
    try:
        # RemoveImage removes the image, i.e. every name of its id: the busybox the other
        # tests use is the same image, so it goes too (and is imported again below).
        await cri.images.RemoveImage(api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=ref)))
        for name in (ref, IMAGE):
            st = await cri.images.ImageStatus(
                api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=name))
            )
            assert not st.HasField("image")
        # Removing again is not an error.
        await cri.images.RemoveImage(api_pb2.RemoveImageRequest(image=api_pb2.ImageSpec(image=ref)))
    finally:
        import_busybox(cri_daemon, "k8s.io")
