"""``Client``: the public entry point tying the services together.

``Client(address, namespace)`` is an async context manager over one channel. Image work
that writes content or snapshots (import, pull, unpack, tag) runs inside a lease the
client creates for the call, so the daemon's garbage collector never takes half-written
state; nested calls share the caller's lease when one is active.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pycontainerd.client._client import RawClient
from pycontainerd.client.content import ContentStore
from pycontainerd.client.images import Image, ImageStore, ResolvedImage, unpack
from pycontainerd.client.pull import pull

# Imported where used: containers, tasks, archives, push and events are modules a
# program that only pulls never needs (``pcd pull`` starts faster without them).

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Sequence

    import grpc

    from pycontainerd.client.containers import Container
    from pycontainerd.client.events import Event
    from pycontainerd.client.oci import Descriptor, Platform
    from pycontainerd.client.pull import Progress
    from pycontainerd.client.registry import Registry
    from pycontainerd.client.spec import Mount, Resources

__all__ = ["Client"]


class Client(RawClient):
    """An asyncio client of a containerd-compatible daemon, bound to one namespace."""

    def __init__(
        self,
        address: str,
        namespace: str = "default",
        *,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        super().__init__(address, namespace, channel=channel)
        self.content = ContentStore(self)
        self.images = ImageStore(self, self.content)

    def with_namespace(self, namespace: str) -> Client:
        """A client for another namespace sharing this one's channel (close only this one)."""
        return Client(self.address, namespace, channel=self.channel)

    # ------------------------------------------------------------------ events

    def subscribe(self, *filters: str) -> AsyncIterator[Event]:
        """Events of every namespace matching any filter (``topic=="/tasks/exit"``)."""
        from pycontainerd.client.events import subscribe

        return subscribe(self, *filters)

    # ------------------------------------------------------------------ images

    async def get_image(self, name: str) -> Image:
        return await self.images.get(name)

    async def list_images(self, *filters: str) -> list[Image]:
        return await self.images.list(*filters)

    async def tag_image(self, source: str, target: str) -> Image:
        async with self.lease():
            return await self.images.tag(source, target)

    async def remove_image(self, name: str, *, sync: bool = False) -> None:
        await self.images.delete(name, sync=sync)

    async def resolve_image(
        self, image: Image | str, platform: Platform | None = None
    ) -> ResolvedImage:
        img = await self.get_image(image) if isinstance(image, str) else image
        return await self.images.resolve(img, platform)

    async def import_archive(
        self,
        path: str | Path,
        *,
        base_name: str = "",
        index_name: str = "",
        unpack: bool = True,
        snapshotter: str | None = None,
    ) -> list[Image]:
        """Import an OCI or Docker archive; unpack each image for this host by default."""
        async with self.lease():
            from pycontainerd.client import archive as _archive

            imgs = await _archive.import_archive(
                self.content, self.images, Path(path), base_name=base_name, index_name=index_name
            )
            if unpack:
                for img in imgs:
                    await self.unpack(img, snapshotter)
        return imgs

    async def export_archive(self, path: str | Path, *names: str) -> dict[str, Any]:
        """Write the named images as an OCI archive; returns the archive's index.json."""
        imgs = [await self.get_image(n) for n in names]
        from pycontainerd.client import archive as _archive

        return await _archive.export_archive(self.content, imgs, Path(path))

    async def unpack(
        self,
        image: Image | str,
        snapshotter: str | None = None,
        platform: Platform | None = None,
    ) -> str:
        """Apply the image's layers into ``snapshotter``; returns the top chain ID."""
        img = await self.get_image(image) if isinstance(image, str) else image
        snapshotter = snapshotter or await self.default_snapshotter()
        async with self.lease():
            return await unpack(self, self.images, img, snapshotter, platform)

    # ------------------------------------------------------------------ registries

    async def pull(
        self,
        ref: str,
        registry: Registry,
        *,
        platform: Platform | None = None,
        unpack: bool = True,
        snapshotter: str | None = None,
        concurrency: int = 4,
        progress: Callable[[Progress], None] | None = None,
        in_daemon: bool | None = None,
    ) -> Image:
        """Fetch ``ref`` (host platform of an index), record the image, unpack it.

        The daemon does it when it has pycontainerd's Pull service (``in_daemon``: None
        picks, True insists, False pulls through this process)."""
        return await pull(
            self,
            ref,
            registry,
            platform=platform,
            unpack_image=unpack,
            snapshotter=snapshotter,
            concurrency=concurrency,
            progress=progress,
            in_daemon=in_daemon,
        )

    async def push(
        self,
        ref: str,
        image: Image | str,
        registry: Registry,
        *,
        platform: Platform | None = None,
        chunk_size: int | None = None,
        concurrency: int = 4,
        progress: Callable[[Progress], None] | None = None,
    ) -> Descriptor:
        """Upload ``image`` to the registry as ``ref``: blobs, manifests, then the root."""
        from pycontainerd.client.push import push

        return await push(
            self,
            ref,
            image,
            registry,
            platform=platform,
            chunk_size=chunk_size,
            concurrency=concurrency,
            progress=progress,
        )

    # ------------------------------------------------------------------ containers

    async def create_container(
        self,
        container_id: str,
        image: str,
        *,
        args: Sequence[str] | None = None,
        env: Sequence[str] = (),
        cwd: str | None = None,
        mounts: Sequence[Mount] = (),
        tty: bool = False,
        user: str | None = None,
        hostname: str | None = None,
        resources: Resources | None = None,
        privileged: bool = False,
        network: str = "none",
        runtime: str = "io.containerd.runc.v2",
        snapshotter: str | None = None,
        labels: dict[str, str] | None = None,
    ) -> Container:
        """A container from ``image`` with a spec from containerd's defaults, the image
        config, and these options (``network``: ``none``, ``host`` or a netns path)."""
        from pycontainerd.client.containers import create_container

        return await create_container(
            self, container_id, image, args=args, env=env, cwd=cwd, mounts=mounts, tty=tty,
            user=user, hostname=hostname, resources=resources, privileged=privileged,
            network=network, runtime=runtime, snapshotter=snapshotter, labels=labels,
        )  # fmt: skip

    async def load_container(self, container_id: str) -> Container:
        from pycontainerd.api.services.containers.v1 import containers_pb2
        from pycontainerd.client.containers import Container

        resp = await self.call(
            self.containers_stub.Get, containers_pb2.GetContainerRequest(id=container_id)
        )
        return Container.from_pb(self, resp.container)

    async def list_containers(self, *filters: str) -> list[Container]:
        from pycontainerd.api.services.containers.v1 import containers_pb2
        from pycontainerd.client.containers import Container

        resp = await self.call(
            self.containers_stub.List, containers_pb2.ListContainersRequest(filters=filters)
        )
        return [Container.from_pb(self, c) for c in resp.containers]
