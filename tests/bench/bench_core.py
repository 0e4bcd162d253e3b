"""Benchmark: start-up, idle memory, unary RPCs and events, ours beside real containerd's.

Runs the same client code against a pycontainerd daemon and Debian's containerd 1.6 (CRI
off, private paths; skipped with "containerd: not installed" when the binary is missing)
on this machine, and prints one table: our figure, theirs, and ours/theirs.

- start-up: ``Popen`` to the first answered Version RPC on fresh directories (median);
- idle memory: RSS and PSS from ``smaps_rollup`` a second after that answer (median);
- unary: Version latency p50/p99 from one sequential client, and calls/s from 1 and 16
  concurrent callers (16 = 2 processes x 8 grpc.aio calls in flight, one channel each);
- events: 1, 10 and 100 subscribers (spread over up to 4 processes) filtering on
  ``topic=="/bench/x"``; publish-to-delivered-to-all latency at a modest paced rate, then
  sustained events/s publishing as fast as 2 processes x 16 calls in flight allow, with a
  count, order and loss check per subscriber and the daemon's CPU time per event.

    .venv/bin/python -m tests.bench.bench_core [--quick] [--no-containerd]
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import queue
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc

from pycontainerd.api.services.events.v1 import events_pb2_grpc
from tests.bench.common import (
    CONFIG,
    NS,
    cpu_seconds,
    first_answer,
    latency_worker,
    load_worker,
    memory_mb,
    percentile,
    publish_request,
    publisher_worker,
    spawn,
    subscriber_worker,
)
from tests.support.containerd import CONTAINERD, Containerd
from tests.support.daemon import Daemon

if TYPE_CHECKING:
    from collections.abc import Callable
    from multiprocessing.context import SpawnContext, SpawnProcess
    from multiprocessing.queues import Queue

OURS, THEIRS = "pycontainerd", "containerd"
CTX: SpawnContext = mp.get_context("spawn")


@dataclass(frozen=True)
class Plan:
    startup_runs: int = 5
    unary_calls: int = 2000
    load_seconds: float = 3.0
    # Paced publish rate per subscriber count. A Python subscriber costs ~25 us of CPU per
    # message, so 100 subscribers at 200/s would measure our client, not the daemon.
    event_rate: dict[int, float] = field(default_factory=lambda: {1: 200.0, 10: 200.0, 100: 100.0})
    event_seconds: float = 4.0
    subscribers: tuple[int, ...] = (1, 10, 100)
    burst: dict[int, int] = field(default_factory=lambda: {1: 8000, 10: 8000, 100: 3000})
    publishers: int = 2
    publisher_tasks: int = 16


QUICK = Plan(
    startup_runs=3,
    unary_calls=1000,
    load_seconds=1.0,
    event_seconds=1.5,
    burst={1: 2000, 10: 2000, 100: 800},
)


class QuietDaemon(Daemon):
    """Ours at the log level the containerd helper uses (warn) instead of the tests' debug."""

    def command(self) -> list[str]:
        cmd = super().command()
        cmd[cmd.index("--log-level") + 1] = "warn"
        return cmd


def make(kind: str) -> Daemon:
    return QuietDaemon(config=CONFIG) if kind == OURS else Containerd()


# --- start-up and memory -----------------------------------------------------------------


def startup_once(kind: str) -> tuple[float, float, float]:
    """(ms to first answer, RSS MB, PSS MB one second later) on fresh directories."""
    d = make(kind)
    try:
        t0 = spawn(d)
        ms = (first_answer(d) - t0) * 1e3
        time.sleep(1.0)
        assert d.proc is not None
        rss, pss = memory_mb(d.proc.pid)
        return ms, rss, pss
    finally:
        d.cleanup()


def measure_startup(kinds: list[str], runs: int) -> dict[str, dict[str, float]]:
    samples: dict[str, list[tuple[float, float, float]]] = {k: [] for k in kinds}
    for _ in range(runs):
        for k in kinds:  # interleaved, so a burst of background load hits both alike
            samples[k].append(startup_once(k))
    return {
        k: {
            "startup_ms": statistics.median(s[0] for s in v),
            "rss_mb": statistics.median(s[1] for s in v),
            "pss_mb": statistics.median(s[2] for s in v),
        }
        for k, v in samples.items()
    }


# --- unary -------------------------------------------------------------------------------


