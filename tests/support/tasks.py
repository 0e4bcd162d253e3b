"""Helpers for end-to-end task tests: runtimes to parametrize over, an imported busybox
image, a pty driver for ``ctr run -t``, a ``ctr events`` watcher, probes of what a task
leaves behind on the host (bundle dirs, mounts, shim processes), and a per-test namespace
whose leftovers are force-removed (tasks outlive the daemon, so a failed test would leak
running containers otherwise).

The runtimes are containerd's own shim (``io.containerd.runc.v2``) and ours
(``io.containerd.pyrunc.v1``); each is skipped with a reason when it is not installed,
so the suites run today with one and pick the other up as soon as it lands.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import importlib
import itertools
import json
import os
import queue
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.support.daemon import CTR, mounts_under, unmount_under
from tests.support.images import busybox_image, write_oci_archive

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from tests.support.daemon import Daemon

__all__ = [
    "IMAGE",
    "PYRUNC_V1",
    "RUNC_V2",
    "RUNTIMES",
    "Event",
    "EventWatcher",
    "bundle_dir",
    "force_cleanup",
    "import_busybox",
    "mounts_under",
    "parse_event_line",
    "pid_alive",
    "ppid_of",
    "run_in_pty",
    "scoped_namespace",
    "shim_pids",
    "task_rows",
    "unique_ns",
    "wait_until",
    "watching",
]

RUNC_V2 = "io.containerd.runc.v2"
PYRUNC_V1 = "io.containerd.pyrunc.v1"
RUNC_V2_SHIM = Path("/usr/bin/containerd-shim-runc-v2")
PYRUNC_SHIM = "containerd-shim-pyrunc-v1"
IMAGE = "example.com/tasks/busybox:1"
RUNTIME_DIR = "io.containerd.runtime.v2.task"


def _runc_v2_missing() -> str | None:
    if not RUNC_V2_SHIM.is_file():
        return f"{RUNC_V2_SHIM} is missing (apt install containerd)"
    if shutil.which("runc") is None:
        return "runc is not installed"
    return None


def _pyrunc_missing() -> str | None:
    try:
        shim = importlib.import_module("pycontainerd.shim")
    except Exception as exc:  # anything a half-written package raises on import
        return f"pycontainerd.shim cannot be imported yet: {exc!r}"
    # An empty directory imports as a namespace package: that is not a shim yet.
    if getattr(shim, "__file__", None) is None:
        return "pycontainerd.shim is not written yet (no package there)"
    local = Path(sys.executable).parent / PYRUNC_SHIM
    if shutil.which(PYRUNC_SHIM) is None and not os.access(local, os.X_OK):
        return f"{PYRUNC_SHIM} is neither on PATH nor next to {sys.executable}"
    if shutil.which("runc") is None:
        return "runc is not installed"
    return None


def _runtime_param(name: str, short: str, missing: str | None) -> Any:
    return pytest.param(
        name, id=short, marks=pytest.mark.skipif(missing is not None, reason=missing or "")
    )


# Use as `@pytest.mark.parametrize("runtime", RUNTIMES)`.
RUNTIMES = [
    _runtime_param(RUNC_V2, "runc.v2", _runc_v2_missing()),
    _runtime_param(PYRUNC_V1, "pyrunc.v1", _pyrunc_missing()),
]

# --------------------------------------------------------------------------- namespaces

_counter = itertools.count(1)


def unique_ns(prefix: str, runtime: str = "") -> str:
    """A fresh namespace name (valid for containerd) for one test."""
    tag = runtime.split(".")[-2] if runtime else ""
    parts = [re.sub(r"[^A-Za-z0-9]", "", p) for p in (prefix, tag)]
    return "-".join([*filter(None, parts), f"{os.getpid()}x{next(_counter)}"])


@cache
def _busybox_archive() -> Path:
    d = Path(tempfile.mkdtemp(prefix="pcd-bb-", dir="/tmp"))
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    path = d / "busybox.tar"
    write_oci_archive(path, {IMAGE: busybox_image()})
    return path


def import_busybox(daemon: Daemon, ns: str) -> str:
    """Import the busybox image (archive built once per session) into `ns`; its name."""
    daemon.ctr("images", "import", str(_busybox_archive()), namespace=ns)
    return IMAGE


# --------------------------------------------------------------------------- host probes


def bundle_dir(daemon: Daemon, ns: str, id_: str) -> Path:
    return daemon.state / RUNTIME_DIR / ns / id_


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return raw.decode(errors="replace").split("\0")


def _cwd(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/cwd").removesuffix(" (deleted)")
    except OSError:
        return ""


def shim_pids(daemon: Daemon, ns: str, id_: str | None = None) -> list[int]:
    """Live shims of task `ns/id_`, or of any task of `ns`: processes started with
    `-namespace ns -id id_`, or working in the task's bundle (a shim forked from a zygote
    has another command line, but every shim runs in its bundle)."""
    bundles = daemon.state / RUNTIME_DIR / ns
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        pairs = set(itertools.pairwise(_cmdline(pid)))
        by_args = ("-namespace", ns) in pairs and (id_ is None or ("-id", id_) in pairs)
        cwd = Path(_cwd(pid) or "/")
        by_cwd = cwd.parent == bundles and (id_ is None or cwd.name == id_)
        if (by_args or by_cwd) and pid_alive(pid):
            out.append(pid)
    return out


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces: split after its end.
    return raw[raw.rindex(")") + 2 :].split()


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def ppid_of(pid: int) -> int:
    fields = _stat_fields(pid)
    if fields is None:
        raise ProcessLookupError(pid)
    return int(fields[1])


def wait_until(pred: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Poll until `pred()` holds; fail naming `what` if it never does."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def task_rows(daemon: Daemon, ns: str) -> dict[str, tuple[int, str]]:
    """`ctr task ls` as {id: (pid, status)}."""
    out = daemon.ctr("task", "ls", namespace=ns).stdout
    rows = {}
    for line in out.splitlines()[1:]:
        cols = line.split()
        if len(cols) >= 3:
            rows[cols[0]] = (int(cols[1]), cols[2])
    return rows


# --------------------------------------------------------------------------- cleanup


def _cgroup_dirs(ns: str) -> list[Path]:
    """The cgroups runc made for the tasks of `ns` (ctr's cgroupsPath is `/<ns>/<id>`), on
    cgroup v1 (one per controller) or v2; deepest first."""
    root = Path("/sys/fs/cgroup")
    out = [*root.glob(f"*/{ns}/*"), *root.glob(f"{ns}/*"), *root.glob(f"*/{ns}"), root / ns]
    return [p for p in out if p.is_dir()]


def _kill_cgroups(ns: str) -> None:
    for d in _cgroup_dirs(ns):
        with contextlib.suppress(OSError):
            for pid in (d / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)


def force_cleanup(daemon: Daemon, ns: str) -> None:
    """Leave nothing of `ns`'s tasks on the host, whatever state a test stopped in.

    Tasks outlive the daemon by design, so a test that fails half-way would leak running
    containers, shims, mounts and cgroups. Through the daemon first (if it runs), then
    directly: kill what is in the namespace's cgroups and its shims, unmount the rootfs
    mounts and remove the (then empty) cgroups.
    """
    if daemon.proc is not None and daemon.proc.poll() is None:
        with contextlib.suppress(Exception):
            for id_ in task_rows(daemon, ns):
                daemon.ctr("task", "delete", "-f", id_, namespace=ns, check=False, timeout=20)
            for id_ in daemon.ctr("container", "ls", "-q", namespace=ns).stdout.split():
                daemon.ctr("container", "rm", id_, namespace=ns, check=False, timeout=20)
    _kill_cgroups(ns)
    for pid in shim_pids(daemon, ns):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    unmount_under(daemon.state / RUNTIME_DIR / ns)
    deadline = time.monotonic() + 5
    for d in _cgroup_dirs(ns):
        while True:
            try:
                d.rmdir()
                break
            except OSError:
                if time.monotonic() > deadline:
                    break
                _kill_cgroups(ns)  # processes may still be on their way out
                time.sleep(0.05)


@contextlib.contextmanager
def scoped_namespace(daemon: Daemon, prefix: str, runtime: str = "") -> Iterator[str]:
    """A fresh namespace for one test, force-cleaned afterwards (see `force_cleanup`)."""
    ns = unique_ns(prefix, runtime)
    try:
        yield ns
    finally:
        force_cleanup(daemon, ns)


# --------------------------------------------------------------------------- pty driver


def run_in_pty(
    argv: list[str], *, rows: int = 33, cols: int = 77, timeout: float = 60.0
) -> tuple[int, str]:
    """Run `argv` with a fresh pty (of the given size) as its stdin, stdout and stderr;
    return its exit code and everything it wrote to the terminal."""
    master, slave = os.openpty()
    try:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        proc = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, start_new_session=True
        )
    except BaseException:
        os.close(master)
        os.close(slave)
        raise
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{argv} did not finish within {timeout}s: {bytes(out)!r}")
            ready, _, _ = select.select([master], [], [], left)
            if not ready:
                continue
            try:
                chunk = os.read(master, 4096)
            except OSError as exc:
                # EIO: every holder of the slave side (ctr) has gone.
                if exc.errno != errno.EIO:
                    raise
                break
            if not chunk:
                break
            out += chunk
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return rc, out.decode(errors="replace")


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Event:
    namespace: str
    topic: str
    payload: dict[str, Any] = field(default_factory=dict)


def parse_event_line(line: str) -> Event | None:
    """One `ctr events` line: `<timestamp (4 words)> <namespace> <topic> <json>`."""
    tokens = line.rstrip("\n").split(" ")
    idx = next((i for i, t in enumerate(tokens) if i > 0 and t.startswith("/")), None)
    if idx is None:
        return None
    rest = " ".join(tokens[idx + 1 :]).strip()
    payload: dict[str, Any] = {}
    if rest:
        with contextlib.suppress(ValueError):
            payload = json.loads(rest)
    return Event(tokens[idx - 1], tokens[idx], payload)


class EventWatcher:
    """A `ctr events` subprocess filtered to one namespace, read by a thread.

    `sync()` publishes a marker event in the namespace until the watcher has seen it, so
    everything published before the call has been received (event order is kept per
    subscriber).
    """

    def __init__(self, daemon: Daemon, ns: str) -> None:
        if CTR is None:
            raise RuntimeError("ctr is not installed")
        self.daemon = daemon
        self.ns = ns
        self.events: list[Event] = []
        self._new: queue.Queue[Event | None] = queue.Queue()
        self._marks = itertools.count(1)
        self._proc = subprocess.Popen(
            [CTR, "-a", daemon.address, "events", f'namespace=="{ns}"'],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            ev = parse_event_line(line)
            if ev is not None:
                self._new.put(ev)
        self._new.put(None)

    def _pump(self, timeout: float) -> bool:
        """Move one received event into `events`; False on timeout or end of stream."""
        try:
            ev = self._new.get(timeout=timeout)
        except queue.Empty:
            return False
        if ev is None:
            raise AssertionError(f"ctr events ended (rc={self._proc.poll()}): {self.topics()}")
        self.events.append(ev)
        return True

    def wait_for(self, pred: Callable[[Event], bool], what: str, timeout: float = 30.0) -> Event:
        """The first received event (old or new) matching `pred`."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for ev in self.events[seen:]:
                if pred(ev):
                    return ev
            seen = len(self.events)
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no event {what} within {timeout}s; saw {self.topics()}")
            self._pump(min(left, 0.5))

    def wait_topic(self, topic: str, timeout: float = 30.0) -> Event:
        return self.wait_for(lambda e: e.topic == topic, topic, timeout)

    def sync(self, timeout: float = 30.0) -> None:
        """Return once a marker published now has come through (drops the markers)."""
        deadline = time.monotonic() + timeout
        while True:
            mark = f"m{next(self._marks)}"
            self.daemon.ctr(
                "namespaces", "label", self.ns, f"pcd-test-sync={mark}", namespace=self.ns
            )
            step = time.monotonic() + 1.0
            while time.monotonic() < min(step, deadline):
                if self._pump(0.1) and self._is_mark(self.events[-1], mark):
                    self.events = [e for e in self.events if e.topic != "/namespaces/update"]
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"ctr events never delivered a marker; saw {self.topics()}")

    @staticmethod
    def _is_mark(ev: Event, mark: str) -> bool:
        labels = ev.payload.get("labels") or ev.payload.get("Labels") or {}
        return ev.topic == "/namespaces/update" and labels.get("pcd-test-sync") == mark

    def topics(self, prefix: str = "/") -> list[str]:
        return [e.topic for e in self.events if e.topic.startswith(prefix)]

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._thread.join(5)

    def __enter__(self) -> EventWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def watching(daemon: Daemon, ns: str) -> Iterator[EventWatcher]:
    """An EventWatcher already subscribed (synced once) for `ns`."""
    with EventWatcher(daemon, ns) as w:
        w.sync()
        yield w
