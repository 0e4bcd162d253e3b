"""Layers unpacked while their blobs are written, then moved into their snapshot.

containerd's clients write every blob first, then unpack the layers one after the other,
each onto its parent's snapshot, reading each blob back from disk: the unpack cannot
start before the last byte is in. Here a blob that looks like a layer is unpacked while
it is written — by the daemon's own pull, or by any client through Content.Write (``ctr
images import``) — into a *staging* directory of its own, and Diff.Apply later moves
that directory into the fresh snapshot instead of unpacking the blob.

The unpacking runs in a helper process, :mod:`.unpacker`, which reads the ingest's file
as it grows, on the CPU nobody else wants until Diff.Apply waits for the layer: it
never competes with the event loop for the interpreter lock, and never holds the write
up.

A layer unpacked before anyone says which layer of which chain it is, is unpacked in
overlay form, which needs nothing from the layers below except in two places:

- the parent directories a layer implies without entries of its own take their owner,
  mode and xattrs from the same directory below (containerd's ``WithParents``): the apply
  lists them (``defer_parents``) and :meth:`StagedLayer.adopt` gives them their
  attributes once the lower layers are known;
- if it turns out to be the first layer (a bind mount of an empty directory), its
  whiteout devices and opaque markers are dropped, which gives what a naive apply onto
  nothing gives (:func:`pycontainerd.archive.drop_overlay_markers`).

Hardlinks resolve inside the layer itself, as in containerd's overlay applier.

:meth:`StagedLayer.adopt` checks that the snapshot's mounts fit (an empty directory on
the same filesystem) and renames the staging directory into place. Anything else —
another snapshotter, an unpack that failed, a resumed or restarted write — leaves the
layer to Diff.Apply from the stored blob, which also gives a bad layer its usual error.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any, Protocol

from pycontainerd.archive import (
    ApplyResult,
    Compression,
    copy_implied_parents,
    drop_overlay_markers,
)
from pycontainerd.archive.compression import detect_compression
from pycontainerd.snapshots.mount import option_value
from pycontainerd.transfer.unpacker import MAX_MESSAGE

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from pathlib import Path


class _MountLike(Protocol):
    """A mount, as a protobuf message or the daemon's own Mount."""

    @property
    def type(self) -> str: ...
    @property
    def source(self) -> str: ...
    @property
    def options(self) -> Sequence[str]: ...


__all__ = ["Speculation", "StagedLayer", "Stager", "looks_like_layer"]

log = logging.getLogger(__name__)


class StagedLayer:
    """One layer's staging directory and the outcome of unpacking it there (in overlay
    form, with its markers listed, so that it can still become a first layer)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.result: ApplyResult | None = None

    def adopt(self, mounts: Sequence[_MountLike]) -> bool:
        """Move the unpacked layer into the fresh snapshot ``mounts`` describe; False
        (nothing changed) when they are not what the staging can become. Blocking."""
        result = self.result
        if result is None or not self.path.is_dir():
            return False
        kind, target, lowers = _target(mounts)
        if target is None or (kind == "bind" and not result.markers_droppable):
            return False
        try:
            st = os.lstat(target)
            staged = os.lstat(self.path)
            if not stat.S_ISDIR(st.st_mode) or st.st_dev != staged.st_dev or os.listdir(target):
                return False
        except OSError:
            return False
        if kind == "bind":
            drop_overlay_markers(self.path, result)  # it is a first layer
        # The snapshot's own root directory keeps its owner and mode, as when unpacked into it.
        os.chown(self.path, st.st_uid, st.st_gid)
        os.chmod(self.path, stat.S_IMODE(st.st_mode))
        if result.implied:
            copy_implied_parents(self.path, result.implied, lowers, result.relisted)
        os.rmdir(target)
        os.rename(self.path, target)
        return True

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _target(mounts: Sequence[_MountLike]) -> tuple[str, str | None, list[str]]:
    """(bind or overlay, the directory a layer goes to under ``mounts``, its lowers)."""
    if len(mounts) != 1:
        return "", None, []
    m = mounts[0]
    if m.type == "bind" and "ro" not in m.options:
        return "bind", m.source, []
    if m.type == "overlay":
        upper = option_value(m.options, "upperdir")
        lower = option_value(m.options, "lowerdir")
        if upper:
            return "overlay", upper, lower.split(":") if lower else []
    return "", None, []


def looks_like_layer(head: bytes) -> bool:
    """Whether a blob starting with ``head`` may be a layer: gzip, zstd, or a tar."""
    if detect_compression(head) is not Compression.NONE:
        return True
    return head[257:262] == b"ustar"


class _Helper:
    """The speculative unpacker process (:mod:`.unpacker`) and its socket."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pycontainerd.transfer.unpacker", str(child.fileno())],
                pass_fds=[child.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        parent.setblocking(False)
        self.sock = parent
        self.alive = True
        self._ids = itertools.count(1)
        self._jobs: dict[int, asyncio.Future[dict[str, Any]]] = {}

    def attach(self) -> None:
        """Watch for answers (on the loop, once the process is started)."""
        self._loop.add_reader(self.sock.fileno(), self._readable)

    def begin(
        self, path: Path, fd: int, limit: int, hurry: bool = False
    ) -> tuple[int, asyncio.Future[dict[str, Any]]]:
        job_id = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        self._jobs[job_id] = fut
        doc = {"op": "begin", "id": job_id, "path": str(path), "limit": limit, "hurry": hurry}
        self.send(doc, [fd])
        return job_id, fut

    def hurry(self, job_id: int) -> None:
        """Someone waits for job ``job_id``: it may no longer run on idle CPU only."""
        if job_id in self._jobs:
            self.send({"op": "hurry", "id": job_id})

    def send(self, doc: dict[str, Any], fds: Sequence[int] = ()) -> None:
        if not self.alive:
            return
        try:
            socket.send_fds(self.sock, [json.dumps(doc).encode()], list(fds))
        except OSError as exc:  # full or gone: the jobs fail, the daemon unpacks itself
            log.debug("speculative unpacker: %s", exc)
            self._die()

    def _readable(self) -> None:
        while True:
            try:
                data = self.sock.recv(MAX_MESSAGE)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._die()
                return
            doc = json.loads(data)
            fut = self._jobs.pop(int(doc["id"]), None)
            if fut is not None and not fut.done():
                fut.set_result(doc)

    async def stop(self) -> None:
        """End the process: it exits when its socket closes (killed after 5 s)."""
        proc = self.proc
        self._die(kill=False)
        try:
            await asyncio.to_thread(proc.wait, 5.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait)

    def _die(self, kill: bool = True) -> None:
        if not self.alive:
            return
        self.alive = False
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self.sock.fileno())
        self.sock.close()
        for fut in self._jobs.values():
            if not fut.done():
                fut.set_result({"error": "the speculative unpacker stopped"})
        self._jobs.clear()
        if kill:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            # Reaped in a thread: the process may take a moment to go.
            self._loop.run_in_executor(None, self.proc.wait)


