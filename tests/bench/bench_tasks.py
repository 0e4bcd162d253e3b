"""Benchmark: running containers with ``ctr``, ours beside real containerd's, in one run.

Both daemons run side by side on private paths with the same busybox image imported, and
each measurement is taken per *variant* (daemon + runtime shim):

- ``pcd/pyrunc``: our daemon with our shim ``io.containerd.pyrunc.v1`` (forked from a
  preloaded zygote);
- ``pcd/runc.v2``: our daemon with containerd's Go shim, which separates the daemon's
  cost from the shim's;
- ``ctd/runc.v2``: Debian's containerd 1.6 with its default shim, the reference;
- ``ctd/pyrunc``: containerd with our shim through the ``containerd-shim-pyrunc-v1``
  console script (off with ``--no-cross``; ``--quick`` leaves it out unless ``--cross``).

Measured: sequential ``ctr run --rm IMG id true`` wall time (median, p90; interleaved over
the variants so background load hits all alike); 50 concurrent ``ctr run --rm`` (containers
per second until the last exits); N detached ``sleep 1000`` containers (shim PSS per
container from ``smaps_rollup``, our zygote included once and amortized; daemon PSS; ``ctr
task ls`` latency); and ``/tasks/exit`` delivery latency to a gRPC subscriber, measured from
the moment the host sees the container's process exit (a pidfd becomes readable), and also
from the shim's ``exited_at`` and the envelope's timestamp.

    .venv/bin/python -m tests.bench.bench_tasks [--quick] [--no-cross | --cross]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import queue
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import grpc.aio

from pycontainerd.api.events.task_pb2 import TaskExit
from pycontainerd.api.services.containers.v1 import containers_pb2, containers_pb2_grpc
from pycontainerd.api.services.events.v1 import events_pb2, events_pb2_grpc
from pycontainerd.api.services.snapshots.v1 import snapshots_pb2, snapshots_pb2_grpc
from pycontainerd.api.services.tasks.v1 import tasks_pb2, tasks_pb2_grpc
from tests.bench.common import CONFIG, TOPIC, memory_mb, percentile, publish_request
from tests.support.containerd import CONTAINERD, Containerd
from tests.support.daemon import CTR, Daemon, metadata
from tests.support.images import busybox_image, write_oci_archive

if TYPE_CHECKING:
    from collections.abc import Awaitable

NS_NAME = "bench"
MD = metadata(NS_NAME)
IMAGE = "example.com/bench/busybox:1"
RUNC_V2 = "io.containerd.runc.v2"
PYRUNC = "io.containerd.pyrunc.v1"
SHIM_SCRIPT = Path(sys.executable).parent / "containerd-shim-pyrunc-v1"
_CLK_TCK = os.sysconf("SC_CLK_TCK")
# What a shim's command line contains, per runtime (forked pyrunc shims keep the zygote's).
MARKER = {RUNC_V2: "containerd-shim-runc-v2", PYRUNC: "pycontainerd.shim"}


@dataclass(frozen=True)
class Plan:
    warmup: int = 2
    sequential: int = 20
    concurrent: int = 50
    detached: int = 100
    batch: int = 10
    ls_runs: int = 10
    event_tasks: int = 30


QUICK = Plan(sequential=8, concurrent=50, detached=40, ls_runs=5, event_tasks=10)


class QuietDaemon(Daemon):
    """Ours at the log level the containerd helper uses (warn) instead of the tests' debug."""

    def command(self) -> list[str]:
        cmd = super().command()
        cmd[cmd.index("--log-level") + 1] = "warn"
        return cmd


@dataclass
class Variant:
    key: str
    daemon: Daemon
    runtime: str
    results: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def ctr(self, *args: str) -> list[str]:
        assert CTR is not None
        return [CTR, "-a", self.daemon.address, "-n", NS_NAME, *args]

    def run_argv(self, cid: str, *cmd: str, detach: bool = False) -> list[str]:
        """``ctr run`` of a container named ``cid`` prefixed with the variant (ids are
        unique per daemon)."""
        mode = "-d" if detach else "--rm"
        name = f"{self.key.replace('/', '-')}-{cid}"
        return self.ctr("run", mode, "--runtime", self.runtime, IMAGE, name, *cmd)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def check(res: subprocess.CompletedProcess[bytes], what: str) -> None:
    if res.returncode != 0:
        err = res.stderr.decode(errors="replace").strip()
        raise RuntimeError(f"{what} failed ({res.returncode}): {err}")


