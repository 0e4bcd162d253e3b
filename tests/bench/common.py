"""Shared pieces of the benchmark scripts: spawning daemons, /proc readings, client workers.

The load-generating clients run in processes started with multiprocessing's *spawn*
method: a Python gRPC client costs tens of microseconds per call, so one process would
measure itself rather than the daemon. Every worker here is a plain module-level function
(spawn imports this module in the child) and talks back through a multiprocessing queue.
Times that cross processes use ``time.monotonic_ns`` (CLOCK_MONOTONIC is system-wide).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import os
import subprocess
import time
from array import array
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
from google.protobuf import empty_pb2

from pycontainerd import typeurl
from pycontainerd.api.events.namespace_pb2 import NamespaceCreate
from pycontainerd.api.services.events.v1 import events_pb2, events_pb2_grpc
from pycontainerd.api.services.version.v1 import version_pb2_grpc
from tests.support.containerd import Containerd
from tests.support.daemon import Daemon, metadata

if TYPE_CHECKING:
    from multiprocessing.queues import Queue
    from multiprocessing.synchronize import Barrier, Event

__all__ = [
    "CONFIG",
    "NS",
    "TOPIC",
    "cpu_seconds",
    "first_answer",
    "latency_worker",
    "load_worker",
    "memory_mb",
    "percentile",
    "publisher_worker",
    "spawn",
    "subscriber_worker",
]

NS = metadata("default")
TOPIC = "/bench/x"
CONFIG = "version = 2\n"
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_EMPTY = empty_pb2.Empty()


# --- daemons and /proc -------------------------------------------------------------------


def spawn(d: Daemon) -> float:
    """Start ``d``'s process without waiting for it; the ``perf_counter`` just before Popen."""
    log = open(d.log_path, "ab")  # noqa: SIM115 - owned by the child
    # Containerd.start runs the binary with our environment; ours needs the repo on the path.
    env = None if isinstance(d, Containerd) else d.env()
    t0 = time.perf_counter()
    d.proc = subprocess.Popen(d.command(), stdout=log, stderr=log, env=env, cwd=d.base)
    log.close()
    return t0


def first_answer(d: Daemon, timeout: float = 30.0) -> float:
    """Poll ``d`` with Version until it answers; the ``perf_counter`` of the first answer.

    A fresh channel per attempt: a channel that failed to connect backs off for a second
    before its next try, which would swamp what we measure.
    """
    assert d.proc is not None
    deadline = time.perf_counter() + timeout
    while True:
        if d.proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {d.proc.returncode}:\n{d.log()[-4000:]}")
        if os.path.exists(d.address):
            with grpc.insecure_channel("unix:" + d.address) as ch:
                try:
                    version_pb2_grpc.VersionStub(ch).Version(_EMPTY, metadata=NS, timeout=0.25)
                    return time.perf_counter()
                except grpc.RpcError:
                    pass
        if time.perf_counter() > deadline:
            raise TimeoutError(f"no answer on {d.address} within {timeout}s:\n{d.log()[-4000:]}")
        time.sleep(0.002)


