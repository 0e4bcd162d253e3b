"""The event exchange: fan every published envelope out to its matching subscribers.

``publish`` and ``forward`` are synchronous and never await: each builds the
``containerd.services.events.v1.Envelope`` once, serializes it once, and appends the same
``Published`` record (envelope + bytes) to the queue of every subscriber whose filter
matches. The gRPC Subscribe handler sends those bytes as they are; in-process consumers
read the shared envelope (treat it as read-only).

Guarantees (see reliability.md §2.7): each subscriber receives events in publish order; a
subscriber sees all namespaces unless its filter says otherwise; each subscriber's queue is
bounded (``queue_size``, 65536 by default) and a subscriber whose queue overflows is cut
off — its queue is dropped and its iterator raises ``ResourceExhausted`` — so a slow reader
costs memory up to its bound and never delays publishers or other subscribers. Nothing is
persisted or replayed. All methods must be called on the event loop's thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Self

from google.protobuf import any_pb2, timestamp_pb2

from pycontainerd import filters as _filters
from pycontainerd import identifiers, typeurl
from pycontainerd.api.services.events.v1.events_pb2 import Envelope
from pycontainerd.errdefs import InvalidArgument, ResourceExhausted
from pycontainerd.events import topics
from pycontainerd.namespaces import namespace_required

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence
    from types import TracebackType

    from google.protobuf.message import Message

__all__ = ["DEFAULT_QUEUE_SIZE", "Exchange", "Published", "Subscription"]

log = logging.getLogger(__name__)

DEFAULT_QUEUE_SIZE = 65536

# Go's zero time.Time encoded as a Timestamp (0001-01-01T00:00:00Z).
_GO_ZERO_SECONDS = -62135596800
# Validated names are remembered so the hot path skips the regular expressions; the caps
# keep a caller inventing names from growing the caches without bound.
_CACHE_LIMIT = 4096


class Published:
    """One event as it travels to subscribers: the envelope and its wire bytes."""

    __slots__ = ("_message", "data", "envelope")

    def __init__(self, envelope: Envelope, data: bytes, message: Message | None = None) -> None:
        self.envelope = envelope
        self.data = data
        self._message = message

    def field(self, path: Sequence[str]) -> tuple[str, bool]:
        """The filter adaptor of containerd's ``Envelope.Field``: topic, namespace, event.*."""
        if not path:
            return "", False
        head = path[0]
        if head == "topic":
            t = self.envelope.topic
            return t, bool(t)
        if head == "namespace":
            ns = self.envelope.namespace
            return ns, bool(ns)
        if head == "event":
            msg = self._message
            if msg is None:
                try:
                    msg = typeurl.unpack(self.envelope.event)
                except Exception:
                    return "", False
                # Decoded once, then shared by every subscriber's filter.
                self._message = msg
            return _filters.message_field(msg, path[1:])
        return "", False


