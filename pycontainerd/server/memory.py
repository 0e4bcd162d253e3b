"""The daemon's malloc settings.

A large request message goes through buffers of its size on the event loop: the message
joined from its frames, and, unless its servicer decodes it in place as Content.Write's
does (``grpc.content.decode_write_request``), protobuf's copy and the bytes of its
fields. With glibc's defaults each such buffer is either mapped and unmapped, or taken
from the heap's top and trimmed back to the system when freed. Either way every message
faulted its pages in again: ~30 000 page faults in the daemon per 200 MB ``ctr images
import``, measured when a 1 MiB WRITE still took all three buffers.

``tune_malloc`` keeps up to 128 MiB of freed memory for reuse and serves blocks of up to
32 MiB from the heap: ~200 faults per import. In interleaved imports (20 each) the
median fell from 1.80 to 1.57 s and the daemon's CPU from 1.42 to 1.21 s (before the
Write decoder; not measured again since). The price is
more resident memory after a burst: up to 128 MiB kept free per malloc arena. The big
buffers are the event loop's; the worker threads' arenas see little of this.

A ``MALLOC_*`` environment variable set for the daemon (glibc's own tunables) means
the user has chosen: then nothing is changed.
"""

from __future__ import annotations

import ctypes
import os

from pycontainerd.snapshots.mount import libc

__all__ = ["tune_malloc"]

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_SETTINGS = ((_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 128 << 20), (_M_TOP_PAD, 16 << 20))
_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")


def tune_malloc() -> bool:
    """Apply the settings above to this process; whether glibc took them all."""
    if any(name in os.environ for name in _ENV):
        return False
    try:
        mallopt = libc.mallopt
    except AttributeError:  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    took = True
    for param, value in _SETTINGS:  # every one, even after a refusal
        took = mallopt(param, value) == 1 and took
    return took
