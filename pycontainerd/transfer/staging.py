"""Layers unpacked while they download, then moved into their snapshot.

A client-driven pull (containerd's way) first stores every blob, then unpacks the layers
one after the other, each onto its parent's snapshot: the unpack cannot start before the
last byte arrives, and the blob is read back from disk. The daemon's own pull instead
feeds each layer's bytes, as they come from the registry, to one worker thread that
both appends them to the content ingest (hashing them) and unpacks them into a *staging*
directory of their own. All layers download and unpack at once.

A layer unpacked before its parent exists cannot look at its lower layers, and needs
them only in two places, which the staging deals with:

- the parent directories a layer implies without entries of its own take their owner,
  mode and xattrs from the same directory below (containerd's ``WithParents``): the apply
  lists them (``defer_parents``) and :meth:`StagedLayer.adopt` copies the attributes once
  the lower layers are known;
- whiteouts: the first layer is unpacked the way a bind mount is (whiteouts delete, as
  there is nothing below), every other layer in overlay form (whiteouts become overlay
  char devices and opaque xattrs, independent of what is below).

Hardlinks resolve inside the layer itself, as in containerd's overlay applier.

At unpack time, :meth:`StagedLayer.adopt` checks the fresh snapshot's mounts are what the
staging assumed (a bind mount of an empty directory for the first layer, an overlay
whose upperdir is empty for the others, on the same filesystem) and renames the staging
directory into place. Anything else — another snapshotter, an extraction that failed, a
resumed download — leaves the layer to Diff.Apply from the stored blob, which also gives
a bad layer its usual error. Blocking parts run in the stager's own threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import queue
import shutil
import stat
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from pycontainerd.archive import (
    ApplyResult,
    ArchiveCanceled,
    apply_layer,
    copy_implied_parents,
    decompress_stream,
)

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Callable, Sequence
    from pathlib import Path

    from pycontainerd.api.types import mount_pb2

__all__ = ["Feed", "StagedLayer", "Stager"]

log = logging.getLogger(__name__)

# Chunks a download may run ahead of its worker thread (about 1 MiB each).
FEED_WINDOW = 8


class _Canceled:
    """Put in a feed when the download stops before its end."""


class Feed:
    """Chunks from the event loop to one worker thread, at most ``window`` in flight."""

    def __init__(self, loop: asyncio.AbstractEventLoop, window: int = FEED_WINDOW) -> None:
        self._loop = loop
        self._q: queue.SimpleQueue[bytes | _Canceled | None] = queue.SimpleQueue()
        self._credits = asyncio.Semaphore(window)
        self._window = window
        self.closed = False  # the worker stopped taking chunks

    async def put(self, chunk: bytes) -> None:
        """Hand over ``chunk``, waiting while the worker is ``window`` chunks behind."""
        await self._credits.acquire()
        if self.closed:
            raise EOFError("the layer's worker stopped")
        self._q.put(chunk)

    def end(self) -> None:
        self._q.put(None)

    def cancel(self) -> None:
        self._q.put(_Canceled())

    def get(self) -> bytes | None:
        """The next chunk, None at the end; ArchiveCanceled if the download stopped."""
        item = self._q.get()
        if isinstance(item, _Canceled):
            self._q.put(item)  # every later get() sees it too
            raise ArchiveCanceled("download stopped")
        if item is not None:
            self._loop.call_soon_threadsafe(self._credits.release)
        return item

    def close(self) -> None:
        """Worker side, when it stops early: wake a waiting ``put`` so it sees it."""
        self.closed = True
        for _ in range(self._window + 1):
            self._loop.call_soon_threadsafe(self._credits.release)


class _TeeSource:
    """What the decompressor reads: the feed's chunks, each appended to the ingest first."""

    def __init__(self, feed: Feed, sink: Callable[[bytes], None]) -> None:
        self._feed = feed
        self._sink = sink
        self._buf = memoryview(b"")
        self._eof = False

    def _next(self) -> bool:
        if self._eof:
            return False
        chunk = self._feed.get()
        if chunk is None:
            self._eof = True
            return False
        self._sink(chunk)
        self._buf = memoryview(chunk)
        return True

    def read(self, n: int = -1, /) -> bytes:
        if not self._buf and not self._next():
            return b""
        if n < 0 or n >= len(self._buf):
            out, self._buf = self._buf, memoryview(b"")
        else:
            out, self._buf = self._buf[:n], self._buf[n:]
        return bytes(out)

    def drain(self) -> None:
        """The rest of the blob goes to the ingest (the unpack may stop short of it)."""
        self._buf = memoryview(b"")
        while self._next():
            pass