# --- /proc -------------------------------------------------------------------------------


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _start_time(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rpartition(")")[2].split()[19])


def shim_pids(d: Daemon, marker: str) -> list[int]:
    """Live processes that are shims (or our zygote) of daemon ``d``, oldest first.

    Every shim names the daemon's socket or state dir on its command line (``-address``
    for containerd's, the zygote socket for ours), and all of those sit under ``d.base``.
    """
    base = str(d.base)
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            cmd = _cmdline(int(entry))
            if base in cmd and marker in cmd:
                out.append(int(entry))
    return sorted(out, key=lambda p: (_start_time(p) if os.path.exists(f"/proc/{p}") else 0, p))


def pss_kb(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for t in Path(f"/proc/{p}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                kids = [int(c) for c in t.read_text().split()]
                out.extend(kids)
                todo.extend(kids)
    return out


# --- gRPC cleanup ------------------------------------------------------------------------


async def _purge(address: str) -> int:
    """Kill and delete every task, container and container snapshot of the namespace."""
    async with grpc.aio.insecure_channel("unix:" + address) as ch:
        tasks = tasks_pb2_grpc.TasksStub(ch)
        conts = containers_pb2_grpc.ContainersStub(ch)
        snaps = snapshots_pb2_grpc.SnapshotsStub(ch)
        sem = asyncio.Semaphore(16)

        async def quiet(call: Awaitable[object]) -> None:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await call

        async def task(cid: str) -> None:
            async with sem:
                kill = tasks_pb2.KillRequest(container_id=cid, signal=signal.SIGKILL, all=True)
                await quiet(tasks.Kill(kill, metadata=MD, timeout=10))
                wait = tasks_pb2.WaitRequest(container_id=cid)
                await quiet(tasks.Wait(wait, metadata=MD, timeout=10))
                delete = tasks_pb2.DeleteTaskRequest(container_id=cid)
                await quiet(tasks.Delete(delete, metadata=MD, timeout=10))

        async def container(c: containers_pb2.Container) -> None:
            async with sem:
                req = containers_pb2.DeleteContainerRequest(id=c.id)
                await quiet(conts.Delete(req, metadata=MD, timeout=10))
                rm = snapshots_pb2.RemoveSnapshotRequest(
                    snapshotter=c.snapshotter, key=c.snapshot_key
                )
                await quiet(snaps.Remove(rm, metadata=MD, timeout=10))

        listed = await tasks.List(tasks_pb2.ListTasksRequest(), metadata=MD, timeout=30)
        await asyncio.gather(*(task(t.id) for t in listed.tasks))
        cs = await conts.List(containers_pb2.ListContainersRequest(), metadata=MD, timeout=30)
        await asyncio.gather(*(container(c) for c in cs.containers))
        return len(cs.containers)


def purge(d: Daemon) -> tuple[int, float]:
    """(containers removed, seconds)."""
    t0 = time.perf_counter()
    n = asyncio.run(_purge(d.address))
    return n, time.perf_counter() - t0


def teardown(d: Daemon) -> None:
    """Leave nothing behind: containers, the daemon, stray shims (and their containers),
    our zygote, mounts under the daemon's directory, the directory itself."""
    if d.proc is not None and d.proc.poll() is None:
        try:
            purge(d)
        except (grpc.RpcError, OSError) as exc:
            log(f"purge of {d.base} failed: {exc}")
    d.stop()
    for marker in MARKER.values():
        for pid in shim_pids(d, marker):
            for p in [*reversed(_descendants(pid)), pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
    base = str(d.base)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for point in sorted((p for p in points if p.startswith(base + "/")), reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    d.cleanup()


# --- measurements ------------------------------------------------------------------------


def _cpu_ms(pid: int) -> float:
    """User + system CPU of ``pid`` alone (not its children), in ms."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:  # gone: it no longer counts
        return 0.0
    return (int(fields[11]) + int(fields[12])) * 1e3 / _CLK_TCK


def measure_sequential(variants: list[Variant], plan: Plan) -> None:
    """``ctr run --rm IMG id true`` one at a time; rounds interleave the variants.

    Wall time on a shared machine is noisy, so the daemon's own CPU time per run is
    recorded too (ticks of 10 ms, summed over all runs).
    """
    samples: dict[str, list[float]] = {v.key: [] for v in variants}
    cpu: dict[str, float] = {v.key: 0.0 for v in variants}
    for i in range(plan.warmup + plan.sequential):
        for v in variants:
            assert v.daemon.proc is not None
            argv = v.run_argv(f"seq-{i}", "true")
            c0 = _cpu_ms(v.daemon.proc.pid)
            t0 = time.perf_counter()
            res = subprocess.run(argv, capture_output=True, timeout=120, check=False)
            dt = time.perf_counter() - t0
            check(res, f"{v.key}: ctr run --rm")
            if i >= plan.warmup:
                samples[v.key].append(dt * 1e3)
                cpu[v.key] += _cpu_ms(v.daemon.proc.pid) - c0
    for v in variants:
        v.results["seq_p50"] = statistics.median(samples[v.key])
        v.results["seq_p90"] = percentile(samples[v.key], 90)
        v.results["seq_min"] = min(samples[v.key])
        v.results["seq_cpu"] = cpu[v.key] / plan.sequential


def measure_concurrent(v: Variant, plan: Plan) -> None:
    """``plan.concurrent`` ``ctr run --rm ... true`` started together; rate until the last exits."""
    procs = []
    t0 = time.perf_counter()
    for i in range(plan.concurrent):
        argv = v.run_argv(f"conc-{i}", "true")
        procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    errors = []
    for p in procs:
        _, err = p.communicate(timeout=300)
        if p.returncode != 0:
            errors.append(err.decode(errors="replace").strip().splitlines()[-1:] or ["?"])
    wall = time.perf_counter() - t0
    v.results["conc_rate"] = plan.concurrent / wall
    v.results["conc_failed"] = len(errors)
    if errors:
        v.notes.append(f"{len(errors)} concurrent runs failed, e.g. {errors[0][0]}")


def measure_detached(v: Variant, plan: Plan) -> None:
    """N detached ``sleep 1000``: start rate, shim and daemon memory, ``ctr task ls``."""
    d = v.daemon
    assert d.proc is not None
    marker = MARKER[v.runtime]
    before = set(shim_pids(d, marker))
    daemon_pss0 = memory_mb(d.proc.pid)[1]
    t0 = time.perf_counter()
    for start in range(0, plan.detached, plan.batch):
        ids = range(start, min(start + plan.batch, plan.detached))
        procs = [
            subprocess.Popen(
                v.run_argv(f"det-{i}", "sleep", "1000", detach=True),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            for i in ids
        ]
        for p in procs:
            _, err = p.communicate(timeout=120)
            if p.returncode != 0:
                raise RuntimeError(f"{v.key}: ctr run -d failed: {err.decode(errors='replace')}")
    v.results["det_rate"] = plan.detached / (time.perf_counter() - t0)
    time.sleep(1.0)  # let the shims finish their start-up allocations
    pids = shim_pids(d, marker)
    # Our forked shims keep the zygote's command line; the zygote is the oldest of them.
    # It is counted once, spread over the containers, rather than as a shim. (One of our
    # shim processes may serve several containers: count processes, not containers.)
    zygote = [p for p in pids if "pycontainerd.shim.zygote" in _cmdline(p)][:1]
    shims = [p for p in pids if p not in zygote]
    if set(before) - set(zygote) and v.runtime == RUNC_V2:  # ours keeps a pre-forked spare
        v.notes.append(f"{len(set(before) - set(zygote))} shim processes predate the phase")
    shim_kb = sum(pss_kb(p) for p in shims)
    zyg_kb = sum(pss_kb(p) for p in zygote)
    v.results["shims"] = len(shims)
    v.results["shim_pss"] = shim_kb / 1024 / plan.detached
    v.results["zygote_pss"] = zyg_kb / 1024 if zygote else float("nan")
    v.results["per_ctr_pss"] = (shim_kb + zyg_kb) / 1024 / plan.detached
    v.results["daemon_pss0"] = daemon_pss0
    v.results["daemon_pss"] = memory_mb(d.proc.pid)[1]
    lat = []
    d_cpu = s_cpu = 0.0
    for _ in range(plan.ls_runs):
        c0, s0 = _cpu_ms(d.proc.pid), sum(_cpu_ms(p) for p in shims)
        t1 = time.perf_counter()
        res = subprocess.run(v.ctr("task", "ls"), capture_output=True, timeout=60, check=False)
        lat.append((time.perf_counter() - t1) * 1e3)
        d_cpu += _cpu_ms(d.proc.pid) - c0
        s_cpu += sum(_cpu_ms(p) for p in shims) - s0
        check(res, f"{v.key}: ctr task ls")
        running = res.stdout.decode().count("RUNNING")
        if running != plan.detached:
            v.notes.append(f"ctr task ls showed {running} RUNNING, expected {plan.detached}")
    v.results["ls_p50"] = statistics.median(lat)
    v.results["ls_min"] = min(lat)
    v.results["ls_cpu"] = d_cpu / plan.ls_runs
    v.results["ls_shim_cpu"] = s_cpu / plan.ls_runs
    n, secs = purge(d)
    v.results["purge_s"] = secs
    if n < plan.detached:
        v.notes.append(f"cleanup removed {n} containers, expected {plan.detached}")


class ExitSubscriber:
    """A gRPC Subscribe stream read by a thread; records each ``/tasks/exit`` on arrival."""

    def __init__(self, address: str) -> None:
        self._ch = grpc.insecure_channel("unix:" + address)
        filters = [f'namespace=="{NS_NAME}",topic=="/tasks/exit"', f'topic=="{TOPIC}"']
        req = events_pb2.SubscribeRequest(filters=filters)
        self._call = events_pb2_grpc.EventsStub(self._ch).Subscribe(req, metadata=MD)
        self.exits: queue.Queue[tuple[int, events_pb2.Envelope]] = queue.Queue()
        self.ready = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        stub = events_pb2_grpc.EventsStub(self._ch)
        deadline = time.monotonic() + 10
        # Publish markers until one arrives: only then is the stream certainly attached.
        while not self.ready.wait(0.05):
            stub.Publish(publish_request("ready"), metadata=MD)
            if time.monotonic() > deadline:
                raise TimeoutError("the event subscriber never attached")

    def _read(self) -> None:
        with contextlib.suppress(grpc.RpcError):
            for env in self._call:
                now = time.time_ns()
                if env.topic == TOPIC:
                    self.ready.set()
                else:
                    self.exits.put((now, env))

    def close(self) -> None:
        self._call.cancel()
        self._thread.join(5)
        self._ch.close()


def _ns(ts: object) -> int:
    return int(ts.seconds) * 1_000_000_000 + int(ts.nanos)  # type: ignore[attr-defined]


def measure_events(v: Variant, plan: Plan) -> None:
    """Exit-to-subscriber latency of ``/tasks/exit`` over ``plan.event_tasks`` tasks."""
    d = v.daemon
    sub = ExitSubscriber(d.address)
    ch = grpc.insecure_channel("unix:" + d.address)
    stub = tasks_pb2_grpc.TasksStub(ch)
    host: list[float] = []
    shim: list[float] = []
    envelope: list[float] = []
    skipped = 0
    try:
        for i in range(plan.event_tasks):
            argv = v.run_argv(f"ev-{i}", "sleep", "0.3", detach=True)
            cid = argv[-3]
            res = subprocess.run(argv, capture_output=True, timeout=60, check=False)
            check(res, f"{v.key}: ctr run -d")
            pid = stub.Get(tasks_pb2.GetRequest(container_id=cid), metadata=MD).process.pid
            fd = os.pidfd_open(pid)
            try:
                t_open = time.time_ns()
                poller = select.poll()
                poller.register(fd, select.POLLIN)
                poller.poll(10_000)
                t_exit = time.time_ns()
            finally:
                os.close(fd)
            while True:
                recv, env = sub.exits.get(timeout=10)
                ev = TaskExit.FromString(env.event.value)
                if ev.container_id == cid:
                    break
            if t_exit - t_open < 1_000_000:  # it had exited before we watched: no exit time
                skipped += 1
                continue
            host.append((recv - t_exit) / 1e6)
            shim.append((recv - _ns(ev.exited_at)) / 1e6)
            envelope.append((recv - _ns(env.timestamp)) / 1e6)
    finally:
        sub.close()
        ch.close()
    for name, vals in (("ev_host", host), ("ev_exited_at", shim), ("ev_envelope", envelope)):
        v.results[name + "_p50"] = percentile(vals, 50)
        v.results[name + "_p99"] = percentile(vals, 99)
    if skipped:
        v.notes.append(f"{skipped} event samples skipped (exit before the pidfd watch)")
    purge(d)


# --- report ------------------------------------------------------------------------------

ROWS = [
    ("seq_p50", "ctr run --rm true, median (ms)", "lower"),
    ("seq_p90", "ctr run --rm true, p90 (ms)", "lower"),
    ("seq_min", "ctr run --rm true, min (ms)", "lower"),
    ("seq_cpu", "  daemon CPU per run (ms) [c]", "lower"),
    ("conc_rate", "{concurrent} concurrent ctr run --rm (containers/s)", "higher"),
    ("conc_failed", "  concurrent runs that failed", "lower"),
    ("det_rate", "ctr run -d, {batch} at a time (containers/s)", "higher"),
    ("shims", "  shim processes (zygote excluded)", "-"),
    ("per_ctr_pss", "shim PSS per running container (MB) [a]", "lower"),
    ("shim_pss", "  of which the shim itself (MB)", "lower"),
    ("zygote_pss", "  zygote PSS, counted once (MB)", "lower"),
    ("daemon_pss0", "daemon PSS, idle (MB)", "lower"),
    ("daemon_pss", "daemon PSS, {detached} running (MB)", "lower"),
    ("ls_p50", "ctr task ls, {detached} running, median (ms)", "lower"),
    ("ls_min", "ctr task ls, {detached} running, min (ms)", "lower"),
    ("ls_cpu", "  daemon CPU per task ls (ms) [c]", "lower"),
    ("ls_shim_cpu", "  all shims' CPU per task ls (ms) [c]", "lower"),
    ("purge_s", "kill+delete {detached} via gRPC (s)", "lower"),
    ("ev_host_p50", "exit -> subscriber, p50 (ms) [b]", "lower"),
    ("ev_host_p99", "exit -> subscriber, p99 (ms)", "lower"),
    ("ev_exited_at_p50", "exited_at -> subscriber, p50 (ms)", "lower"),
    ("ev_exited_at_p99", "exited_at -> subscriber, p99 (ms)", "lower"),
    ("ev_envelope_p50", "envelope ts -> subscriber, p50 (ms)", "lower"),
    ("ev_envelope_p99", "envelope ts -> subscriber, p99 (ms)", "lower"),
]


def _fmt(x: float | None, key: str) -> str:
    if x is None or math.isnan(x):
        return "-"
    if key in COUNTS:
        return f"{x:.0f}"
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.2f}" if abs(x) >= 1 else f"{x:.3f}"


COUNTS = {"conc_failed", "shims"}


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or math.isnan(a) or math.isnan(b) or b == 0:
        return "-"
    return f"{a / b:.2f}"


def report(variants: list[Variant], plan: Plan) -> str:
    by = {v.key: v.results for v in variants}
    ref = by.get("ctd/runc.v2", {})
    cols = [v.key for v in variants]
    head = ["metric", *cols, "pyrunc/ctd", "pcd-runc/ctd", "better"]
    lines = []
    for key, label, better in ROWS:
        vals = [by[c].get(key) for c in cols]
        ratios = [
            "-" if key in COUNTS else _ratio(by.get(mine, {}).get(key), ref.get(key))
            for mine in ("pcd/pyrunc", "pcd/runc.v2")
        ]
        name = label.format(**plan.__dict__)
        lines.append([name, *(_fmt(x, key) for x in vals), *ratios, better])
    widths = [max(len(r[i]) for r in [head, *lines]) for i in range(len(head))]
    out = [" | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    out.append("-+-".join("-" * w for w in widths))
    out += [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in lines]
    out.append(
        "[a] sum of PSS (smaps_rollup) of the shim processes / containers; for pyrunc the"
        " zygote's PSS is included once, amortized over the containers, and so is its idle"
        " pre-forked spare; one pyrunc process may serve several containers."
    )
    out.append(
        "[b] from the host seeing the container's process exit (pidfd readable) to the gRPC"
        " subscriber receiving /tasks/exit; exited_at is the shim's reap time, the envelope"
        " timestamp its publish time."
    )
    out.append(
        "[c] utime+stime from /proc/<pid>/stat (10 ms ticks, averaged); robust to other load,"
        " unlike the wall times on a shared machine."
    )
    for v in variants:
        out += [f"note {v.key}: {n}" for n in v.notes]
    return "\n".join(out)


# --- main --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer samples (under 2 minutes)")
    ap.add_argument("--no-cross", action="store_true", help="skip our shim under containerd")
    ap.add_argument("--cross", action="store_true", help="with --quick: keep ctd/pyrunc")
    args = ap.parse_args(argv)
    plan = QUICK if args.quick else Plan()
    # Our shim under containerd pays an interpreter start per container (its `start`
    # action): slow enough that --quick leaves it out unless asked.
    cross = not args.no_cross and (args.cross or not args.quick)
    if CTR is None or CONTAINERD is None or os.geteuid() != 0:
        print("needs root, ctr and containerd", file=sys.stderr)
        return 2
    # containerd finds our shim as containerd-shim-pyrunc-v1 on its PATH.
    os.environ["PATH"] = f"{SHIM_SCRIPT.parent}{os.pathsep}{os.environ.get('PATH', '')}"
    tmp = Path(tempfile.mkdtemp(prefix="pcd-bt-", dir="/tmp"))
    archive = tmp / "busybox.tar"
    write_oci_archive(archive, {IMAGE: busybox_image()})
    ours: Daemon = QuietDaemon(config=CONFIG)
    theirs: Daemon = Containerd()
    started = time.perf_counter()
    try:
        for d in (ours, theirs):
            d.start()
            res = subprocess.run(
                [CTR, "-a", d.address, "-n", NS_NAME, "images", "import", str(archive)],
                capture_output=True,
                check=False,
            )
            check(res, "ctr images import")
        variants = [
            Variant("pcd/pyrunc", ours, PYRUNC),
            Variant("pcd/runc.v2", ours, RUNC_V2),
            Variant("ctd/runc.v2", theirs, RUNC_V2),
        ]
        if cross and SHIM_SCRIPT.exists():
            variants.append(Variant("ctd/pyrunc", theirs, PYRUNC))
        log("sequential ctr run --rm")
        measure_sequential(variants, plan)
        for step, fn in (
            ("concurrent", measure_concurrent),
            ("detached", measure_detached),
            ("events", measure_events),
        ):
            for v in variants:
                log(f"{step}: {v.key}")
                fn(v, plan)
        print(report(variants, plan))
        log(f"done in {time.perf_counter() - started:.0f}s")
    except BaseException:
        for d in (ours, theirs):
            sys.stderr.write(f"--- {d.log_path} (tail)\n{d.log()[-3000:]}\n")
        raise
    finally:
        for d in (ours, theirs):
            teardown(d)
        archive.unlink(missing_ok=True)
        tmp.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
