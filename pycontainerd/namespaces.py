"""The namespace (and lease) of the current request.

The gRPC interceptor copies the ``containerd-namespace`` and ``containerd-lease`` metadata
values into these context variables; each asyncio task (one per RPC) sees its own copy.
Services call ``namespace_required()`` before touching namespaced state.
"""

from __future__ import annotations

from contextvars import ContextVar

from pycontainerd import identifiers
from pycontainerd.errdefs import FailedPrecondition

NAMESPACE_HEADER = "containerd-namespace"
NAMESPACE_TTRPC_HEADER = "containerd-namespace-ttrpc"
LEASE_HEADER = "containerd-lease"
DEFAULT_NAMESPACE = "default"

current_namespace: ContextVar[str | None] = ContextVar("pycontainerd_namespace", default=None)
current_lease: ContextVar[str | None] = ContextVar("pycontainerd_lease", default=None)


def namespace_required() -> str:
    """The request's namespace: FailedPrecondition when absent, InvalidArgument when malformed."""
    ns = current_namespace.get()
    if not ns:
        raise FailedPrecondition("namespace is required")
    return identifiers.validate(ns)


def lease() -> str | None:
    """Return the lease named by the request, if any."""
    return current_lease.get() or None
