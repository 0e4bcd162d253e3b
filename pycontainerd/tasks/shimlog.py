"""The shim log pipe: a FIFO named ``log`` in the bundle, read by the daemon.

A runtime v2 shim opens ``log`` for writing as soon as it serves (containerd's shims
block on that open until a reader exists), so the daemon creates the FIFO and opens it
before starting the shim, then copies what arrives into its own log. After a restart
the daemon opens it again for the shims it reconnects to.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

log = logging.getLogger("pycontainerd.shim")


class ShimLog:
    def __init__(self, path: Path, task: str) -> None:
        self._task = task
        self._buf = b""
        if not path.exists():
            os.mkfifo(path, 0o700)
        elif not stat.S_ISFIFO(path.lstat().st_mode):
            raise OSError(f"{path} is not a FIFO")
        # O_RDWR: the open never blocks, and the pipe never reports EOF between writers.
        self._fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._fd, self._read)

    def _read(self) -> None:
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            if line.strip():
                log.debug("[%s] %s", self._task, line.decode(errors="replace"))

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1
