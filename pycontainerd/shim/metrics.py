"""Container metrics and OOM events from cgroups.

``to_metrics`` turns the statistics of ``runc events --stats`` (runc's JSON) into
containerd's ``io.containerd.cgroups.v1.Metrics`` on a cgroup v1 host, or
``io.containerd.cgroups.v2.Metrics`` on a unified (v2) host — the types ``Tasks/Metrics``
clients unpack. ``OOMWatcher`` signals OOM kills of a v1 memory cgroup through an eventfd
registered in ``cgroup.event_control`` (containerd's ``oom/v1``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import TYPE_CHECKING, Any

from pycontainerd.api.cgroups.v1 import metrics_pb2 as v1
from pycontainerd.api.cgroups.v2 import metrics_pb2 as v2

if TYPE_CHECKING:
    from collections.abc import Callable

    from google.protobuf.message import Message

__all__ = ["OOMWatcher", "cgroup_v2", "to_metrics"]

log = logging.getLogger(__name__)

CGROUP_ROOT = "/sys/fs/cgroup"

# v1 memory.stat keys whose proto field name differs from the key.
_V1_RENAMES = {
    "pgpgin": "pg_pg_in",
    "pgpgout": "pg_pg_out",
    "pgfault": "pg_fault",
    "pgmajfault": "pg_maj_fault",
    "hierarchical_memsw_limit": "hierarchical_swap_limit",
    "total_pgpgin": "total_pg_pg_in",
    "total_pgpgout": "total_pg_pg_out",
    "total_pgfault": "total_pg_fault",
    "total_pgmajfault": "total_pg_maj_fault",
}


def cgroup_v2() -> bool:
    """Whether the host runs the unified hierarchy only."""
    return os.path.exists(os.path.join(CGROUP_ROOT, "cgroup.controllers"))


def _entry(d: dict[str, Any] | None) -> v1.MemoryEntry:
    d = d or {}
    return v1.MemoryEntry(
        limit=int(d.get("limit", 0)),
        usage=int(d.get("usage", 0)),
        max=int(d.get("max", 0)),
        failcnt=int(d.get("failcnt", 0)),
    )


def _blkio(entries: list[dict[str, Any]] | None) -> list[v1.BlkIOEntry]:
    return [
        v1.BlkIOEntry(
            op=str(e.get("op", "")),
            major=int(e.get("major", 0)),
            minor=int(e.get("minor", 0)),
            value=int(e.get("value", 0)),
        )
        for e in entries or []
    ]


def _v1_metrics(stats: dict[str, Any]) -> v1.Metrics:
    m = v1.Metrics()
    pids = stats.get("pids") or {}
    m.pids.current = int(pids.get("current", 0))
    m.pids.limit = int(pids.get("limit", 0))
    cpu = stats.get("cpu") or {}
    usage = cpu.get("usage") or {}
    m.cpu.usage.total = int(usage.get("total", 0))
    m.cpu.usage.kernel = int(usage.get("kernel", 0))
    m.cpu.usage.user = int(usage.get("user", 0))
    m.cpu.usage.per_cpu.extend(int(x) for x in usage.get("percpu") or [])
    thr = cpu.get("throttling") or {}
    m.cpu.throttling.periods = int(thr.get("periods", 0))
    m.cpu.throttling.throttled_periods = int(thr.get("throttledPeriods", 0))
    m.cpu.throttling.throttled_time = int(thr.get("throttledTime", 0))
    mem = stats.get("memory") or {}
    fields = set(v1.MemoryStat.DESCRIPTOR.fields_by_name)
    for key, value in (mem.get("raw") or {}).items():
        name = _V1_RENAMES.get(key, key)
        if name in fields and name not in ("usage", "swap", "kernel", "kernel_tcp"):
            setattr(m.memory, name, int(value))
    if "cache" in mem:
        m.memory.cache = int(mem["cache"])
    m.memory.usage.CopyFrom(_entry(mem.get("usage")))
    m.memory.swap.CopyFrom(_entry(mem.get("swap")))
    m.memory.kernel.CopyFrom(_entry(mem.get("kernel")))
    m.memory.kernel_tcp.CopyFrom(_entry(mem.get("kernelTCP")))
    blk = stats.get("blkio") or {}
    for src, dst in (
        ("ioServiceBytesRecursive", m.blkio.io_service_bytes_recursive),
        ("ioServicedRecursive", m.blkio.io_serviced_recursive),
        ("ioQueueRecursive", m.blkio.io_queued_recursive),
        ("ioServiceTimeRecursive", m.blkio.io_service_time_recursive),
        ("ioWaitTimeRecursive", m.blkio.io_wait_time_recursive),
        ("ioMergedRecursive", m.blkio.io_merged_recursive),
        ("ioTimeRecursive", m.blkio.io_time_recursive),
        ("sectorsRecursive", m.blkio.sectors_recursive),
    ):
        dst.extend(_blkio(blk.get(src)))
    for pagesize, h in sorted((stats.get("hugetlb") or {}).items()):
        m.hugetlb.append(
            v1.HugetlbStat(
                pagesize=pagesize,
                usage=int(h.get("usage", 0)),
                max=int(h.get("max", 0)),
                failcnt=int(h.get("failcnt", 0)),
            )
        )
    return m


def _v2_metrics(stats: dict[str, Any]) -> v2.Metrics:
    m = v2.Metrics()
    pids = stats.get("pids") or {}
    m.pids.current = int(pids.get("current", 0))
    m.pids.limit = int(pids.get("limit", 0))
    cpu = stats.get("cpu") or {}
    usage = cpu.get("usage") or {}
    # runc reports nanoseconds; the v2 proto carries microseconds.
    m.cpu.usage_usec = int(usage.get("total", 0)) // 1000
    m.cpu.user_usec = int(usage.get("user", 0)) // 1000
    m.cpu.system_usec = int(usage.get("kernel", 0)) // 1000
    thr = cpu.get("throttling") or {}
    m.cpu.nr_periods = int(thr.get("periods", 0))
    m.cpu.nr_throttled = int(thr.get("throttledPeriods", 0))
    m.cpu.throttled_usec = int(thr.get("throttledTime", 0)) // 1000
    mem = stats.get("memory") or {}
    fields = set(v2.MemoryStat.DESCRIPTOR.fields_by_name)
    for key, value in (mem.get("raw") or {}).items():
        if key in fields:
            setattr(m.memory, key, int(value))
    usage_e = mem.get("usage") or {}
    m.memory.usage = int(usage_e.get("usage", 0))
    m.memory.usage_limit = int(usage_e.get("limit", 0))
    swap = mem.get("swap") or {}
    m.memory.swap_usage = int(swap.get("usage", 0))
    m.memory.swap_limit = int(swap.get("limit", 0))
    return m


def to_metrics(stats: dict[str, Any], unified: bool | None = None) -> Message:
    """The containerd metrics message for runc's stats on this host's cgroup version."""
    if unified is None:
        unified = cgroup_v2()
    return _v2_metrics(stats) if unified else _v1_metrics(stats)


def memory_cgroup(pid: int) -> str | None:
    """The v1 memory cgroup directory of ``pid`` (None on v2 or when it is gone)."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _id, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return os.path.join(CGROUP_ROOT, "memory", path.lstrip("/"))
    return None


