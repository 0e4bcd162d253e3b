"""Container logs: the rotating writer and reader on real files, and ``pcd logs [-f]`` of
a detached container whose logger process outlives ``pcd run -d``."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import pytest

from pycontainerd.cli.logs import LOG_NAME, LogWriter, log_files, read_records
from tests.cli.conftest import IMAGE
from tests.support.tasks import pid_alive, wait_until

if TYPE_CHECKING:
    from pathlib import Path

    from tests.cli.conftest import Pcd


def test_writer_splits_lines_and_keeps_any_bytes(tmp_path: Path) -> None:
    w = LogWriter(tmp_path)
    w.write("stdout", b"one\ntw")
    w.write("stderr", b"\xff\xfe not utf-8\n")
    w.write("stdout", b"o\nno newline")
    w.close()
    records = list(read_records(tmp_path))
    assert [(r.stream, r.data) for r in records] == [
        ("stdout", b"one\n"),
        ("stderr", b"\xff\xfe not utf-8\n"),
        ("stdout", b"two\n"),
        ("stdout", b"no newline"),
    ]
    # Docker's json-file shape, one object per line.
    first = json.loads((tmp_path / LOG_NAME).read_text().splitlines()[0])
    assert set(first) == {"log", "stream", "time"} and first["time"].endswith("Z")


def test_writer_rotates_by_size_and_keeps_the_newest(tmp_path: Path) -> None:
    w = LogWriter(tmp_path, max_size=1000, max_files=3)
    for i in range(200):
        w.write("stdout", f"line {i:04d}\n".encode())
    w.close()
    files = log_files(tmp_path)
    assert [f.name for f in files] == [f"{LOG_NAME}.2", f"{LOG_NAME}.1", LOG_NAME]
    assert all(f.stat().st_size <= 1000 for f in files)
    lines = [r.data.decode() for r in read_records(tmp_path)]
    numbers = [int(s.split()[1]) for s in lines]
    assert numbers == list(range(numbers[0], 200))  # contiguous, newest kept
    assert numbers[0] > 0  # the oldest were rotated away


def test_one_long_line_is_split_into_records(tmp_path: Path) -> None:
    w = LogWriter(tmp_path)
    w.write("stdout", b"x" * 40_000 + b"\n")
    w.close()
    records = list(read_records(tmp_path))
    assert len(records) == 3 and b"".join(r.data for r in records) == b"x" * 40_000 + b"\n"


@pytest.mark.root
def test_logs_follow_a_detached_container(pcd: Pcd) -> None:
    script = "for i in 1 2 3 4 5 6; do echo line $i; sleep 0.3; done; echo bye >&2"
    cid = pcd.ok("run", "-d", "--name", "talker", IMAGE, "sh", "-c", script).strip()
    follower = pcd.popen("logs", "-f", "talker")
    out, err = follower.communicate(timeout=60)
    assert follower.returncode == 0, err
    # -f ended by itself once the container exited and its logger finished.
    assert out == "".join(f"line {i}\n" for i in range(1, 7))
    assert err == "bye\n"
    # After the exit: still readable, with timestamps and --tail.
    assert pcd.ok("logs", "talker").endswith("line 6\n")
    tail = pcd.ok("logs", "-n", "2", "-t", "talker").splitlines()
    assert len(tail) == 1 and tail[0].endswith(" line 6")  # the 2nd record went to stderr
    log_dir = pcd.data_root / "containers" / pcd.namespace / cid
    assert not (log_dir / "stdout.fifo").exists()  # the logger cleaned up and left
    pcd.ok("rm", "talker")
    assert not log_dir.exists()


@pytest.mark.root
def test_logger_outlives_pcd_and_rotates(pcd: Pcd) -> None:
    script = "i=0; while [ $i -lt 3000 ]; do echo record-$i; i=$((i+1)); done; sleep 60"
    cid = pcd.ok(
        "run", "-d", "--log-max-size", "20k", "--log-max-files", "2", IMAGE, "sh", "-c", script
    ).strip()
    log_dir = pcd.data_root / "containers" / pcd.namespace / cid
    pid = int((log_dir / "logger.pid").read_text().split()[0])
    assert pid_alive(pid) and os.getppid() != pid  # `pcd run -d` is gone; the logger is not
    wait_until(lambda: "record-2999" in pcd.ok("logs", cid), "the last record in the log")
    assert [f.name for f in log_files(log_dir)] == [f"{LOG_NAME}.1", LOG_NAME]
    lines = pcd.ok("logs", cid).split()
    assert lines[-1] == "record-2999" and lines[0] != "record-0"
    pcd.ok("rm", "-f", cid)
    wait_until(lambda: not pid_alive(pid), "the logger to exit after rm")
