"""Container logs: a size-rotated JSON-lines file per container, its writer and its reader.

Format: Docker's ``json-file`` driver, one record per line,
``{"log": "hi\\n", "stream": "stdout", "time": "2024-01-02T03:04:05.123456789Z"}``; output
is split at newlines (and every 16 KiB without one). Bytes that are not UTF-8 survive the
round trip (``surrogateescape`` plus JSON's ``\\udcXX`` escapes). Files live in the
container's log directory: ``container.log`` and, after rotation, ``container.log.1`` …
``container.log.<max_files-1>`` (oldest highest); a file is rotated before a record
would take it past ``max_size``.

Who writes: a *detached logger process* (``python -m pycontainerd.cli.logs``) that pcd
starts for ``run -d``. It makes the container's stdout/stderr FIFOs in the log directory,
opens their read ends, says ``ready``, and copies records to the file until every FIFO
reaches EOF (the container exited and the shim closed its ends), then exits. It outlives
``pcd run -d`` (own session, stdio detached) and needs neither the daemon nor pcd: the
shim holds the FIFOs' write ends across daemon restarts. pcd writes ``go`` on the
logger's stdin once the task exists; an EOF before ``go`` (pcd failed or died) makes the
logger clean up and exit. The shim's ``file://`` stdio would need no process but cannot
rotate, which is why this takes a process. Attached runs write the same files from the
pcd process itself. ``logger.pid`` (pid and start time, against pid reuse) tells a
follower whether a writer is still alive.

This module imports only the standard library, so the logger process starts quickly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

__all__ = [
    "DEFAULT_MAX_FILES",
    "DEFAULT_MAX_SIZE",
    "LogWriter",
    "Logger",
    "Record",
    "follow_logs",
    "read_records",
    "spawn_logger",
    "write_pid_file",
]

LOG_NAME = "container.log"
PID_NAME = "logger.pid"
DEFAULT_MAX_SIZE = 10 << 20
DEFAULT_MAX_FILES = 3
_SPLIT = 16 << 10
_CHUNK = 64 << 10
_POLL_INTERVAL = 0.1


def _now() -> str:
    ns = time.time_ns()
    secs, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{frac:09d}Z"


@dataclass(frozen=True, slots=True)
class Record:
    stream: str
    data: bytes
    time: str


class LogWriter:
    """Appends records to ``<dir>/container.log``, rotating by size (blocking calls)."""

    def __init__(
        self,
        directory: Path,
        max_size: int = DEFAULT_MAX_SIZE,
        max_files: int = DEFAULT_MAX_FILES,
    ) -> None:
        self.dir = directory
        self.path = directory / LOG_NAME
        self.max_size = max(1, max_size)
        self.max_files = max(1, max_files)
        self._partial: dict[str, bytearray] = {}
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self._size = os.fstat(self._fd).st_size

    def write(self, stream: str, data: bytes) -> None:
        """Buffer ``data`` and emit every complete line (or 16 KiB run) as a record."""
        buf = self._partial.setdefault(stream, bytearray())
        buf += data
        while True:
            nl = buf.find(b"\n")
            if nl < 0 and len(buf) < _SPLIT:
                return
            end = nl + 1 if 0 <= nl < _SPLIT else _SPLIT
            self._emit(stream, bytes(buf[:end]))
            del buf[:end]

    def flush(self) -> None:
        """Emit what is left without a newline (at EOF)."""
        for stream, buf in self._partial.items():
            if buf:
                self._emit(stream, bytes(buf))
                buf.clear()

    def _emit(self, stream: str, data: bytes) -> None:
        doc = {"log": data.decode("utf-8", "surrogateescape"), "stream": stream, "time": _now()}
        line = (json.dumps(doc) + "\n").encode()
        if self._size and self._size + len(line) > self.max_size:
            self._rotate()
        view = memoryview(line)
        while view:
            view = view[os.write(self._fd, view) :]
        self._size += len(line)

    def _rotate(self) -> None:
        os.close(self._fd)
        if self.max_files == 1:
            os.truncate(self.path, 0)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self.path}.{self.max_files - 1}")
            for i in range(self.max_files - 2, 0, -1):
                with contextlib.suppress(FileNotFoundError):
                    os.rename(f"{self.path}.{i}", f"{self.path}.{i + 1}")
            os.rename(self.path, f"{self.path}.1")
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self._size = 0

    def close(self) -> None:
        self.flush()
        os.close(self._fd)


# ---------------------------------------------------------------------------- liveness


def _start_time(pid: int) -> str:
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    # Field 22 (starttime) counts from after the parenthesised command name.
    return stat.rsplit(b")", 1)[1].split()[19].decode()


def write_pid_file(directory: Path, pid: int | None = None) -> None:
    pid = pid or os.getpid()
    tmp = directory / f".{PID_NAME}.tmp"
    tmp.write_text(f"{pid} {_start_time(pid)}\n")
    os.replace(tmp, directory / PID_NAME)


def writer_alive(directory: Path) -> bool:
    """True while the process named in ``logger.pid`` (same start time) still runs."""
    try:
        pid_text, started = (directory / PID_NAME).read_text().split()
        return _start_time(int(pid_text)) == started
    except (OSError, ValueError, IndexError):
        return False


# ---------------------------------------------------------------------------- the logger


class Logger:
    """The detached logger process's main loop (see the module docstring)."""

    def __init__(self, directory: Path, streams: list[str], max_size: int, max_files: int) -> None:
        self.dir = directory
        self.streams = streams
        self.max_size = max_size
        self.max_files = max_files

    def run(self) -> int:
        fds: dict[int, str] = {}
        fifos = [self.dir / f"{s}.fifo" for s in self.streams]
        try:
            for stream, path in zip(self.streams, fifos, strict=True):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                os.mkfifo(path, 0o600)
                fds[os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)] = stream
            write_pid_file(self.dir)
            writer = LogWriter(self.dir, self.max_size, self.max_files)
            sys.stdout.write("ready\n")
            sys.stdout.flush()
            self._copy(fds, writer)
            writer.close()
            return 0
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            for path in (*fifos, self.dir / PID_NAME):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def _copy(self, fds: dict[int, str], writer: LogWriter) -> None:
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        control = sys.stdin.fileno()
        poller.register(control, select.POLLIN)
        started = False
        open_streams = set(fds)
        # A FIFO reports POLLHUP only after a writer came and went, never before the first
        # one: until the shim opens it, this simply waits.
        while open_streams:
            for fd, _events in poller.poll():
                if fd == control:
                    data = os.read(control, 64)
                    started = started or b"go" in data
                    if not data:
                        poller.unregister(control)
                        if not started:
                            return  # pcd gave up before the task existed
                    continue
                while True:
                    try:
                        chunk = os.read(fd, _CHUNK)
                    except BlockingIOError:
                        break
                    if not chunk:
                        poller.unregister(fd)
                        open_streams.discard(fd)
                        break
                    writer.write(fds[fd], chunk)


