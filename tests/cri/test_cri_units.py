"""Pieces of the CRI plugin without a daemon: log records, the log writer process,
oom_score_adj policy, capability sets, name reservation."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import pytest

from pycontainerd.api.cri.runtime.v1 import api_pb2
from pycontainerd.client.spec import ALL_CAPS
from pycontainerd.cri.logwriter import LineSplitter, rfc3339nano
from pycontainerd.cri.spec import OomPolicy, _capabilities, image_argv
from pycontainerd.cri.store import NameIndex, NameReserved
from pycontainerd.errdefs import FailedPrecondition, InvalidArgument

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path


def test_line_splitter_full_partial_and_eof() -> None:
    s = LineSplitter(max_line=4)
    assert s.feed(b"ab\r\ncdefgh\nxy") == [("F", b"ab"), ("P", b"cdef"), ("F", b"gh")]
    assert s.feed(b"z") == []
    assert s.close() == [("P", b"xyz")]
    assert s.close() == []


def test_rfc3339nano_like_go() -> None:
    assert rfc3339nano(1_700_000_000_123_000_000) == "2023-11-14T22:13:20.123Z"
    assert rfc3339nano(1_700_000_000_000_000_000) == "2023-11-14T22:13:20Z"


def test_oom_policy() -> None:
    strict = OomPolicy(own=0, restrict=False, can_lower=False)
    with pytest.raises(FailedPrecondition, match="restrict_oom_score_adj"):
        strict.apply(-998)
    assert strict.apply(100) == 100
    assert OomPolicy(own=-100, restrict=True, can_lower=False).apply(-998) == -100
    assert OomPolicy(own=0, restrict=False, can_lower=True).apply(-998) == -998


def test_capabilities() -> None:
    caps = api_pb2.Capability(drop_capabilities=["ALL"], add_capabilities=["net_admin"])
    assert _capabilities(caps) == ["CAP_NET_ADMIN"]
    assert _capabilities(api_pb2.Capability(add_capabilities=["ALL"])) == list(ALL_CAPS)
    assert "CAP_KILL" not in _capabilities(api_pb2.Capability(drop_capabilities=["KILL"]))
    with pytest.raises(InvalidArgument):
        _capabilities(api_pb2.Capability(add_capabilities=["NOPE"]))


def test_command_and_args_rules() -> None:
    img = {"Entrypoint": ["/ep"], "Cmd": ["c1"]}
    assert image_argv([], [], img) == ["/ep", "c1"]
    assert image_argv([], ["a"], img) == ["/ep", "a"]
    assert image_argv(["/x"], [], img) == ["/x"]
    assert image_argv(["/x"], ["a"], img) == ["/x", "a"]


def test_name_index() -> None:
    idx = NameIndex()
    idx.reserve("n", "a")
    idx.reserve("n", "a")
    with pytest.raises(NameReserved, match="is reserved for 'a'"):
        idx.reserve("n", "b")
    idx.release("n", "b")  # not the owner: no effect
    with pytest.raises(NameReserved):
        idx.reserve("n", "b")
    idx.release("n", "a")
    idx.reserve("n", "b")


def _wait(cond: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + 20
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_log_writer_process(tmp_path: Path) -> None:
    out, err = tmp_path / "out", tmp_path / "err"
    os.mkfifo(out)
    os.mkfifo(err)
    log = tmp_path / "pod" / "c.log"
    fds = [os.open(p, os.O_RDONLY | os.O_NONBLOCK) for p in (out, err)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pycontainerd.cri.logwriter", str(log), "8", *map(str, fds)],
        pass_fds=fds,
    )
    for fd in fds:
        os.close(fd)
    w_out = os.open(out, os.O_WRONLY)
    w_err = os.open(err, os.O_WRONLY)
    os.write(w_out, b"hello\n0123456789\n")
    os.write(w_err, b"oops\n")
    os.close(w_err)
    # Rotation: kubelet renames the file and asks for a new one.
    rotated = tmp_path / "pod" / "c.log.1"
    assert _wait(
        lambda: (
            log.exists()
            and b"stderr F oops" in log.read_bytes()
            and b"stdout F 89" in log.read_bytes()
        )
    )
    log.rename(rotated)
    proc.send_signal(signal.SIGUSR1)
    assert _wait(log.exists)
    os.write(w_out, b"after\nno newline")
    os.close(w_out)
    assert proc.wait(30) == 0
    first = [line.split(b" ", 1)[1] for line in rotated.read_bytes().splitlines()]
    assert sorted(first) == sorted(
        [b"stdout F hello", b"stdout P 01234567", b"stdout F 89", b"stderr F oops"]
    )
    second = [line.split(b" ", 1)[1] for line in log.read_bytes().splitlines()]
    assert second == [b"stdout F after", b"stdout P no newli", b"stdout P ne"]
