"""Keep the real ``grpc`` package out of shim processes.

The shim speaks only ttrpc, but ``pycontainerd.errdefs`` and ``pycontainerd.ttrpc`` import
``grpc`` for ``grpc.StatusCode`` alone — and importing grpc costs ~10 MiB of memory and
~0.15 s per interpreter. ``install()`` (called first thing in the zygote and in the
``serve`` action, never in the daemon) registers a minimal stand-in module providing
``StatusCode`` (same names and values as grpc's) and ``RpcError``, unless grpc is already
imported. Nothing in the shim needs more of grpc; a module that did would fail loudly on
import.
"""

from __future__ import annotations

import enum
import sys
import types

__all__ = ["install"]


class StatusCode(enum.Enum):
    OK = (0, "ok")
    CANCELLED = (1, "cancelled")
    UNKNOWN = (2, "unknown")
    INVALID_ARGUMENT = (3, "invalid argument")
    DEADLINE_EXCEEDED = (4, "deadline exceeded")
    NOT_FOUND = (5, "not found")
    ALREADY_EXISTS = (6, "already exists")
    PERMISSION_DENIED = (7, "permission denied")
    RESOURCE_EXHAUSTED = (8, "resource exhausted")
    FAILED_PRECONDITION = (9, "failed precondition")
    ABORTED = (10, "aborted")
    OUT_OF_RANGE = (11, "out of range")
    UNIMPLEMENTED = (12, "unimplemented")
    INTERNAL = (13, "internal")
    UNAVAILABLE = (14, "unavailable")
    DATA_LOSS = (15, "data loss")
    UNAUTHENTICATED = (16, "unauthenticated")


class RpcError(Exception):
    """Stand-in for ``grpc.RpcError`` (never raised in a shim)."""


def install() -> None:
    if "grpc" in sys.modules:
        return
    mod = types.ModuleType("grpc", "pycontainerd shim stand-in for grpc (StatusCode only)")
    mod.StatusCode = StatusCode  # type: ignore[attr-defined]
    mod.RpcError = RpcError  # type: ignore[attr-defined]
    sys.modules["grpc"] = mod
