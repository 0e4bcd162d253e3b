"""Benchmark: Snapshots Prepare + Commit + Remove cycle latency, ours vs containerd's.

Runs the cycle over gRPC on a unix socket with the same Python client, in alternating
batches (so both see the same load on a shared machine), against

- our in-process server (exchange, metadata, snapshotter, snapshots service and servicer
  loaded through their plugin registrations, production interceptor), and
- Debian's real containerd 1.6 on private paths, when ``containerd`` is installed
  (``--no-containerd`` skips it),

and prints the median and p90 of each. Needs root (snapshot dirs are chowned; overlayfs).

    .venv/bin/python tests/bench/bench_snapshots.py [--cycles 300] [--snapshotter overlayfs]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import grpc.aio

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from pycontainerd.api.services.leases.v1 import leases_pb2, leases_pb2_grpc  # noqa: E402
from pycontainerd.api.services.snapshots.v1 import snapshots_pb2 as pb  # noqa: E402
from pycontainerd.api.services.snapshots.v1 import snapshots_pb2_grpc  # noqa: E402
from pycontainerd.config import Config  # noqa: E402
from pycontainerd.grpc.interceptors import ContextInterceptor  # noqa: E402
from pycontainerd.plugin import PluginType, Registry  # noqa: E402
from pycontainerd.plugins import core, events  # noqa: E402
from pycontainerd.plugins import snapshots as snapshot_plugins  # noqa: E402
from pycontainerd.server.plugins import close_plugins, load_plugins  # noqa: E402

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

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


@contextlib.asynccontextmanager
async def our_server() -> AsyncIterator[str]:
    """Our plugins and servicers in this process; yields the socket path."""
    base = Path(tempfile.mkdtemp(prefix="pcd-bench-", dir="/tmp"))
    registry = Registry(
        [
            events.exchange,
            core.metadata,
            core.leases_service,
            core.leases,
            snapshot_plugins.overlayfs,
            snapshot_plugins.native,
            snapshot_plugins.snapshots_service,
            snapshot_plugins.service,
        ]
    )
    cfg = Config(root=str(base / "root"), state=str(base / "state"))
    plugins = await load_plugins(registry, cfg, address="", ttrpc_address="")
    server = grpc.aio.server(interceptors=[ContextInterceptor()])
    try:
        for grpc_id in ("snapshots", "leases"):
            grpc_plugin = plugins.get(PluginType.GRPC, grpc_id)
            assert grpc_plugin is not None and grpc_plugin.ok, grpc_plugin and grpc_plugin.error
            grpc_plugin.instance.register(server)
        address = str(base / "grpc.sock")
        server.add_insecure_port(f"unix://{address}")
        await server.start()
        yield address
    finally:
        await server.stop(None)
        await close_plugins(plugins)
        shutil.rmtree(base, ignore_errors=True)


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
        targets = {
            "pycontainerd": Target(await stack.enter_async_context(our_server()), args.snapshotter)
        }
        if compare:
            from tests.support.containerd import Containerd

            ctd = Containerd().start()
            stack.callback(ctd.cleanup)
            targets["containerd"] = Target(ctd.address, args.snapshotter)
        for t in targets.values():
            await t.open()
            stack.push_async_callback(t.close)
            await t.run(args.warmup, record=False)
        # Alternate batches so both servers see the same (possibly noisy) machine.
        done = 0
        while done < args.cycles:
            n = min(args.batch, args.cycles - done)
            for t in targets.values():
                await t.run(n)
            done += n
        medians = {label: report(label, t.samples) for label, t in targets.items()}
    if not compare:
        print("containerd not compared (missing or --no-containerd)")
        return 0
    print(f"ratio ours/containerd: {medians['pycontainerd'] / medians['containerd']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