def _serve(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="pcd-logger")
    p.add_argument("--dir", required=True, type=Path)
    p.add_argument("--streams", default="stdout,stderr")
    p.add_argument("--max-size", type=int, default=DEFAULT_MAX_SIZE)
    p.add_argument("--max-files", type=int, default=DEFAULT_MAX_FILES)
    args = p.parse_args(argv)
    # A terminal's hang-up or ^C in the shell that ran `pcd run -d` must not stop the log.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    streams = [s for s in args.streams.split(",") if s]
    return Logger(args.dir, streams, args.max_size, args.max_files).run()


def spawn_logger(
    directory: Path,
    *,
    terminal: bool,
    max_size: int = DEFAULT_MAX_SIZE,
    max_files: int = DEFAULT_MAX_FILES,
) -> tuple[subprocess.Popen[bytes], str, str]:
    """Start the logger (blocking; call in a thread); (process, stdout FIFO, stderr FIFO).

    Returns once the FIFOs exist and are open for reading. Write ``b"go"`` to the
    process's stdin and close it when the task is created; just close it to abort.
    """
    directory.mkdir(parents=True, exist_ok=True)
    streams = ["stdout"] if terminal else ["stdout", "stderr"]
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    with open(directory / "logger.err", "ab") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pycontainerd.cli.logs", "--dir", str(directory),
             "--streams", ",".join(streams), "--max-size", str(max_size),
             "--max-files", str(max_files)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, cwd="/", env=env,
            start_new_session=True, close_fds=True,
        )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    proc.stdout.close()
    if line.strip() != b"ready":
        proc.kill()
        proc.wait()
        msg = (directory / "logger.err").read_text(errors="replace").strip().splitlines()
        raise RuntimeError(f"log writer did not start: {msg[-1] if msg else 'no output'}")
    out = str(directory / "stdout.fifo")
    err_path = "" if terminal else str(directory / "stderr.fifo")
    return proc, out, err_path


