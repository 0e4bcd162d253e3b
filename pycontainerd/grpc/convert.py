"""Conversions between protobuf wire types and the plain values domain code uses."""

from __future__ import annotations

from google.protobuf import timestamp_pb2


def timestamp(ns: int) -> timestamp_pb2.Timestamp:
    """Nanoseconds since the epoch as a protobuf Timestamp."""
    return timestamp_pb2.Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def from_timestamp(ts: timestamp_pb2.Timestamp) -> int:
    """A protobuf Timestamp as nanoseconds (Go's zero time and unset both give 0)."""
    if ts.seconds <= 0 and ts.nanos == 0:
        return 0
    return ts.seconds * 1_000_000_000 + ts.nanos