class StagedLayer:
    """One layer's staging directory and the outcome of unpacking it there."""

    def __init__(self, path: Path, overlay: bool) -> None:
        self.path = path
        self.overlay = overlay  # unpacked in overlay form (every layer but the first)
        self.result: ApplyResult | None = None
        self.error: BaseException | None = None

    def run(self, feed: Feed, sink: Callable[[bytes], None], unpack: bool) -> None:
        """Worker thread: append every chunk to the ingest, unpacking as it goes.

        An unpack failure is kept (the layer is then left to Diff.Apply, which reports
        it) and the download goes on; a failure to append ends it.
        """
        src = _TeeSource(feed, sink)
        try:
            if unpack:
                try:
                    self.path.mkdir(mode=0o755)
                    stream = decompress_stream(src)
                    self.result = apply_layer(
                        self.path, stream, overlay=self.overlay, defer_parents=self.overlay
                    )
                except ArchiveCanceled:
                    raise
                except Exception as exc:  # a bad layer: Diff.Apply reports it later
                    self.error = exc
                    log.debug("staging %s failed: %s", self.path.name, exc)
            src.drain()
        finally:
            feed.close()

    def adopt(self, mounts: Sequence[mount_pb2.Mount]) -> bool:
        """Move the unpacked layer into the fresh snapshot ``mounts`` describe; False
        (nothing changed) when they are not what the staging assumed. Blocking."""
        if self.result is None or not self.path.is_dir():
            return False
        target, lowers = _target(mounts, self.overlay)
        if target is None:
            return False
        try:
            st = os.lstat(target)
            staged = os.lstat(self.path)
            if not stat.S_ISDIR(st.st_mode) or st.st_dev != staged.st_dev or os.listdir(target):
                return False
        except OSError:
            return False
        # The snapshot's own root directory keeps its owner and mode, as when unpacked into it.
        os.chown(self.path, st.st_uid, st.st_gid)
        os.chmod(self.path, stat.S_IMODE(st.st_mode))
        if self.result.implied:
            copy_implied_parents(self.path, self.result.implied, lowers, self.result.relisted)
        os.rmdir(target)
        os.rename(self.path, target)
        return True

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _option(options: Sequence[str], key: str) -> str | None:
    prefix = key + "="
    for o in options:
        if o.startswith(prefix):
            return o[len(prefix) :]
    return None


def _target(mounts: Sequence[mount_pb2.Mount], overlay: bool) -> tuple[str | None, list[str]]:
    """The directory a layer staged in this form goes to under ``mounts``, and its lowers."""
    if len(mounts) != 1:
        return None, []
    m = mounts[0]
    if not overlay and m.type == "bind" and "ro" not in m.options:
        return m.source, []
    if overlay and m.type == "overlay":
        upper = _option(m.options, "upperdir")
        lower = _option(m.options, "lowerdir")
        if upper:
            return upper, lower.split(":") if lower else []
    return None, []


class Stager:
    """Staging directories under ``root`` and the threads that fill them."""

    def __init__(self, root: Path, workers: int = 8) -> None:
        self.root = root
        self._pool: ThreadPoolExecutor | None = None
        self._workers = workers
        self._ids = itertools.count()
        self._pid = os.getpid()

    def clean(self) -> None:
        """Remove what a previous run left (at start-up). Blocking."""
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def new(self, digest: str, overlay: bool) -> StagedLayer:
        name = f"{self._pid}-{next(self._ids)}-{digest.rsplit(':', 1)[-1][:12]}"
        return StagedLayer(self.root / name, overlay)

    async def stream(
        self,
        layer: StagedLayer,
        chunks: AsyncGenerator[bytes, None],
        sink: Callable[[bytes], None],
        unpack: bool,
    ) -> None:
        """Run ``layer.run`` on a stager thread while ``chunks`` feeds it; raises the
        download's or the ingest's failure."""
        loop = asyncio.get_running_loop()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="stage")
        feed = Feed(loop)
        work = loop.run_in_executor(self._pool, layer.run, feed, sink, unpack)
        try:
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    try:
                        await feed.put(chunk)
                    except EOFError:
                        break  # the worker failed: its error is raised below
            feed.end()
        except BaseException:
            feed.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.shield(work)
            raise
        await work

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
