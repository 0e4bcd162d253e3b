"""``pycontainerd.services.pull.v1.Pull``: the daemon's own pull, progress streamed back.

The pull runs in a task of its own (with the request's namespace and lease); its
progress reports are queued and sent as they come, and the stream ends with the image.
A client that goes away cancels the pull, which keeps its lease and partial ingests for
the next attempt, as a client-side pull does.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any, cast

from pycontainerd.api.services.pull.v1 import pull_pb2, pull_pb2_grpc

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    import grpc.aio

    from pycontainerd.client.pull import Progress
    from pycontainerd.transfer.pull import DaemonPull

    Ctx = grpc.aio.ServicerContext[Any, Any]

__all__ = ["PullServicer"]


class PullServicer(pull_pb2_grpc.PullServicer):
    def __init__(self, service: DaemonPull) -> None:
        self.service = service

    def register(self, server: Any) -> None:  # grpc.aio.Server, or our transport's
        from pycontainerd.grpc.local import LocalChannel
        from pycontainerd.grpc.transport import Server

        if isinstance(server, Server):
            self.service.attach(cast("grpc.aio.Channel", LocalChannel(server)))
        pull_pb2_grpc.add_PullServicer_to_server(self, server)

    async def Pull(
        self, request: pull_pb2.PullRequest, context: Ctx
    ) -> AsyncIterator[pull_pb2.PullProgress]:
        queue: asyncio.Queue[pull_pb2.PullProgress | None] = asyncio.Queue()

        def report(p: Progress) -> None:
            queue.put_nowait(
                pull_pb2.PullProgress(kind=p.kind, digest=p.digest, offset=p.offset, total=p.total)
            )

        task = asyncio.create_task(self.service.pull(request, report), name="pull")
        task.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            while (msg := await queue.get()) is not None:
                yield msg
            image = task.result()
            yield pull_pb2.PullProgress(
                kind="image", image_name=image.name, image_target=image.target.to_pb()
            )
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
