"""Benchmark: Snapshots Prepare + Commit + Remove cycle latency, ours vs containerd's.

Runs the cycle over gRPC on a unix socket with the same Python client, in alternating
batches (so both see the same load on a shared machine), against

- our daemon, started as a process (``python -m pycontainerd serve``) on private paths
  with the default configuration, and
- Debian's real containerd 1.6 on private paths, when ``containerd`` is installed
  (``--no-containerd`` skips it),

and prints the median and p90 of each, and each daemon's CPU per cycle. Needs root
(snapshot dirs are chowned; overlayfs).

    .venv/bin/python -m tests.bench.bench_snapshots [--cycles 300] [--snapshotter overlayfs]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import grpc.aio

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from pycontainerd.api.services.leases.v1 import leases_pb2, leases_pb2_grpc  # noqa: E402
from pycontainerd.api.services.snapshots.v1 import snapshots_pb2 as pb  # noqa: E402
from pycontainerd.api.services.snapshots.v1 import snapshots_pb2_grpc  # noqa: E402
from tests.bench.bench_core import QuietDaemon  # noqa: E402
from tests.bench.common import CONFIG, cpu_seconds  # noqa: E402
from tests.support.containerd import Containerd  # noqa: E402

if TYPE_CHECKING:
    from tests.support.daemon import Daemon

NS = (("containerd-namespace", "bench"),)


class Target:
    """One server under test: a channel, a lease, and a committed base snapshot."""

    def __init__(self, address: str, snapshotter: str) -> None:
        self.address = address
        self.snapshotter = snapshotter
        self.samples: list[float] = []
        self._n = 0

    async def open(self) -> None:
        self.channel = grpc.aio.insecure_channel(f"unix://{self.address}")
        # Work under a lease, as ctr does: containerd's GC (triggered by the removals)
        # would otherwise collect the unreferenced snapshots mid-cycle.
        self.tag = time.time_ns()
        lease_id = f"bench-{self.tag}"
        await leases_pb2_grpc.LeasesStub(self.channel).Create(
            leases_pb2.CreateRequest(id=lease_id), metadata=NS
        )
        self.md = (*NS, ("containerd-lease", lease_id))
        self.stub = snapshots_pb2_grpc.SnapshotsStub(self.channel)
        self.base = f"bench-base-{self.tag}"
        await self.stub.Prepare(
            pb.PrepareSnapshotRequest(snapshotter=self.snapshotter, key=self.base + "-active"),
            metadata=self.md,
        )
        await self.stub.Commit(
            pb.CommitSnapshotRequest(
                snapshotter=self.snapshotter, name=self.base, key=self.base + "-active"
            ),
            metadata=self.md,
        )

    async def run(self, cycles: int, record: bool = True) -> None:
        """Prepare(parent=base) -> Commit -> Remove, ``cycles`` times, timing each cycle."""
        sn, md, stub = self.snapshotter, self.md, self.stub
        for _ in range(cycles):
            self._n += 1
            key = f"bench-{self.tag}-{self._n}"
            name = key + "-committed"
            t0 = time.perf_counter()
            await stub.Prepare(
                pb.PrepareSnapshotRequest(snapshotter=sn, key=key, parent=self.base), metadata=md
            )
            await stub.Commit(
                pb.CommitSnapshotRequest(snapshotter=sn, name=name, key=key), metadata=md
            )
            await stub.Remove(pb.RemoveSnapshotRequest(snapshotter=sn, key=name), metadata=md)
            if record:
                self.samples.append(time.perf_counter() - t0)

    async def close(self) -> None:
        await self.stub.Remove(
            pb.RemoveSnapshotRequest(snapshotter=self.snapshotter, key=self.base), metadata=self.md
        )
        await self.channel.close()


def report(label: str, samples: list[float]) -> float:
    med = statistics.median(samples)
    p90 = statistics.quantiles(samples, n=10)[-1]
    print(f"{label:>12}: median {med * 1e3:7.3f} ms  p90 {p90 * 1e3:7.3f} ms  (n={len(samples)})")
    return med


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--cycles", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--batch", type=int, default=20, help="cycles per target per round")
    ap.add_argument("--snapshotter", default="overlayfs")
    ap.add_argument("--no-containerd", action="store_true")
    args = ap.parse_args()
    compare = not args.no_containerd and shutil.which("containerd") is not None
    async with contextlib.AsyncExitStack() as stack:
        daemons: dict[str, Daemon] = {"pycontainerd": QuietDaemon(config=CONFIG)}
        if compare:
            daemons["containerd"] = Containerd()
        for d in daemons.values():
            stack.callback(d.cleanup)
            d.start()
        targets = {label: Target(d.address, args.snapshotter) for label, d in daemons.items()}
        cpu = dict.fromkeys(targets, 0.0)
        for t in targets.values():
            await t.open()
            stack.push_async_callback(t.close)
            await t.run(args.warmup, record=False)
        # Alternate batches so both servers see the same (possibly noisy) machine.
        done = 0
        while done < args.cycles:
            n = min(args.batch, args.cycles - done)
            for label, t in targets.items():
                proc = daemons[label].proc
                assert proc is not None
                c0 = cpu_seconds(proc.pid)
                await t.run(n)
                cpu[label] += cpu_seconds(proc.pid) - c0
            done += n
        medians = {label: report(label, t.samples) for label, t in targets.items()}
        for label, t in targets.items():
            print(f"{label:>12}: daemon CPU {cpu[label] / len(t.samples) * 1e3:.2f} ms per cycle")
    if not compare:
        print("containerd not compared (missing or --no-containerd)")
        return 0
    print(f"ratio ours/containerd: {medians['pycontainerd'] / medians['containerd']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
