"""Content/Write throughput: stream a blob the way ctr does and report MB/s.

Usage::

    .venv/bin/python tests/bench/bench_content_write.py [--size-mb 100] [--runs 3]
    .venv/bin/python tests/bench/bench_content_write.py --address unix:///run/containerd/containerd.sock

Without ``--address`` it starts our content service (exchange, metadata, content store,
content-service and gRPC plugins, through their registrations) in a child process on a
private unix socket, so client and server do not share an interpreter. With ``--address`` it
drives any daemon speaking the API — real containerd included — for the comparison.

The client follows ctr's exchange (ctr-contract.md §2.1): STAT with ref and total, an empty
STAT, WRITE messages of 1 MiB each answered one by one, COMMIT with the expected digest.
Each run writes fresh random bytes under a new ref and deletes the blob afterwards. The
figure includes the client's own cost (a Python grpc client), which is the same for both
daemons. Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import grpc.aio

from pycontainerd.api.services.content.v1 import content_pb2, content_pb2_grpc

MiB = 1 << 20
OPTIONS = [
    ("grpc.max_receive_message_length", 16 * MiB),
    ("grpc.max_send_message_length", 16 * MiB),
]
NS = (("containerd-namespace", "bench"),)


async def serve(socket: str, root: Path) -> None:
    """Child-process mode: our content plugins behind a grpc.aio server until killed."""
    from pycontainerd.grpc.interceptors import ContextInterceptor
    from pycontainerd.plugin import InitContext, Plugin, PluginSet, PluginType
    from pycontainerd.plugins import content, core, events

    plugins = PluginSet()
    for reg in (
        events.exchange,
        core.metadata,
        content.content,
        content.content_service,
        content.service,
    ):
        ic = InitContext(
            registration=reg,
            root=root / reg.uri,
            state=root / "state" / reg.uri,
            config=None,
            plugins=plugins,
        )
        plugins.add(Plugin(registration=reg, instance=await reg.init(ic)))
    svc = plugins.get(PluginType.GRPC, "content")
    assert svc is not None
    server = grpc.aio.server(interceptors=[ContextInterceptor()], options=OPTIONS)
    svc.instance.register(server)
    server.add_insecure_port(socket)
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


async def write_once(stub: content_pb2_grpc.ContentAsyncStub, data: bytes, ref: str) -> float:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    call = stub.Write(metadata=NS)

    async def ask(req: content_pb2.WriteContentRequest) -> content_pb2.WriteContentResponse:
        await call.write(req)
        resp = await call.read()
        assert isinstance(resp, content_pb2.WriteContentResponse)
        return resp

    start = time.perf_counter()
    await ask(content_pb2.WriteContentRequest(action=content_pb2.STAT, ref=ref, total=len(data)))
    await ask(content_pb2.WriteContentRequest())
    view = memoryview(data)
    for off in range(0, len(data), MiB):
        await ask(
            content_pb2.WriteContentRequest(
                action=content_pb2.WRITE, offset=off, data=bytes(view[off : off + MiB])
            )
        )
    done = await ask(
        content_pb2.WriteContentRequest(
            action=content_pb2.COMMIT, total=len(data), offset=len(data), expected=digest
        )
    )
    await call.done_writing()
    elapsed = time.perf_counter() - start
    assert done.digest == digest, done
    await stub.Delete(content_pb2.DeleteContentRequest(digest=digest), metadata=NS)
    return elapsed


async def bench(address: str, size: int, runs: int) -> list[float]:
    async with grpc.aio.insecure_channel(address, options=OPTIONS) as channel:
        stub = content_pb2_grpc.ContentStub(channel)
        rates = []
        for i in range(runs):
            data = os.urandom(size)
            elapsed = await write_once(stub, data, f"bench-{os.getpid()}-{i}-{time.time_ns()}")
            rates.append(size / MiB / elapsed)
        return rates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", help="unix:///path of a running daemon (default: ours)")
    parser.add_argument("--size-mb", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--serve", nargs=2, metavar=("SOCKET", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve[0], Path(args.serve[1])))
        return 0

    child = None
    tmp = None
    address = args.address
    if address is None:
        tmp = Path(tempfile.mkdtemp(prefix="pcd-bench-", dir="/tmp"))
        address = f"unix://{tmp}/s.sock"
        child = subprocess.Popen(
            [sys.executable, __file__, "--serve", address, str(tmp / "root")],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        if child.stdout.readline().strip() != "ready":
            raise SystemExit("server did not start")
    try:
        rates = asyncio.run(bench(address, args.size_mb * MiB, args.runs))
    finally:
        if child is not None:
            child.terminate()
            child.wait()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    target = args.address or "pycontainerd (in-process content service)"
    print(
        f"{target}: {args.size_mb} MiB x {args.runs}: "
        + ", ".join(f"{r:.0f}" for r in rates)
        + f" MiB/s (best {max(rates):.0f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