class Subscription:
    """An async iterator of envelopes for one subscriber; close it when done.

    ``async for env in sub`` yields ``Envelope`` messages; ``raw()`` yields their serialized
    bytes instead. Iteration ends when the subscription is closed and raises
    ``ResourceExhausted`` once the subscriber has been cut off for falling behind.
    """

    __slots__ = ("_closed", "_error", "_exchange", "_limit", "_queue", "_waiter", "filter")

    def __init__(self, exchange: Exchange, filter_: _filters.Filter | None, limit: int) -> None:
        self._exchange = exchange
        self.filter = filter_  # None: everything matches, no adaptor lookups at all
        self._limit = limit
        self._queue: deque[Published] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._error: ResourceExhausted | None = None
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed or self._error is not None

    def pending(self) -> int:
        """Events queued and not read yet."""
        return len(self._queue)

    def _wake(self) -> None:
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    def _cut_off(self) -> None:
        log.warning(
            "event subscriber cut off: %d events queued and not read (queue size %d)",
            len(self._queue),
            self._limit,
        )
        self._queue.clear()
        self._error = ResourceExhausted(
            f"event subscriber fell behind by more than {self._limit} events"
        )
        self._exchange._remove(self)
        self._wake()

    async def _wait(self) -> None:
        """Return once an event is queued; raise at the end of the subscription."""
        while not self._queue:
            if self._error is not None:
                raise self._error
            if self._closed:
                raise StopAsyncIteration
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiter = fut
            try:
                await fut
            finally:
                if self._waiter is fut:
                    self._waiter = None

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Envelope:
        if not self._queue:
            await self._wait()
        return self._queue.popleft().envelope

    async def next_published(self) -> Published:
        """The next event with its wire bytes; StopAsyncIteration when closed."""
        if not self._queue:
            await self._wait()
        return self._queue.popleft()

    async def raw(self) -> AsyncIterator[bytes]:
        """Serialized envelopes, each exactly as it goes on the wire; drains in batches."""
        queue = self._queue
        while True:
            try:
                await self._wait()
            except StopAsyncIteration:
                return
            while queue:
                yield queue.popleft().data

    def close(self) -> None:
        """Stop receiving; a pending or later read ends the iteration. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._queue.clear()
        self._exchange._remove(self)
        self._wake()

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Exchange:
    """Publisher, forwarder and subscriber hub for events (containerd's ``exchange``)."""

    def __init__(self, queue_size: int = DEFAULT_QUEUE_SIZE) -> None:
        if queue_size < 1:
            raise InvalidArgument(f"event queue size must be positive, not {queue_size}")
        self.queue_size = queue_size
        # Copy-on-write: publishing iterates a tuple nobody mutates.
        self._subscribers: tuple[Subscription, ...] = ()
        self._valid_topics: set[str] = set(topics.ALL)
        self._valid_namespaces: set[str] = set()
        # Subscribers with the same filter strings share one Filter object, so _broadcast
        # matches it once per event however many of them there are (e.g. many `ctr events`).
        self._filters: dict[tuple[str, ...], _filters.Filter] = {}

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    # --- publishing --------------------------------------------------------------------

    def publish(self, topic: str, event: Message, namespace: str | None = None) -> None:
        """Send ``event`` under ``topic`` in ``namespace`` (default: the request's).

        Raises FailedPrecondition without a namespace, InvalidArgument for a bad topic or
        namespace. ``event`` is packed with a bare type URL; an ``Any`` is sent as is.
        """
        if namespace is None:
            namespace = namespace_required()
        else:
            self._check_namespace(namespace)
        self._check_topic(topic)
        packed = typeurl.pack(event)
        seconds, nanos = divmod(time.time_ns(), 1_000_000_000)
        envelope = Envelope(
            timestamp=timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos),
            namespace=namespace,
            topic=topic,
            event=packed,
        )
        message = None if isinstance(event, any_pb2.Any) else event
        self._broadcast(Published(envelope, envelope.SerializeToString(), message))

    def forward(self, envelope: Envelope) -> None:
        """Send an envelope made elsewhere (e.g. by a shim) as is, after validating it.

        InvalidArgument for a bad namespace or topic, or a missing/zero timestamp.
        """
        try:
            self._check_namespace(envelope.namespace)
        except InvalidArgument as exc:
            raise InvalidArgument(f"event envelope has invalid namespace: {exc.message}") from None
        self._check_topic(envelope.topic)
        ts = envelope.timestamp
        zero = ts.nanos == 0 and ts.seconds in (0, _GO_ZERO_SECONDS)
        if zero or not envelope.HasField("timestamp"):
            raise InvalidArgument("timestamp must be set on forwarded event")
        self._broadcast(Published(envelope, envelope.SerializeToString()))

    def _check_topic(self, topic: str) -> None:
        if topic in self._valid_topics:
            return
        topics.validate(topic)
        if len(self._valid_topics) < _CACHE_LIMIT:
            self._valid_topics.add(topic)

    def _check_namespace(self, namespace: str) -> None:
        if namespace in self._valid_namespaces:
            return
        identifiers.validate(namespace)
        if len(self._valid_namespaces) < _CACHE_LIMIT:
            self._valid_namespaces.add(namespace)

    def _broadcast(self, ev: Published) -> None:
        # The hot loop: per subscriber one optional filter match and one append. A waiting
        # reader is woken once; events published before it runs are drained in one batch.
        overflowed: list[Subscription] | None = None
        adaptor = ev.field
        matched: dict[_filters.Filter, bool] = {}
        for sub in self._subscribers:
            f = sub.filter
            if f is not None:
                hit = matched.get(f)
                if hit is None:
                    hit = matched[f] = f.match(adaptor)
                if not hit:
                    continue
            q = sub._queue
            if len(q) >= sub._limit:
                if overflowed is None:
                    overflowed = []
                overflowed.append(sub)
                continue
            q.append(ev)
            w = sub._waiter
            if w is not None:
                sub._waiter = None
                if not w.done():
                    w.set_result(None)
        if overflowed is not None:
            for sub in overflowed:
                sub._cut_off()

    # --- subscribing -------------------------------------------------------------------

    def subscribe(
        self, filters: Sequence[str] = (), *, queue_size: int | None = None
    ) -> Subscription:
        """Start receiving events matching any of ``filters`` (containerd filter syntax).

        Raises InvalidArgument for a malformed filter. Use ``async with`` or ``close()``.
        """
        key = (filters,) if isinstance(filters, str) else tuple(filters)
        parsed = self._filters.get(key)
        if parsed is None:
            parsed = _filters.parse(key)
            if len(self._filters) >= _CACHE_LIMIT:
                self._filters.clear()
            self._filters[key] = parsed
        limit = self.queue_size if queue_size is None else queue_size
        if limit < 1:
            raise InvalidArgument(f"event queue size must be positive, not {limit}")
        sub = Subscription(self, None if parsed.always else parsed, limit)
        self._subscribers = (*self._subscribers, sub)
        return sub

    def _remove(self, sub: Subscription) -> None:
        if sub in self._subscribers:
            self._subscribers = tuple(s for s in self._subscribers if s is not sub)

    def close(self) -> None:
        """End every subscription (daemon shutdown); their iterators stop cleanly."""
        for sub in self._subscribers:
            sub.close()