class OOMWatcher:
    """Calls ``on_oom`` for each OOM notification of a v1 memory cgroup."""

    def __init__(self, cgroup_dir: str, on_oom: Callable[[], None]) -> None:
        self._dir = cgroup_dir
        self._on_oom = on_oom
        self._efd = -1
        self._ctl = -1

    def register(self) -> None:
        """Arm the eventfd (sync: call from a worker thread)."""
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            ctl = os.open(os.path.join(self._dir, "memory.oom_control"), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            os.close(efd)
            raise
        try:
            with open(os.path.join(self._dir, "cgroup.event_control"), "w") as f:
                f.write(f"{efd} {ctl}")
        except OSError:
            os.close(efd)
            os.close(ctl)
            raise
        self._efd, self._ctl = efd, ctl

    def start(self) -> None:
        asyncio.get_running_loop().add_reader(self._efd, self._readable)

    def _readable(self) -> None:
        try:
            os.eventfd_read(self._efd)
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        # The eventfd also fires when the cgroup is removed: that is no OOM.
        if not os.path.exists(os.path.join(self._dir, "memory.oom_control")):
            self.close()
            return
        self._on_oom()

    def close(self) -> None:
        if self._efd >= 0:
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().remove_reader(self._efd)
            os.close(self._efd)
            self._efd = -1
        if self._ctl >= 0:
            os.close(self._ctl)
            self._ctl = -1