def _run(procs: list[SpawnProcess], q: Queue[Any], n: int, timeout: float) -> list[Any]:
    try:
        for p in procs:
            p.start()
        return [q.get(timeout=timeout) for _ in range(n)]
    finally:
        _reap(procs)


def _reap(procs: list[SpawnProcess]) -> None:
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.terminate()
            p.join(5)


def measure_unary(address: str, pid: int, plan: Plan) -> dict[str, float]:
    q: Queue[Any] = CTX.Queue()
    lat = CTX.Process(target=latency_worker, args=(address, 300, plan.unary_calls, q))
    ns = _run([lat], q, 1, 120)[0]
    ms = [v / 1e6 for v in ns]
    out = {"p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99)}
    for label, procs, inflight in (("tput1", 1, 1), ("tput16", 2, 8)):
        barrier = CTX.Barrier(procs)
        workers = [
            CTX.Process(target=load_worker, args=(address, inflight, plan.load_seconds, barrier, q))
            for _ in range(procs)
        ]
        cpu0 = cpu_seconds(pid)
        res = _run(workers, q, procs, 120)
        cpu = cpu_seconds(pid) - cpu0
        out[label] = sum(calls / elapsed for calls, elapsed, _ in res)
        # Daemon CPU over every call it served, warm-up included: on a shared machine this
        # moves far less than calls/s does.
        out[f"{label}_cpu_us"] = cpu / sum(calls + warm for calls, _, warm in res) * 1e6
    return out


# --- events ------------------------------------------------------------------------------


class Inbox:
    """Tagged messages from the workers, taken in whatever order they arrive."""

    def __init__(self, q: Queue[Any]) -> None:
        self.q = q
        self.kept: list[tuple[Any, ...]] = []

    def take(self, match: Callable[[tuple[Any, ...]], bool], n: int, timeout: float) -> list[Any]:
        deadline = time.monotonic() + timeout
        got: list[tuple[Any, ...]] = []
        while len(got) < n:
            for m in [m for m in self.kept if match(m)][: n - len(got)]:
                self.kept.remove(m)
                got.append(m)
            if len(got) >= n:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"got {len(got)} of {n} worker reports")
            with contextlib.suppress(queue.Empty):
                self.kept.append(self.q.get(timeout=min(left, 0.05)))
        return got


Message = tuple[Any, ...]


def is_ready(m: Message) -> bool:
    return str(m[0]).endswith("-ready")


def report(kind: str, phase: int) -> Callable[[Message], bool]:
    return lambda m: m[0] == kind and m[2] == phase


