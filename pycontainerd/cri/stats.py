"""CRI stats and metrics: ContainerStats, ListContainerStats, PodSandboxStats,
ListPodSandboxStats, ListMetricDescriptors and ListPodSandboxMetrics.

CPU and memory come from the tasks' cgroup metrics (``Tasks.Metrics``, cgroups v1 or v2
``Metrics`` as the shim reports them), fetched in one call for all the tasks asked
about. The working set is usage minus inactive file pages, as cAdvisor and containerd
compute it; ``usage_nano_cores`` is the rate between this sample and the previous one
kept per id (absent on the first sample). The writable layer is the snapshotter's usage of
the container's snapshot. A pod's CPU and memory are the sums over its sandbox task and
its containers' tasks (the pod cgroup itself is not read), its network counters come from
``/proc/<sandbox pid>/net/dev``, which shows the pod's network namespace.

The metrics (kubelet's PodAndContainerStatsFromCRI) are the same figures under cAdvisor's
names, as CRI-O reports them: a fixed set of descriptors, label keys ``id``, ``name``,
``image`` (plus ``cpu``="total" or ``interface``), and per running container its CPU
(whole seconds: the value is an integer), memory, memory limit (0: none), threads and
start time; per pod its network counters, labelled with the pod's id, name and the
sandbox image.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pycontainerd import typeurl
from pycontainerd.api.cgroups.v1 import metrics_pb2 as v1
from pycontainerd.api.cgroups.v2 import metrics_pb2 as v2
from pycontainerd.api.cri.runtime.v1 import api_pb2
from pycontainerd.api.services.snapshots.v1 import snapshots_pb2
from pycontainerd.api.services.tasks.v1 import tasks_pb2
from pycontainerd.errdefs import NotFound, PycdError

if TYPE_CHECKING:
    from pathlib import Path

    from pycontainerd.cri.runtime import CRIContainer, CRIRuntime, Sandbox

__all__ = [
    "METRIC_DESCRIPTORS",
    "Sample",
    "StatsService",
    "net_counters",
    "parse_net_dev",
    "sample_of",
]

# A v1 cgroup without a memory limit reports this (or near it): no available_bytes then.
_UNLIMITED = 1 << 62
_SECOND = 1_000_000_000
COUNTER = api_pb2.COUNTER
GAUGE = api_pb2.GAUGE
BASE_LABELS = ("id", "name", "image")

# name, help, type, label keys beyond BASE_LABELS. Static for the daemon's life: kubelet
# reads them once and drops metrics it has no descriptor for.
_CONTAINER_METRICS: tuple[tuple[str, str, api_pb2.MetricType.ValueType, tuple[str, ...]], ...] = (
    ("container_cpu_usage_seconds_total", "Cumulative cpu time consumed in seconds.",
     COUNTER, ("cpu",)),
    ("container_cpu_user_seconds_total", "Cumulative user cpu time consumed in seconds.",
     COUNTER, ()),
    ("container_cpu_system_seconds_total", "Cumulative system cpu time consumed in seconds.",
     COUNTER, ()),
    ("container_memory_usage_bytes",
     "Current memory usage in bytes, including all memory regardless of when it was accessed",
     GAUGE, ()),
    ("container_memory_working_set_bytes", "Current working set in bytes.", GAUGE, ()),
    ("container_memory_rss", "Size of RSS in bytes.", GAUGE, ()),
    ("container_spec_memory_limit_bytes", "Memory limit for the container.", GAUGE, ()),
    ("container_threads", "Number of threads running inside the container", GAUGE, ()),
    ("container_start_time_seconds", "Start time of the container since unix epoch in seconds.",
     GAUGE, ()),
)  # fmt: skip
# /proc/net/dev column, metric name, help.
_NETWORK_METRICS: tuple[tuple[int, str, str], ...] = (
    (0, "container_network_receive_bytes_total", "Cumulative count of bytes received"),
    (1, "container_network_receive_packets_total", "Cumulative count of packets received"),
    (2, "container_network_receive_errors_total",
     "Cumulative count of errors encountered while receiving"),
    (3, "container_network_receive_packets_dropped_total",
     "Cumulative count of packets dropped while receiving"),
    (8, "container_network_transmit_bytes_total", "Cumulative count of bytes transmitted"),
    (9, "container_network_transmit_packets_total", "Cumulative count of packets transmitted"),
    (10, "container_network_transmit_errors_total",
     "Cumulative count of errors encountered while transmitting"),
    (11, "container_network_transmit_packets_dropped_total",
     "Cumulative count of packets dropped while transmitting"),
)  # fmt: skip
METRIC_DESCRIPTORS: tuple[api_pb2.MetricDescriptor, ...] = (
    *(
        api_pb2.MetricDescriptor(name=n, help=h, label_keys=[*BASE_LABELS, *extra])
        for n, h, _, extra in _CONTAINER_METRICS
    ),
    *(
        api_pb2.MetricDescriptor(name=n, help=h, label_keys=[*BASE_LABELS, "interface"])
        for _, n, h in _NETWORK_METRICS
    ),
)


def container_metrics(s: Sample, labels: list[str], started_at: int) -> list[api_pb2.Metric]:
    """cAdvisor's figures for one container's sample; ``labels``: id, name, image."""
    limit = s.limit if 0 < s.limit < _UNLIMITED else 0
    values = (
        s.cpu_ns // _SECOND, s.cpu_user_ns // _SECOND, s.cpu_system_ns // _SECOND,
        s.memory_usage, s.working_set, s.rss, limit, s.processes, started_at // _SECOND,
    )  # fmt: skip
    return [
        api_pb2.Metric(
            name=name,
            timestamp=s.timestamp,
            metric_type=kind,
            label_values=[*labels, *(["total"] if extra else [])],
            value=_u64(v),
        )
        for (name, _, kind, extra), v in zip(_CONTAINER_METRICS, values, strict=True)
    ]


def network_metrics(
    counters: dict[str, list[int]], labels: list[str], timestamp: int
) -> list[api_pb2.Metric]:
    """The pod's network counters, one metric per interface and counter."""
    return [
        api_pb2.Metric(
            name=name,
            timestamp=timestamp,
            metric_type=COUNTER,
            label_values=[*labels, iface],
            value=_u64(f[col]),
        )
        for iface, f in sorted(counters.items())
        for col, name, _ in _NETWORK_METRICS
    ]