class Speculation:
    """A blob being written through the Content service, unpacked on the side by the
    speculative unpacker in case it turns out to be a layer someone applies (``ctr
    images import`` applies each layer right after writing every blob). The unpacker
    reads the ingest's own file as it grows: the write never waits for it."""

    def __init__(self, stager: Stager, helper: _Helper, job: int, layer: StagedLayer,
                 work: asyncio.Future[None]) -> None:  # fmt: skip
        self._stager = stager
        self._helper = helper
        self._job = job
        self._layer = layer
        self._work = work
        self.active = True

    def finish(self, digest: str, size: int) -> None:
        """The blob is committed as ``digest`` (``size`` bytes): keep what comes of it."""
        if self.active:
            self.active = False
            self._helper.send({"op": "end", "id": self._job, "size": size})
            self._stager._keep(digest, self._layer, self._work, self._hurry)

    def _hurry(self) -> None:
        self._helper.hurry(self._job)

    def cancel(self) -> None:
        if self.active:
            self.active = False
            self._helper.send({"op": "cancel", "id": self._job})
            self._stager._discard_when_done(self._layer, self._work)


def _result(doc: dict[str, Any]) -> ApplyResult:
    return ApplyResult(
        digest=str(doc["digest"]),
        size=int(doc["size"]),
        implied=tuple(doc["implied"]),
        relisted=frozenset(doc["relisted"]),
        whiteouts=frozenset(doc["whiteouts"]),
        opaques=frozenset(doc["opaques"]),
        markers_droppable=bool(doc["markers_droppable"]),
    )