def _tree(pid: int) -> list[int]:
    """``pid`` and its live descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            with contextlib.suppress(OSError):  # the process may have just exited
                todo.extend(int(c) for c in task.read_text().split())
    return out


def memory_mb(pid: int) -> tuple[float, float]:
    """RSS and PSS in MB of ``pid`` and its descendants, from ``smaps_rollup``."""
    rss = pss = 0
    for p in _tree(pid):
        try:
            text = Path(f"/proc/{p}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            key, _, rest = line.partition(":")
            if key == "Rss":
                rss += int(rest.split()[0])
            elif key == "Pss":
                pss += int(rest.split()[0])
    return rss / 1024, pss / 1024


def cpu_seconds(pid: int) -> float:
    """User + system CPU time consumed so far by ``pid`` and its live descendants."""
    ticks = 0
    for p in _tree(pid):
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces: fields are counted after its closing ')'.
        fields = stat.rpartition(")")[2].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / _CLK_TCK


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile, ``q`` in [0, 100]."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


# --- unary load --------------------------------------------------------------------------


def latency_worker(address: str, warmup: int, calls: int, q: Queue[Any]) -> None:
    """Sequential Version calls on one channel; puts the list of latencies in ns."""
    with grpc.insecure_channel("unix:" + address) as ch:
        stub = version_pb2_grpc.VersionStub(ch)
        for _ in range(warmup):
            stub.Version(_EMPTY, metadata=NS)
        out = array("q")
        clock = time.perf_counter_ns
        for _ in range(calls):
            t0 = clock()
            stub.Version(_EMPTY, metadata=NS)
            out.append(clock() - t0)
    q.put(out.tolist())


def load_worker(
    address: str, inflight: int, duration: float, barrier: Barrier, q: Queue[Any]
) -> None:
    """``inflight`` grpc.aio callers, one channel each, calling Version for ``duration`` s.

    Puts ``(calls, elapsed_seconds, warm_up_calls)``; the barrier lines the worker
    processes up after their warm-up so their measured windows coincide.
    """
    q.put(asyncio.run(_load(address, inflight, duration, barrier)))


async def _load(
    address: str, inflight: int, duration: float, barrier: Barrier
) -> tuple[int, float, int]:
    channels = [grpc.aio.insecure_channel("unix:" + address) for _ in range(inflight)]
    stubs = [version_pb2_grpc.VersionStub(ch) for ch in channels]
    try:
        warm = 50
        for _ in range(warm):
            await asyncio.gather(*(s.Version(_EMPTY, metadata=NS) for s in stubs))
        barrier.wait(60)  # blocking is fine: nothing else runs in this process meanwhile
        start = time.perf_counter()
        end = start + duration

        async def run(stub: Any) -> int:
            n = 0
            while time.perf_counter() < end:
                await stub.Version(_EMPTY, metadata=NS)
                n += 1
            return n

        counts = await asyncio.gather(*(run(s) for s in stubs))
        return sum(counts), time.perf_counter() - start, warm * inflight
    finally:
        for ch in channels:
            await ch.close()


# --- events ------------------------------------------------------------------------------
#
# Event names are "<phase>.<seq>" for measured events and "w.<n>" for warm-up ones, which
# subscribers only use to learn that they are attached. In a phase, publisher task k of S
# sends seq k, k+S, k+2S, ... one call at a time, so every subscriber must see each
# stride in increasing order; all subscribers must also see the same overall order.


async def until(ev: Event, poll: float, other: Event | None = None) -> None:
    """Return once ``ev`` (or ``other``) is set.

    A multiprocessing Event cannot be awaited, and a thread blocked in ``Event.wait`` would
    keep ``asyncio.run`` from returning if the event is never set: poll instead.
    """
    while not (ev.is_set() or (other is not None and other.is_set())):  # noqa: ASYNC110
        await asyncio.sleep(poll)


def publish_request(name: str) -> events_pb2.PublishRequest:
    ev = NamespaceCreate(name=name, labels={"t": str(time.monotonic_ns())})
    return events_pb2.PublishRequest(topic=TOPIC, event=typeurl.pack(ev))


def publisher_worker(
    address: str,
    idx: int,
    phase: int,
    n_events: int,
    strides: tuple[int, int, int],
    rate: float,
    go: Event,
    abort: Event,
    q: Queue[Any],
) -> None:
    """Publish this worker's share of a phase once ``go`` is set.

    ``strides`` is (first stride, local tasks, total strides S). With ``rate`` > 0 a single
    task paces its calls at that many per second. Puts ``("pub-ready", idx)`` after its
    warm-up, then ``("pub", idx, phase, summary)``.
    """
    asyncio.run(_publish(address, idx, phase, n_events, strides, rate, go, abort, q))


async def _publish(
    address: str,
    idx: int,
    phase: int,
    n_events: int,
    strides: tuple[int, int, int],
    rate: float,
    go: Event,
    abort: Event,
    q: Queue[Any],
) -> None:
    first, tasks, total = strides
    channels = [grpc.aio.insecure_channel("unix:" + address) for _ in range(tasks)]
    stubs = [events_pb2_grpc.EventsStub(ch) for ch in channels]
    try:
        for i, s in enumerate(stubs):
            await s.Publish(publish_request(f"w.p{idx}-{i}"), metadata=NS)
        q.put(("pub-ready", idx))
        await until(go, 0.001, abort)
        if abort.is_set():
            return
        sent: dict[int, int] = {}
        errors: list[str] = []
        t_first = time.monotonic_ns()

        async def run(stub: Any, stride: int) -> None:
            for n, seq in enumerate(range(stride, n_events, total)):
                if rate > 0:
                    delay = t_first / 1e9 + n / rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                req = publish_request(f"{phase}.{seq}")
                sent[seq] = time.monotonic_ns()
                try:
                    await stub.Publish(req, metadata=NS)
                except grpc.aio.AioRpcError as exc:
                    errors.append(f"{exc.code().name}: {exc.details()}")

        await asyncio.gather(*(run(s, first + i) for i, s in enumerate(stubs)))
        t_end = time.monotonic_ns()
        q.put(
            (
                "pub",
                idx,
                phase,
                {
                    "t_first": t_first,
                    "t_end": t_end,
                    "sent": sent,
                    "errors": errors[:5],
                    "n_errors": len(errors),
                },
            )
        )
    finally:
        for ch in channels:
            await ch.close()


class _Stream:
    """What one subscriber received, per phase."""

    def __init__(self, phases: list[tuple[int, int]]) -> None:
        self.recv = [array("q", bytes(8 * n)) for n, _ in phases]
        self.order = [array("q") for _ in phases]
        self.last = [list(range(-s, 0)) for _, s in phases]
        self.count = [0] * len(phases)
        self.disorder = [0] * len(phases)
        self.duplicates = [0] * len(phases)
        self.attached = False
        self.error = ""


def subscriber_worker(
    address: str,
    idx: int,
    n_streams: int,
    filters: list[str],
    phases: list[tuple[int, int]],
    abort: Event,
    q: Queue[Any],
) -> None:
    """Hold ``n_streams`` Subscribe streams, each on its own channel.

    ``phases`` lists (events, strides) per phase. Puts ``("sub-ready", idx)`` once every
    stream has seen a warm-up event, then ``("sub", idx, phase, summary)`` as soon as every
    stream has the whole phase (or ``abort`` is set).
    """
    asyncio.run(_subscribe(address, idx, n_streams, filters, phases, abort, q))


async def _subscribe(
    address: str,
    idx: int,
    n_streams: int,
    filters: list[str],
    phases: list[tuple[int, int]],
    abort: Event,
    q: Queue[Any],
) -> None:
    streams = [_Stream(phases) for _ in range(n_streams)]
    done = [0] * len(phases)
    phase_done = [asyncio.Event() for _ in phases]
    attached = asyncio.Event()
    n_attached = 0
    channels = [grpc.aio.insecure_channel("unix:" + address) for _ in range(n_streams)]

    def finished(p: int) -> None:
        done[p] += 1
        if done[p] == n_streams:
            phase_done[p].set()

    async def reader(ch: grpc.aio.Channel, st: _Stream) -> None:
        nonlocal n_attached
        stub = events_pb2_grpc.EventsStub(ch)
        call = stub.Subscribe(events_pb2.SubscribeRequest(filters=filters), metadata=NS)
        pending = len(phases)
        try:
            async for env in call:
                now = time.monotonic_ns()
                ph, _, rest = NamespaceCreate.FromString(env.event.value).name.partition(".")
                if ph == "w":
                    if not st.attached:
                        st.attached = True
                        n_attached += 1
                        if n_attached == n_streams:
                            attached.set()
                    continue
                p, seq = int(ph), int(rest)
                if st.recv[p][seq]:
                    st.duplicates[p] += 1
                    continue
                st.recv[p][seq] = now
                st.order[p].append(seq)
                last, stride = st.last[p], phases[p][1]
                k = seq % stride
                if seq != last[k] + stride:
                    st.disorder[p] += 1
                last[k] = seq
                st.count[p] += 1
                if st.count[p] == phases[p][0]:
                    finished(p)
                    pending -= 1
                    if pending == 0:
                        return
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                st.error = f"{exc.code().name}: {exc.details()}"
        finally:
            call.cancel()
        # The stream ended early: it will not complete the phases it has not finished.
        for p, (n, _) in enumerate(phases):
            if st.count[p] < n:
                finished(p)

    async def watchdog() -> None:
        await until(abort, 0.05)
        attached.set()
        for ev in phase_done:
            ev.set()

    tasks = [asyncio.create_task(reader(ch, st)) for ch, st in zip(channels, streams, strict=True)]
    dog = asyncio.create_task(watchdog())
    try:
        await attached.wait()
        q.put(("sub-ready", idx))
        for p, (n, _) in enumerate(phases):
            await phase_done[p].wait()
            q.put(("sub", idx, p, _summary(streams, p, n)))
    finally:
        dog.cancel()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, dog, return_exceptions=True)
        for ch in channels:
            await ch.close()


def _summary(streams: list[_Stream], p: int, n: int) -> dict[str, Any]:
    """Per-seq latest receive time over this process's streams (0: some stream missed it)."""
    latest = array("q", bytes(8 * n))
    for seq in range(n):
        t = 0
        for st in streams:
            r = st.recv[p][seq]
            if r == 0:
                t = 0
                break
            t = max(t, r)
        latest[seq] = t
    return {
        "latest": latest.tolist(),
        "delivered": sum(st.count[p] for st in streams),
        "disorder": sum(st.disorder[p] for st in streams),
        "duplicates": sum(st.duplicates[p] for st in streams),
        "orders": sorted({hashlib.sha1(st.order[p].tobytes()).hexdigest() for st in streams}),
        "errors": sorted({st.error for st in streams if st.error}),
    }
