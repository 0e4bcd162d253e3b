"""Pack protobuf messages into ``google.protobuf.Any`` the way containerd's ``typeurl`` does.

containerd registers its types under their **bare** full names (``containerd.events.TaskExit``),
and Go's ``typeurl.UnmarshalAny`` only resolves such URLs: an ``Any`` carrying
``type.googleapis.com/containerd.events.TaskExit`` makes ``ctr events`` print "cannot
unmarshal an event from Any" and drop the event. So ``pack`` never adds a prefix, and
``unpack`` accepts both forms (anything up to the last ``/`` is ignored), resolving names
through protobuf's default descriptor pool. Importing this module imports every event
module of ``pycontainerd.api`` so their types can be resolved.
"""

from __future__ import annotations

from google.protobuf import any_pb2, message_factory
from google.protobuf import descriptor_pool as _descriptor_pool
from google.protobuf.message import DecodeError, Message

# Registers the event types in the default pool; unpack of an event needs them loaded.
from pycontainerd.api.events import (  # noqa: F401
    container_pb2,
    content_pb2,
    image_pb2,
    namespace_pb2,
    snapshot_pb2,
    task_pb2,
)
from pycontainerd.errdefs import InvalidArgument, NotFound

__all__ = ["pack", "type_name", "unpack"]

_classes: dict[str, type[Message]] = {}


def pack(msg: Message) -> any_pb2.Any:
    """Wrap ``msg`` in an ``Any`` whose type_url is its bare full name; an Any is kept as is."""
    if isinstance(msg, any_pb2.Any):
        return msg
    return any_pb2.Any(type_url=msg.DESCRIPTOR.full_name, value=msg.SerializeToString())


def type_name(type_url: str) -> str:
    """The message name of a type URL: the part after the last ``/`` (all of it if none)."""
    return type_url.rpartition("/")[2]


def message_class(type_url: str) -> type[Message]:
    """The generated class for ``type_url``; NotFound when no loaded module defines it."""
    name = type_name(type_url)
    cls = _classes.get(name)
    if cls is not None:
        return cls
    try:
        desc = _descriptor_pool.Default().FindMessageTypeByName(name)
    except KeyError:
        raise NotFound(f"type {type_url!r}") from None
    cls = message_factory.GetMessageClass(desc)
    _classes[name] = cls
    return cls


def unpack(any_msg: any_pb2.Any) -> Message:
    """Decode ``any_msg``; NotFound for an unknown type, InvalidArgument if corrupt."""
    if not any_msg.type_url:
        raise InvalidArgument("Any has no type_url")
    cls = message_class(any_msg.type_url)
    try:
        return cls.FromString(any_msg.value)
    except DecodeError as exc:
        raise InvalidArgument(f"cannot decode {any_msg.type_url!r}: {exc}") from exc
