"""Task events back to the daemon: ``containerd.services.events.ttrpc.v1.Events/Forward``.

``publish`` only queues (it never blocks the task API); one background task sends the queue
in order over a ttrpc connection to ``TTRPC_ADDRESS``, reconnecting and retrying an event a
few times before dropping it, as containerd's shim publisher does. ``flush`` lets shutdown
wait (bounded) until the daemon has the last events (``/tasks/delete``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from google.protobuf import timestamp_pb2

from pycontainerd import typeurl
from pycontainerd.api.services.ttrpc.events.v1 import events_pb2
from pycontainerd.errdefs import PycdError
from pycontainerd.ttrpc import Client

if TYPE_CHECKING:
    from google.protobuf.empty_pb2 import Empty
    from google.protobuf.message import Message

__all__ = ["EVENTS_SERVICE", "Publisher"]

log = logging.getLogger(__name__)

EVENTS_SERVICE = "containerd.services.events.ttrpc.v1.Events"
NAMESPACE_KEY = "containerd-namespace-ttrpc"
_ATTEMPTS = 5
_QUEUE_MAX = 4096


class Publisher:
    """Ordered, retrying, non-blocking event forwarding for one namespace."""

    def __init__(self, address: str, namespace: str) -> None:
        self.address = address.removeprefix("unix://")
        self.namespace = namespace
        self._queue: asyncio.Queue[events_pb2.ForwardRequest] = asyncio.Queue(_QUEUE_MAX)
        self._client: Client | None = None
        self._task: asyncio.Task[None] | None = None

    def publish(self, topic: str, event: Message) -> None:
        """Queue ``event`` under ``topic``; dropped (logged) if there is no daemon address."""
        if not self.address:
            return
        ts = timestamp_pb2.Timestamp()
        ts.FromNanoseconds(time.time_ns())
        req = events_pb2.ForwardRequest(
            envelope=events_pb2.Envelope(
                timestamp=ts, namespace=self.namespace, topic=topic, event=typeurl.pack(event)
            )
        )
        try:
            self._queue.put_nowait(req)
        except asyncio.QueueFull:
            log.error("event queue full: dropping %s", topic)
            return
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _send(self, req: events_pb2.ForwardRequest) -> None:
        from google.protobuf.empty_pb2 import Empty

        delay = 0.05
        for attempt in range(_ATTEMPTS):
            try:
                if self._client is None or self._client.closed:
                    self._client = await Client.connect(self.address, timeout_s=2.0)
                _: Empty = await self._client.call(
                    EVENTS_SERVICE,
                    "Forward",
                    req,
                    Empty,
                    timeout_s=5.0,
                    metadata=[(NAMESPACE_KEY, self.namespace)],
                )
                return
            except (PycdError, OSError) as exc:
                if self._client is not None:
                    await self._client.close()
                    self._client = None
                if attempt + 1 == _ATTEMPTS:
                    log.error("publish %s: giving up: %s", req.envelope.topic, exc)
                    return
                await asyncio.sleep(delay)
                delay *= 2

    async def _run(self) -> None:
        while not self._queue.empty():
            req = self._queue.get_nowait()
            try:
                await self._send(req)
            finally:
                self._queue.task_done()

    async def flush(self, timeout_s: float = 5.0) -> None:
        """Wait until queued events are sent (or given up), at most ``timeout_s``."""
        if self._task is not None and not self._task.done():
            await asyncio.wait([self._task], timeout=timeout_s)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._client is not None:
            await self._client.close()
            self._client = None