@dataclass(frozen=True, slots=True)
class Sample:
    """One task's figures at ``timestamp`` (ns since the epoch)."""

    timestamp: int
    cpu_ns: int
    memory_usage: int
    working_set: int
    rss: int
    page_faults: int
    major_page_faults: int
    limit: int
    processes: int
    cpu_user_ns: int = 0
    cpu_system_ns: int = 0


def sample_of(data: object, timestamp: int) -> Sample | None:
    """A Sample from an unpacked cgroups v1 or v2 ``Metrics``; None for other types."""
    if isinstance(data, v1.Metrics):
        m = data.memory
        usage = m.usage.usage
        return Sample(
            timestamp, data.cpu.usage.total, usage, max(usage - m.total_inactive_file, 0),
            m.total_rss, m.total_pg_fault, m.total_pg_maj_fault, m.usage.limit,
            data.pids.current, data.cpu.usage.user, data.cpu.usage.kernel,
        )  # fmt: skip
    if isinstance(data, v2.Metrics):
        m2 = data.memory
        return Sample(
            timestamp, data.cpu.usage_usec * 1000, m2.usage,
            max(m2.usage - m2.inactive_file, 0), m2.anon, m2.pgfault, m2.pgmajfault,
            m2.usage_limit, data.pids.current, data.cpu.user_usec * 1000,
            data.cpu.system_usec * 1000,
        )  # fmt: skip
    return None


def net_counters(text: str) -> dict[str, list[int]]:
    """Each interface but loopback of a ``/proc/net/dev`` table, with its 16 counters
    (receive: bytes packets errs drop fifo frame compressed multicast; transmit: bytes
    packets errs drop fifo colls carrier compressed)."""
    out = {}
    for line in text.splitlines()[2:]:
        name, sep, rest = line.partition(":")
        f = rest.split()
        if not sep or len(f) < 16 or name.strip() == "lo":
            continue
        out[name.strip()] = [int(x) for x in f[:16]]
    return out


def parse_net_dev(text: str) -> list[api_pb2.NetworkInterfaceUsage]:
    """Interfaces other than loopback from a ``/proc/net/dev`` table."""
    return [
        api_pb2.NetworkInterfaceUsage(
            name=name,
            rx_bytes=_u64(f[0]),
            rx_errors=_u64(f[2]),
            tx_bytes=_u64(f[8]),
            tx_errors=_u64(f[10]),
        )
        for name, f in net_counters(text).items()
    ]


