"""The project's error types and their gRPC status codes, in one place.

Domain code raises these; the gRPC interceptor (``pycontainerd.grpc.interceptors``)
turns them into statuses, and ``from_status`` turns a status back into the same class on
the client side, as containerd's ``errdefs.ToGRPC``/``FromGRPC`` do. Messages follow
containerd's ``"<context>: <class text>"`` style (``namespace "x": not found``), which
``ctr`` prints verbatim.

Hierarchy::

    PycdError (UNKNOWN)
    ├── InvalidArgument      INVALID_ARGUMENT
    ├── NotFound             NOT_FOUND
    ├── AlreadyExists        ALREADY_EXISTS
    ├── FailedPrecondition   FAILED_PRECONDITION
    ├── Unavailable          UNAVAILABLE
    ├── Unimplemented        UNIMPLEMENTED
    ├── Internal             INTERNAL
    ├── OutOfRange           OUT_OF_RANGE
    ├── DataLoss             DATA_LOSS
    ├── ResourceExhausted    RESOURCE_EXHAUSTED
    ├── Canceled             CANCELLED
    ├── DeadlineExceeded     DEADLINE_EXCEEDED
    └── Unauthorized         UNAUTHENTICATED (a registry refused the credentials)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import grpc

__all__ = [
    "AlreadyExists",
    "Canceled",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutOfRange",
    "PycdError",
    "ResourceExhausted",
    "Unauthorized",
    "Unavailable",
    "Unimplemented",
    "from_rpc_error",
    "from_status",
]


class _Code:
    """An error class's ``grpc.StatusCode``, looked up on first use: gRPC is not imported
    by importing this module (a command-line program that never meets an error, or a
    shim, does not pay ~40 ms for it)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._code: grpc.StatusCode | None = None

    def __get__(self, obj: Any, owner: Any) -> grpc.StatusCode:
        if self._code is None:
            import grpc

            self._code = grpc.StatusCode[self.name]
        return self._code


class PycdError(Exception):
    """Base of every domain error; unmapped failures surface as UNKNOWN, as in containerd."""

    code: ClassVar[_Code] = _Code("UNKNOWN")  # (reads as a grpc.StatusCode)
    text: ClassVar[str] = "unknown"

    def __init__(self, message: str = "") -> None:
        self.message = message
        super().__init__(message)

    def __str__(self) -> str:
        if not self.message:
            return self.text
        if self.message == self.text or self.message.endswith(": " + self.text):
            return self.message
        return f"{self.message}: {self.text}"


class InvalidArgument(PycdError):
    code = _Code("INVALID_ARGUMENT")
    text = "invalid argument"


class NotFound(PycdError):
    code = _Code("NOT_FOUND")
    text = "not found"


class AlreadyExists(PycdError):
    code = _Code("ALREADY_EXISTS")
    text = "already exists"


class FailedPrecondition(PycdError):
    code = _Code("FAILED_PRECONDITION")
    text = "failed precondition"


class Unavailable(PycdError):
    code = _Code("UNAVAILABLE")
    text = "unavailable"


class Unimplemented(PycdError):
    code = _Code("UNIMPLEMENTED")
    text = "not implemented"


class Internal(PycdError):
    code = _Code("INTERNAL")
    text = "internal"


class OutOfRange(PycdError):
    code = _Code("OUT_OF_RANGE")
    text = "out of range"


class DataLoss(PycdError):
    code = _Code("DATA_LOSS")
    text = "data loss"


class ResourceExhausted(PycdError):
    code = _Code("RESOURCE_EXHAUSTED")
    text = "resource exhausted"


class Canceled(PycdError):
    code = _Code("CANCELLED")
    text = "context canceled"


class DeadlineExceeded(PycdError):
    code = _Code("DEADLINE_EXCEEDED")
    text = "context deadline exceeded"


class Unauthorized(PycdError):
    """A registry refused our credentials (or we had none to give)."""

    code = _Code("UNAUTHENTICATED")
    text = "unauthorized"


_CLASSES: tuple[type[PycdError], ...] = (
    InvalidArgument,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    Unavailable,
    Unimplemented,
    Internal,
    OutOfRange,
    DataLoss,
    ResourceExhausted,
    Canceled,
    DeadlineExceeded,
    Unauthorized,
)
_BY_CODE: dict[grpc.StatusCode, type[PycdError]] = {}


def from_status(code: grpc.StatusCode, details: str | None) -> PycdError:
    """Map a gRPC status back to the domain error a server raised."""
    if not _BY_CODE:
        _BY_CODE.update((c.code, c) for c in _CLASSES)
    cls = _BY_CODE.get(code, PycdError)
    message = details or ""
    suffix = ": " + cls.text
    if message.endswith(suffix):
        message = message[: -len(suffix)]
    elif message == cls.text:
        message = ""
    return cls(message)


def from_rpc_error(exc: grpc.RpcError) -> PycdError:
    """Convert a raised ``grpc.RpcError`` (sync or aio) into a domain error."""
    code = exc.code() if hasattr(exc, "code") else PycdError.code
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return from_status(code, details)
