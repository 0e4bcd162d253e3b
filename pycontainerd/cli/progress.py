"""Transfer progress for ``pull`` and ``push``: live bars on a terminal, plain lines elsewhere.

The SDK reports ``Progress`` steps per blob (``start``, ``bytes``, ``done``, ``exists``…).
On a terminal every blob gets a line with a bar, bytes done of total and the rate, redrawn
in place at most ten times a second; when stderr is a file or a pipe only the state
changes are printed, one line each, so logs stay readable.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

from pycontainerd.cli.tables import human_size

if TYPE_CHECKING:
    from pycontainerd.client import Progress

__all__ = ["ProgressDisplay"]

_BAR = 30
_REDRAW_EVERY = 0.1


@dataclass(slots=True)
class _Blob:
    digest: str
    total: int
    done: int = 0
    state: str = "Waiting"
    started: float = 0.0
    start_offset: int = 0
    finished: float = 0.0


class ProgressDisplay:
    """A callback for the SDK's ``progress=`` plus a final ``close()``."""

    def __init__(self, out: TextIO, *, verb: str = "Downloading", tty: bool | None = None) -> None:
        self.out = out
        self.verb = verb
        self.tty = out.isatty() if tty is None else tty
        self.blobs: dict[str, _Blob] = {}
        self._drawn = 0
        self._last = 0.0

    def __call__(self, p: Progress) -> None:
        if p.kind in ("resolved", "manifest", "unpacked"):
            if not self.tty:
                self.out.write(f"{p.kind} {p.digest}\n")
                self.out.flush()
            return
        blob = self.blobs.get(p.digest)
        if blob is None:
            blob = self.blobs[p.digest] = _Blob(p.digest, p.total)
        now = time.monotonic()
        changed = False
        if p.kind == "start":
            blob.state, blob.started, blob.start_offset, blob.done = (
                self.verb, now, p.offset, p.offset
            )  # fmt: skip
            changed = True
        elif p.kind == "bytes":
            blob.done = p.offset
            blob.total = p.total or blob.total
        elif p.kind in ("done", "exists"):
            blob.done = blob.total = p.total or blob.total
            blob.finished = now
            blob.state = "Already exists" if p.kind == "exists" else "Complete"
            changed = True
        if self.tty:
            if changed or now - self._last >= _REDRAW_EVERY:
                self._redraw(now)
        elif changed:
            self.out.write(f"{_short(blob.digest)}: {blob.state} {human_size(blob.total)}\n")
            self.out.flush()

    def _line(self, b: _Blob, now: float) -> str:
        head = f"{_short(b.digest)}: {b.state:<14}"
        if b.state != self.verb:
            return f"{head} {human_size(b.total)}"
        frac = b.done / b.total if b.total else 0.0
        filled = min(_BAR, int(frac * _BAR))
        bar = "=" * filled + (">" if filled < _BAR else "") + " " * max(0, _BAR - filled - 1)
        elapsed = max(now - b.started, 1e-6)
        rate = (b.done - b.start_offset) / elapsed
        return f"{head} [{bar}] {human_size(b.done)}/{human_size(b.total)} {human_size(rate)}/s"

    def _redraw(self, now: float) -> None:
        self._last = now
        parts = []
        if self._drawn:
            parts.append(f"\x1b[{self._drawn}A")  # back to the first line we drew
        for b in self.blobs.values():
            parts.append("\x1b[2K" + self._line(b, now) + "\n")
        self._drawn = len(self.blobs)
        self.out.write("".join(parts))
        self.out.flush()

    def close(self) -> None:
        if self.tty and self.blobs:
            self._redraw(time.monotonic())


def _short(digest: str) -> str:
    return digest.split(":", 1)[-1][:12]