class Stager:
    """Staging directories under ``root`` and the threads that fill them.

    Layers unpacked speculatively wait here by blob digest, the newest ``MAX_READY``
    for at most ``READY_TTL`` seconds, until :meth:`take` hands one to Diff.Apply.
    """

    MAX_SPECULATING = 4
    MAX_READY = 64  # an image of up to 64 layers written before any is applied
    READY_TTL = 600.0
    TAKE_TIMEOUT = 300.0  # an unpack still running this long is left to Diff.Apply
    MAX_RATIO = 100  # uncompressed bytes per blob byte a speculation may write...
    MIN_LIMIT = 1 << 30  # ...or this many

    def __init__(self, root: Path, *, speculate: bool = True) -> None:
        self.root = root
        self.speculative = speculate
        self._ids = itertools.count()
        self._pid = os.getpid()
        self._speculating = 0
        self._helper: _Helper | None = None
        self._helper_failed = False
        self._starting = asyncio.Lock()
        # By blob digest: when kept, the layer, its unpack's end, and how to hurry it.
        self._ready: dict[
            str, tuple[float, StagedLayer, asyncio.Future[None], Callable[[], None]]
        ] = {}

    def clean(self) -> None:
        """Remove what a previous run left (at start-up). Blocking."""
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _new(self) -> StagedLayer:
        return StagedLayer(self.root / f"{self._pid}-{next(self._ids)}")

    async def speculate(
        self, first: bytes, data_path: Path | None, total: int = 0, *, wanted: bool = False
    ) -> Speculation | None:
        """Start unpacking the ingest file ``data_path`` as it is written, if its first
        chunk ``first`` says it may be a layer and fewer than ``MAX_SPECULATING`` are
        under way (``wanted``: a pull that knows it is a layer: no limits). Unasked, it
        stops past ``MAX_RATIO`` times the blob's declared ``total`` (at least
        ``MIN_LIMIT``) of uncompressed bytes. None when not started."""
        if data_path is None or not (wanted or looks_like_layer(first)):
            return None
        if not wanted and (not self.speculative or self._speculating >= self.MAX_SPECULATING):
            return None
        helper = await self._live_helper()
        if helper is None:
            return None
        try:
            fd = os.open(data_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        layer = self._new()
        limit = 0 if wanted else max(self.MIN_LIMIT, self.MAX_RATIO * total)
        try:
            # A layer someone asked for is unpacked at the helper's normal priority.
            job, answer = helper.begin(layer.path, fd, limit, hurry=wanted)
        finally:
            os.close(fd)
        loop = asyncio.get_running_loop()
        work: asyncio.Future[None] = loop.create_future()
        self._speculating += 1

        def done(fut: asyncio.Future[dict[str, Any]]) -> None:
            self._speculating -= 1
            doc = fut.result()
            if "result" in doc:
                layer.result = _result(doc["result"])
            else:
                log.debug("speculative unpack of %s: %s", layer.path.name, doc.get("error"))
            work.set_result(None)

        answer.add_done_callback(done)
        return Speculation(self, helper, job, layer, work)

    async def _live_helper(self) -> _Helper | None:
        # One at a time: a pull's layers arrive together, and each would start a helper
        # of its own (all but the last kept alive by their jobs, then left running).
        async with self._starting:
            if self._helper is not None and self._helper.alive:
                return self._helper
            if self._helper_failed:
                return None
            loop = asyncio.get_running_loop()
            try:
                helper = await asyncio.to_thread(_Helper, loop)
            except OSError as exc:
                log.warning("speculative unpacker cannot start: %s", exc)
                self._helper_failed = True
                return None
            helper.attach()
            self._helper = helper
            return helper

    def _discard_when_done(self, layer: StagedLayer, work: asyncio.Future[None]) -> None:
        def later(_: object) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closing
                asyncio.get_running_loop().run_in_executor(None, layer.discard)

        work.add_done_callback(later)

    def _keep(
        self,
        digest: str,
        layer: StagedLayer,
        work: asyncio.Future[None],
        hurry: Callable[[], None],
    ) -> None:
        now = time.monotonic()
        stale = [d for d, entry in self._ready.items() if now - entry[0] > self.READY_TTL]
        stale += list(self._ready)[: max(0, len(self._ready) + 1 - self.MAX_READY)]
        if digest in self._ready:
            stale.append(digest)
        for d in dict.fromkeys(stale):
            _, old, old_work, _ = self._ready.pop(d)
            self._discard_when_done(old, old_work)
        self._ready[digest] = (now, layer, work, hurry)

    def staged(self, digest: str) -> bool:
        return digest in self._ready

    def drop(self, digest: str) -> None:
        """Forget the layer staged for ``digest`` (nobody will apply it)."""
        entry = self._ready.pop(digest, None)
        if entry is not None:
            self._discard_when_done(entry[1], entry[2])

    async def adopt(self, digest: str, mounts: Sequence[_MountLike]) -> ApplyResult | None:
        """Move the layer staged for blob ``digest`` into the fresh snapshot ``mounts``
        describe; its apply result, or None when there is none or it does not fit."""
        layer = await self.take(digest)
        if layer is None or layer.result is None:
            return None
        try:
            if await asyncio.to_thread(layer.adopt, mounts):
                return layer.result
        except BaseException:
            await asyncio.to_thread(layer.discard)
            raise
        log.debug("staged %s does not fit these mounts", digest)
        await asyncio.to_thread(layer.discard)
        return None

    async def take(self, digest: str) -> StagedLayer | None:
        """The layer unpacked on the side while blob ``digest`` was written, once its
        worker is done; None if there is none (or it failed: Diff.Apply then says why)."""
        entry = self._ready.pop(digest, None)
        if entry is None:
            return None
        _, layer, work, hurry = entry
        if not work.done():
            hurry()  # the unpack may have had idle CPU only so far
        try:
            await asyncio.wait_for(asyncio.shield(work), self.TAKE_TIMEOUT)
        except TimeoutError:
            self._discard_when_done(layer, work)
            return None
        except BaseException:
            self._discard_when_done(layer, work)
            raise
        if layer.result is None or time.monotonic() - entry[0] > self.READY_TTL:
            await asyncio.get_running_loop().run_in_executor(None, layer.discard)
            return None
        return layer

    async def close(self) -> None:
        """Stop the unpacker process (at daemon shutdown); staged layers stay on disk
        until the next start cleans them."""
        helper, self._helper = self._helper, None
        if helper is not None:
            await helper.stop()
