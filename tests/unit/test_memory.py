"""The daemon's malloc settings: a freed 1 MiB buffer is reused without faulting its
pages in again (glibc's defaults fault them in for every message), and a user's own
``MALLOC_*`` setting is left alone."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pycontainerd.server.memory import tune_malloc

# In a fresh interpreter: page faults while 100 messages of 1 MiB go through three
# buffers of their size, as a large request without an in-place decoder does (joined
# message, protobuf's copy, a field's bytes).
_PROBE = """
import os, sys
from pycontainerd.server.memory import tune_malloc
tuned = tune_malloc() if sys.argv[1] == "tuned" else None
def faults():
    return int(open("/proc/self/stat").read().rpartition(")")[2].split()[7])
half = os.urandom(1 << 19)
before = faults()
for _ in range(100):
    message = b"".join([half, half])
    parsed = bytes(memoryview(message))
    data = bytes(memoryview(parsed))
    del message, parsed, data
print(tuned, faults() - before)
"""


def _probe(mode: str, env: dict[str, str] | None = None) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **(env or {})},
    ).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc")
def test_freed_buffers_are_reused_without_faults() -> None:
    _, plain = _probe("plain")
    took, tuned = _probe("tuned")
    assert took == "True"
    # 300 MiB of buffers is 76 800 pages: glibc's defaults fault most of them in again.
    assert plain > 20_000, f"the defaults took only {plain} faults: nothing to compare"
    assert tuned < plain // 20, (plain, tuned)


def test_a_users_malloc_setting_is_kept() -> None:
    took, _ = _probe("tuned", {"MALLOC_TRIM_THRESHOLD_": "1048576"})
    assert took == "False"


def test_tune_malloc_takes_on_glibc() -> None:
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"):
        if name in os.environ:
            pytest.skip(f"{name} is set for the test run")
    assert tune_malloc() is True
