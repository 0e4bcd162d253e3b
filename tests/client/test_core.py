"""Client core against both daemons: version, namespaces, leases, content ingests (with
resume after a failed source), events, and errors surfacing as our own classes."""

from __future__ import annotations

import asyncio
import hashlib
from typing import TYPE_CHECKING

import pytest

from pycontainerd.client import Client
from pycontainerd.errdefs import (
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    PycdError,
    Unavailable,
)
from tests.client.conftest import unique_ns

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from pycontainerd.client.events import Event


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def test_version_and_namespaces(any_client: Client) -> None:
    version, _revision = await any_client.version()
    assert version
    ns = unique_ns("made")
    # Calls made *in* a namespace may bring it back into being: manage it from another.
    any_client = any_client.with_namespace("default")
    await any_client.create_namespace(ns, {"a": "b"})
    with pytest.raises(AlreadyExists):
        await any_client.create_namespace(ns)
    await any_client.update_namespace_labels(ns, {"c": "d"})
    got = await any_client.get_namespace(ns)
    assert got.labels == {"a": "b", "c": "d"}
    assert ns in [n.name for n in await any_client.list_namespaces()]
    await any_client.delete_namespace(ns)
    # containerd's Get answers an empty label set for any name; List is authoritative.
    assert ns not in [n.name for n in await any_client.list_namespaces()]


async def test_errors_are_domain_errors(any_client: Client) -> None:
    with pytest.raises(NotFound) as info:
        await any_client.get_image("example.com/nothing:here")
    assert type(info.value).__module__ == "pycontainerd.errdefs"
    async with Client("/nonexistent/dir/sock") as dead:
        with pytest.raises(Unavailable):
            await dead.version()


async def test_lease_header_protects_content(any_client: Client) -> None:
    data = b"leased blob " * 1000
    async with any_client.lease() as lease:
        assert any_client.current_lease() == lease.id
        assert lease.id in [x.id for x in await any_client.list_leases()]
        await any_client.content.ingest("lease-test", data, expected=sha(data), size=len(data))
        assert (await any_client.content.info(sha(data))).size == len(data)
    assert any_client.current_lease() is None
    assert lease.id not in [x.id for x in await any_client.list_leases()]


class Flaky:
    """An ingest source that fails after `fail_at` bytes the first time."""

    def __init__(self, data: bytes, fail_at: int) -> None:
        self.data = data
        self.fail_at = fail_at
        self.offsets: list[int] = []

    async def __call__(self, offset: int) -> AsyncIterator[bytes]:
        self.offsets.append(offset)
        pos = offset
        while pos < len(self.data):
            if len(self.offsets) == 1 and pos >= self.fail_at:
                raise ConnectionResetError("source went away")
            chunk = self.data[pos : pos + 4096]
            pos += len(chunk)
            yield chunk


async def test_ingest_resumes_at_the_daemons_offset(any_client: Client) -> None:
    data = bytes(range(256)) * 200  # 51200 bytes
    src = Flaky(data, fail_at=20480)
    async with any_client.lease():
        with pytest.raises(ConnectionResetError):
            await any_client.content.ingest("resume-me", src, expected=sha(data), size=len(data))
        status = await any_client.content.status("resume-me")
        assert status.offset == 20480
        assert await any_client.content.ingest("resume-me", src, expected=sha(data), size=len(data))
        assert src.offsets == [0, 20480]
        assert b"".join([c async for c in any_client.content.read(sha(data))]) == data
        # Already present: nothing is written and the answer says so.
        assert not await any_client.content.ingest(
            "resume-me", data, expected=sha(data), size=len(data)
        )


async def test_ingest_with_wrong_digest_fails_and_aborts(any_client: Client) -> None:
    data = b"x" * 5000
    wrong = sha(b"something else")
    async with any_client.lease():
        with pytest.raises(FailedPrecondition):
            await any_client.content.ingest("bad-digest", data, expected=wrong, size=len(data))
        with pytest.raises(NotFound):
            await any_client.content.status("bad-digest")
        with pytest.raises(NotFound):
            await any_client.content.info(wrong)


async def _until(events: AsyncIterator[Event], topic: str, pred: object) -> Event:
    async for ev in events:
        if ev.topic == topic and pred(ev):  # type: ignore[operator]
            return ev
    raise AssertionError("event stream ended")


async def test_events_async_iterator(any_client: Client) -> None:
    stream = any_client.subscribe('topic~="/namespaces/"')
    first = asyncio.ensure_future(anext(stream))
    # The subscription is live once an event of ours comes back: keep poking until then.
    for i in range(200):
        await any_client.create_namespace(unique_ns(f"poke{i}"))
        done, _ = await asyncio.wait([first], timeout=0.05)
        if done:
            break
    assert first.done()
    name = unique_ns("watched")
    await any_client.create_namespace(name, {"k": "v"})
    ev = await _until(stream, "/namespaces/create", lambda e: e.payload.name == name)
    assert ev.type_name == "containerd.events.NamespaceCreate"
    assert dict(ev.payload.labels) == {"k": "v"}  # type: ignore[union-attr]
    await stream.aclose()  # type: ignore[attr-defined]


async def test_domain_error_hierarchy_is_one_root(any_client: Client) -> None:
    with pytest.raises(PycdError):
        await any_client.delete_lease("never-created")