def release_logger(proc: subprocess.Popen[bytes], *, start: bool) -> None:
    """Tell the logger the task exists (``start``) or that it should give up; detach."""
    assert proc.stdin is not None
    with contextlib.suppress(BrokenPipeError):
        if start:
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
        proc.stdin.close()
    if not start:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
    # The logger outlives us; forget it so no "still running" warning fires at exit.
    proc.returncode = 0


# ---------------------------------------------------------------------------- reading


def log_files(directory: Path) -> list[Path]:
    """Existing log files, oldest first."""
    rotated = sorted(
        (p for p in directory.glob(LOG_NAME + ".*") if p.suffix[1:].isdigit()),
        key=lambda p: -int(p.suffix[1:]),
    )
    current = directory / LOG_NAME
    return [*rotated, *([current] if current.exists() else [])]


def _parse(line: bytes) -> Record | None:
    try:
        doc = json.loads(line)
        return Record(
            str(doc["stream"]), str(doc["log"]).encode("utf-8", "surrogateescape"), str(doc["time"])
        )
    except (ValueError, KeyError, TypeError):
        return None


def read_records(directory: Path) -> Iterator[Record]:
    """Every record in the directory's files, oldest first."""
    for path in log_files(directory):
        with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
            for line in f:
                if line.endswith(b"\n") and (rec := _parse(line)) is not None:
                    yield rec


class _Tail:
    """Reads complete lines from the current log file, reopening it after a rotation."""

    def __init__(self, path: Path, f: BinaryIO) -> None:
        self.path = path
        self.f = f
        self.buf = b""

    def read(self) -> list[Record]:
        out: list[Record] = []
        while True:
            chunk = self.f.read(_CHUNK)
            if chunk:
                self.buf += chunk
                *lines, self.buf = self.buf.split(b"\n")
                out += [r for ln in lines if (r := _parse(ln + b"\n")) is not None]
                continue
            try:
                rotated = os.stat(self.path).st_ino != os.fstat(self.f.fileno()).st_ino
            except FileNotFoundError:
                rotated = False
            if not rotated:
                return out
            self.f.close()
            self.f = open(self.path, "rb")  # noqa: SIM115 - kept open across calls
            self.buf = b""


async def follow_logs(
    directory: Path, emit: Callable[[Record], None], *, follow: bool, tail: int | None = None
) -> None:
    """Emit the records so far; with ``follow``, then new ones until the writer ends."""

    def initial() -> tuple[list[Record], _Tail]:
        # Open the current file before reading the rotated ones: a rotation meanwhile
        # then shows up as a new inode to the tail instead of losing records.
        path = directory / LOG_NAME
        t = _Tail(path, open(path, "rb"))  # noqa: SIM115 - closed below
        records: list[Record] = []
        for older in log_files(directory)[:-1]:
            with contextlib.suppress(FileNotFoundError), open(older, "rb") as f:
                records += [r for ln in f if (r := _parse(ln)) is not None]
        records += t.read()
        if tail is not None:
            records = records[-tail:] if tail > 0 else []
        return records, t

    records, t = await asyncio.to_thread(initial)
    try:
        for r in records:
            emit(r)
        while follow:
            alive = await asyncio.to_thread(writer_alive, directory)
            for r in await asyncio.to_thread(t.read):
                emit(r)
            if not alive:
                return  # checked before the last read: nothing can follow it
            await asyncio.sleep(_POLL_INTERVAL)
    finally:
        t.f.close()


if __name__ == "__main__":
    sys.exit(_serve(sys.argv[1:]))