def _read_net_dev(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/net/dev", encoding="ascii") as f:
            return f.read()
    except OSError:
        return ""


def _u64(v: int) -> api_pb2.UInt64Value:
    return api_pb2.UInt64Value(value=v)


class StatsService:
    def __init__(self, rt: CRIRuntime, snapshotter_root: Path) -> None:
        self.rt = rt
        self.snapshotter_root = snapshotter_root
        self._previous: dict[str, Sample] = {}

    async def _samples(self, ids: list[str]) -> dict[str, Sample]:
        if not ids:
            return {}
        cl = self.rt.client
        resp = await cl.call(
            cl.tasks_stub.Metrics,
            tasks_pb2.MetricsRequest(filters=[f"id=={i}" for i in ids]),
        )
        out = {}
        for m in resp.metrics:
            try:
                data = typeurl.unpack(m.data)
            except PycdError:
                continue
            ts = m.timestamp.seconds * 1_000_000_000 + m.timestamp.nanos or time.time_ns()
            s = sample_of(data, ts)
            if s is not None:
                out[m.id] = s
        return out

    def _cpu(self, id_: str, s: Sample) -> api_pb2.CpuUsage:
        cpu = api_pb2.CpuUsage(timestamp=s.timestamp, usage_core_nano_seconds=_u64(s.cpu_ns))
        prev = self._previous.get(id_)
        if prev is not None and s.timestamp > prev.timestamp and s.cpu_ns >= prev.cpu_ns:
            rate = (s.cpu_ns - prev.cpu_ns) * 1_000_000_000 // (s.timestamp - prev.timestamp)
            cpu.usage_nano_cores.value = rate
        self._previous[id_] = s
        return cpu

    @staticmethod
    def _memory(s: Sample) -> api_pb2.MemoryUsage:
        mem = api_pb2.MemoryUsage(
            timestamp=s.timestamp, working_set_bytes=_u64(s.working_set),
            usage_bytes=_u64(s.memory_usage), rss_bytes=_u64(s.rss),
            page_faults=_u64(s.page_faults), major_page_faults=_u64(s.major_page_faults),
        )  # fmt: skip
        if 0 < s.limit < _UNLIMITED:
            mem.available_bytes.value = max(s.limit - s.working_set, 0)
        return mem

    async def _writable_layer(self, id_: str) -> api_pb2.FilesystemUsage:
        cl = self.rt.client
        usage = api_pb2.FilesystemUsage(
            timestamp=time.time_ns(),
            fs_id=api_pb2.FilesystemIdentifier(mountpoint=str(self.snapshotter_root)),
        )
        with contextlib.suppress(NotFound):
            resp = await cl.call(
                cl.snapshots_stub.Usage,
                snapshots_pb2.UsageRequest(snapshotter=self.rt.cfg.snapshotter, key=id_),
            )
            usage.used_bytes.value = resp.size
            usage.inodes_used.value = resp.inodes
        return usage

    async def _container_pb(
        self, c: CRIContainer, samples: dict[str, Sample]
    ) -> api_pb2.ContainerStats:
        cfg = c.meta.config_pb()
        stats = api_pb2.ContainerStats(
            attributes=api_pb2.ContainerAttributes(
                id=c.meta.id, metadata=cfg.metadata, labels=cfg.labels,
                annotations=cfg.annotations,
            ),
            writable_layer=await self._writable_layer(c.meta.id),
        )  # fmt: skip
        s = samples.get(c.meta.id)
        if s is not None:
            stats.cpu.CopyFrom(self._cpu(c.meta.id, s))
            stats.memory.CopyFrom(self._memory(s))
        return stats

    # ------------------------------------------------------------------ containers

    async def container(self, id_: str) -> api_pb2.ContainerStats:
        await self.rt.ready()
        c = self.rt.container(id_)
        return await self._container_pb(c, await self._samples([c.meta.id]))

    async def list_containers(
        self, f: api_pb2.ContainerStatsFilter | None
    ) -> list[api_pb2.ContainerStats]:
        await self.rt.ready()
        self._prune()
        chosen = []
        for c in list(self.rt.containers.values()):
            if f is not None:
                if f.id and not c.meta.id.startswith(f.id):
                    continue
                if f.pod_sandbox_id and not c.meta.sandbox_id.startswith(f.pod_sandbox_id):
                    continue
                labels = c.meta.config_pb().labels
                if any(labels.get(k) != v for k, v in f.label_selector.items()):
                    continue
            chosen.append(c)
        running = [c.meta.id for c in chosen if c.status.state == api_pb2.CONTAINER_RUNNING]
        samples = await self._samples(running)
        return list(await asyncio.gather(*(self._container_pb(c, samples) for c in chosen)))

    # ------------------------------------------------------------------ pods

    async def _sandbox_pb(self, sb: Sandbox) -> api_pb2.PodSandboxStats:
        rt = self.rt
        cfg = sb.meta.config_pb()
        members = [c for c in rt.containers.values() if c.meta.sandbox_id == sb.meta.id]
        running = [c.meta.id for c in members if c.status.state == api_pb2.CONTAINER_RUNNING]
        samples = await self._samples([sb.meta.id, *running] if sb.ready else running)
        stats = api_pb2.PodSandboxStats(
            attributes=api_pb2.PodSandboxAttributes(
                id=sb.meta.id, metadata=cfg.metadata, labels=cfg.labels,
                annotations=cfg.annotations,
            )
        )  # fmt: skip
        linux = stats.linux
        if samples:
            now = max(s.timestamp for s in samples.values())
            total = Sample(
                now,
                *(sum(getattr(s, f) for s in samples.values()) for f in Sample.__slots__[1:]),
            )
            linux.cpu.CopyFrom(self._cpu("pod:" + sb.meta.id, total))
            linux.memory.CopyFrom(self._memory(total))
            linux.process.CopyFrom(
                api_pb2.ProcessUsage(timestamp=now, process_count=_u64(total.processes))
            )
        if sb.ready and sb.pid and sb.meta.netns:
            ifaces = parse_net_dev(await asyncio.to_thread(_read_net_dev, sb.pid))
            if ifaces:
                default = next((i for i in ifaces if i.name == "eth0"), ifaces[0])
                linux.network.CopyFrom(
                    api_pb2.NetworkUsage(
                        timestamp=time.time_ns(), default_interface=default, interfaces=ifaces
                    )
                )
        for c in members:
            linux.containers.append(await self._container_pb(c, samples))
        return stats

    async def sandbox(self, id_: str) -> api_pb2.PodSandboxStats:
        await self.rt.ready()
        return await self._sandbox_pb(self.rt.sandbox(id_))

    async def list_sandboxes(
        self, f: api_pb2.PodSandboxStatsFilter | None
    ) -> list[api_pb2.PodSandboxStats]:
        await self.rt.ready()
        self._prune()
        out = []
        for sb in list(self.rt.sandboxes.values()):
            if f is not None:
                if f.id and not sb.meta.id.startswith(f.id):
                    continue
                labels = sb.meta.config_pb().labels
                if any(labels.get(k) != v for k, v in f.label_selector.items()):
                    continue
            if sb.ready:
                out.append(await self._sandbox_pb(sb))
        return out

    # ------------------------------------------------------------------ metrics

    async def pod_metrics(self) -> list[api_pb2.PodSandboxMetrics]:
        """Metrics of every ready pod and its running containers (one task-metrics call
        for all of them, one thread hop for all the pods' network tables)."""
        rt = self.rt
        await rt.ready()
        pods = [sb for sb in list(rt.sandboxes.values()) if sb.ready]
        wanted = {sb.meta.id for sb in pods}
        members = [
            c
            for c in list(rt.containers.values())
            if c.meta.sandbox_id in wanted and c.status.state == api_pb2.CONTAINER_RUNNING
        ]
        samples = await self._samples([c.meta.id for c in members])
        netted = [(sb.meta.id, sb.pid) for sb in pods if sb.pid and sb.meta.netns]
        tables = await asyncio.to_thread(lambda: {i: _read_net_dev(p) for i, p in netted})
        now = time.time_ns()
        out = {}
        for sb in pods:
            cfg = sb.meta.config_pb()
            labels = [sb.meta.id, cfg.metadata.name, rt.cfg.sandbox_image]
            out[sb.meta.id] = api_pb2.PodSandboxMetrics(
                pod_sandbox_id=sb.meta.id,
                metrics=network_metrics(net_counters(tables.get(sb.meta.id, "")), labels, now),
            )
        for c in members:
            s = samples.get(c.meta.id)
            if s is None:
                continue
            cfg_c = c.meta.config_pb()
            labels = [c.meta.id, cfg_c.metadata.name, cfg_c.image.image or c.meta.image_name]
            out[c.meta.sandbox_id].container_metrics.append(
                api_pb2.ContainerMetrics(
                    container_id=c.meta.id,
                    metrics=container_metrics(s, labels, c.status.started_at),
                )
            )
        return list(out.values())

    def _prune(self) -> None:
        """Drop the CPU samples kept for containers and pods that are gone."""
        rt = self.rt
        for key in list(self._previous):
            id_ = key.removeprefix("pod:")
            if id_ not in rt.containers and id_ not in rt.sandboxes:
                del self._previous[key]