def measure_events(address: str, pid: int, n_subs: int, plan: Plan) -> dict[str, Any]:
    burst = plan.burst[n_subs]
    rate = plan.event_rate[n_subs]
    n_lat = int(rate * plan.event_seconds)
    strides = plan.publishers * plan.publisher_tasks
    phases = [(n_lat, 1), (burst, strides)]
    n_procs = min(n_subs, 4 if n_subs >= 100 else 2)
    shares = [n_subs // n_procs + (i < n_subs % n_procs) for i in range(n_procs)]
    q: Queue[Any] = CTX.Queue()
    abort = CTX.Event()
    go = [CTX.Event(), CTX.Event()]
    filters = ['topic=="/bench/x"']
    procs = [
        CTX.Process(target=subscriber_worker, args=(address, i, s, filters, phases, abort, q))
        for i, s in enumerate(shares)
    ]
    pubs = [
        CTX.Process(
            target=publisher_worker,
            args=(address, 0, 0, n_lat, (0, 1, 1), rate, go[0], abort, q),
        )
    ] + [
        CTX.Process(
            target=publisher_worker,
            args=(
                address,
                1 + i,
                1,
                burst,
                (i * plan.publisher_tasks, plan.publisher_tasks, strides),
                0.0,
                go[1],
                abort,
                q,
            ),
        )
        for i in range(plan.publishers)
    ]
    inbox = Inbox(q)
    out: dict[str, Any] = {}
    try:
        for p in procs + pubs:
            p.start()
        # Warm-up events until every stream has seen one: from then on each is attached.
        with grpc.insecure_channel("unix:" + address) as ch:
            stub = events_pb2_grpc.EventsStub(ch)
            deadline = time.monotonic() + 60
            ready = 0
            n = 0
            while ready < len(procs) + len(pubs):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{ready} of {len(procs) + len(pubs)} workers ready")
                stub.Publish(publish_request(f"w.{n}"), metadata=NS)
                n += 1
                with contextlib.suppress(TimeoutError):
                    ready += len(inbox.take(is_ready, 1, 0.02))
        for phase in (0, 1):
            n_pubs = 1 if phase == 0 else plan.publishers
            cpu0 = cpu_seconds(pid)
            go[phase].set()
            pres = inbox.take(report("pub", phase), n_pubs, 120)
            try:
                sres = inbox.take(report("sub", phase), n_procs, 30)
            except TimeoutError:
                abort.set()  # subscribers report what they have
                sres = inbox.take(report("sub", phase), n_procs, 30)
            cpu = cpu_seconds(pid) - cpu0
            out.update(
                _phase_result(
                    phase, [m[3] for m in pres], [m[3] for m in sres], n_subs, phases[phase][0], cpu
                )
            )
            if abort.is_set():
                break  # the subscribers have stopped: the next phase cannot be measured
    finally:
        abort.set()
        _reap(procs + pubs)
    return out


def _phase_result(
    phase: int,
    pubs: list[dict[str, Any]],
    subs: list[dict[str, Any]],
    n_subs: int,
    n: int,
    cpu: float,
) -> dict[str, Any]:
    # Delivered to all: the latest receive time over every subscriber, -1 if one missed it.
    latest = [
        -1 if any(s["latest"][i] == 0 for s in subs) else max(s["latest"][i] for s in subs)
        for i in range(n)
    ]
    missing = sum(1 for t in latest if t < 0)
    delivered = sum(s["delivered"] for s in subs)
    problems = []
    if delivered != n * n_subs:
        problems.append(f"lost {n * n_subs - delivered} of {n * n_subs} deliveries")
    if missing:
        problems.append(f"{missing} events not delivered to every subscriber")
    for key in ("disorder", "duplicates"):
        if c := sum(s[key] for s in subs):
            problems.append(f"{c} {key}")
    if len({o for s in subs for o in s["orders"]}) > 1 and delivered == n * n_subs:
        problems.append("subscribers saw different orders")
    for err in {e for s in subs for e in s["errors"]} | {e for p in pubs for e in p["errors"]}:
        problems.append(err)
    if nerr := sum(p["n_errors"] for p in pubs):
        problems.append(f"{nerr} publish errors")
    tag = "lat" if phase == 0 else "burst"
    res: dict[str, Any] = {f"{tag}_check": "; ".join(problems) or "ok"}
    if phase == 0:
        sent = {k: v for p in pubs for k, v in p["sent"].items()}
        ms = [(latest[i] - sent[i]) / 1e6 for i in range(n) if latest[i] > 0 and i in sent]
        # The publisher waits for each answer, so a saturated daemon slows it below the
        # target rate (and shortens the latencies): report the rate actually achieved.
        t_span = max(p["t_end"] for p in pubs) - min(p["t_first"] for p in pubs)
        res.update(
            lat_p50=percentile(ms, 50), lat_p99=percentile(ms, 99), lat_rate=n / (t_span / 1e9)
        )
    else:
        t_first = min(p["t_first"] for p in pubs)
        t_pub = max(p["t_end"] for p in pubs)
        res.update(
            burst_rate=n / ((max(latest) - t_first) / 1e9),
            publish_rate=n / ((t_pub - t_first) / 1e9),
            cpu_us=cpu / n * 1e6,
        )
    return res


# --- report ------------------------------------------------------------------------------

LOWER, HIGHER = "lower", "higher"


def rows(results: dict[str, dict[str, Any]], plan: Plan) -> list[tuple[str, str, str]]:
    """(metric, result key, which direction is better)."""
    out = [
        ("start-up to first Version answer (ms, median)", "startup_ms", LOWER),
        ("idle RSS after start-up (MB)", "rss_mb", LOWER),
        ("idle PSS after start-up (MB)", "pss_mb", LOWER),
        ("Version latency p50, 1 client (ms)", "p50_ms", LOWER),
        ("Version latency p99, 1 client (ms)", "p99_ms", LOWER),
        ("Version calls/s, 1 client", "tput1", HIGHER),
        ("Version calls/s, 16 concurrent", "tput16", HIGHER),
        ("daemon CPU per Version call, 16 concurrent (us)", "tput16_cpu_us", LOWER),
    ]
    for n in plan.subscribers:
        out += [
            (f"events {n:>3} subs: publish->all p50 (ms)", f"ev{n}.lat_p50", LOWER),
            (f"events {n:>3} subs: publish->all p99 (ms)", f"ev{n}.lat_p99", LOWER),
            (f"events {n:>3} subs: paced rate achieved (/s)", f"ev{n}.lat_rate", HIGHER),
            (f"events {n:>3} subs: sustained events/s", f"ev{n}.burst_rate", HIGHER),
            (f"events {n:>3} subs: publish RPCs/s in burst", f"ev{n}.publish_rate", HIGHER),
            (f"events {n:>3} subs: daemon CPU per event (us)", f"ev{n}.cpu_us", LOWER),
        ]
    return out


def fmt(v: Any) -> str:
    if not isinstance(v, float):
        return "-" if v is None else str(v)
    if v >= 100:
        return f"{v:,.0f}"
    return f"{v:.2f}" if v >= 1 else f"{v:.3f}"


def print_table(results: dict[str, dict[str, Any]], plan: Plan, kinds: list[str]) -> None:
    table = [("metric", OURS, THEIRS, "ours/theirs", "better")]
    for label, key, better in rows(results, plan):
        ours = results.get(OURS, {}).get(key)
        theirs = results.get(THEIRS, {}).get(key)
        ratio = f"{ours / theirs:.2f}x" if ours and theirs else "-"
        table.append(
            (
                label,
                fmt(ours),
                fmt(theirs) if THEIRS in kinds else "n/a",
                ratio,
                f"{better} is better",
            )
        )
    widths = [max(len(r[i]) for r in table) for i in range(5)]
    for i, r in enumerate(table):
        print(
            " | ".join(
                c.ljust(w) if j == 0 else c.rjust(w)
                for j, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
        if i == 0:
            print("-+-".join("-" * w for w in widths))
    print()
    for kind in kinds:
        for n in plan.subscribers:
            res = results.get(kind, {})
            print(
                f"delivery check {kind}, {n} subs: paced {res.get(f'ev{n}.lat_check', '-')}, "
                f"burst {res.get(f'ev{n}.burst_check', '-')}"
            )
    if THEIRS not in kinds:
        print("containerd: not installed" if CONTAINERD is None else "containerd: skipped")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorter runs (about a minute)")
    ap.add_argument("--no-containerd", action="store_true", help="measure ours alone")
    args = ap.parse_args(argv)
    plan = QUICK if args.quick else Plan()
    kinds = [OURS] if args.no_containerd or CONTAINERD is None else [OURS, THEIRS]
    started = time.monotonic()
    results: dict[str, dict[str, Any]] = {k: {} for k in kinds}
    print(f"start-up and idle memory ({plan.startup_runs} runs each) ...", flush=True)
    for k, v in measure_startup(kinds, plan.startup_runs).items():
        results[k].update(v)
    daemons: dict[str, Daemon] = {}
    failures: list[str] = []
    try:
        for k in kinds:
            daemons[k] = make(k).start()
        for k in kinds:
            print(f"unary Version calls against {k} ...", flush=True)
            try:
                proc = daemons[k].proc
                assert proc is not None
                results[k].update(measure_unary(daemons[k].address, proc.pid, plan))
            except Exception as exc:  # report it and go on with the other measurements
                failures.append(f"unary against {k}: {exc!r}")
        for n in plan.subscribers:
            for k in kinds:  # one daemon after the other, per subscriber count
                print(f"events with {n} subscribers against {k} ...", flush=True)
                proc = daemons[k].proc
                assert proc is not None
                try:
                    ev = measure_events(daemons[k].address, proc.pid, n, plan)
                except Exception as exc:
                    failures.append(f"events with {n} subscribers against {k}: {exc!r}")
                    continue
                results[k].update({f"ev{n}.{key}": v for key, v in ev.items()})
    finally:
        for d in daemons.values():
            d.cleanup()
    print(
        f"\n(ran {time.monotonic() - started:.0f}s; {mp.cpu_count()} CPUs; "
        f"client load from separate spawned processes; events paced at {plan.event_rate}/s "
        f"for {plan.event_seconds}s, burst of {plan.burst} events from "
        f"{plan.publishers}x{plan.publisher_tasks} publishers in flight)\n"
    )
    print_table(results, plan, kinds)
    for f in failures:
        print(f"FAILED: {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
