"""Events: the exchange that fans published events out to subscribers, and topic names.

Domain services publish through the ``Publisher`` protocol after their transaction has
committed; ``publish`` never blocks and never fails because of a slow subscriber.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from google.protobuf.message import Message


@runtime_checkable
class Publisher(Protocol):
    """Anything that accepts events: the exchange, or a test recorder."""

    def publish(self, topic: str, event: Message, namespace: str | None = None) -> None:
        """Queue ``event`` under ``topic`` in ``namespace`` (default: the request's)."""
