"""Benchmark: the CRI, ours beside containerd's CRI plugin, driven as a kubelet would.

Both daemons run side by side on private roots with the same two images in namespace
``k8s.io`` (busybox, and a pause-like image whose entrypoint idles, used as the sandbox
image by both), each with its default shim (ours: ``io.containerd.pyrunc.v1``;
containerd: ``io.containerd.runc.v2``; ``--our-runtime io.containerd.runc.v2`` puts both
on containerd's), the same CNI plugins on bridges and subnets of their own, and
``restrict_oom_score_adj`` on. Measured over the CRI
socket with one Python gRPC client:

- RunPodSandbox + CreateContainer + StartContainer, one pod after another: median and p90
  latency over 20 pods;
- 30 pods (sandbox + one container each) started concurrently: pods per second until the
  last container started, median of 3 rounds;
- ListContainers with 100 containers (20 pods of 5, created): median latency of 200 calls.

Both daemons run at once and the measures interleave (pods alternate one by one, rounds
and list batches go by turns), so a busy moment of the shared machine hits both alike.

    .venv/bin/python -m tests.bench.bench_cri [--pods 20] [--concurrent 30] [--list 100]

containerd's side is skipped (with a note) when its binary is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc
import grpc.aio
from pyroute2 import IPRoute

from pycontainerd.api.cri.runtime.v1 import api_pb2, api_pb2_grpc
from tests.bench.bench_core import QuietDaemon
from tests.network.conftest import _pick_subnet
from tests.support.containerd import CONTAINERD, Containerd
from tests.support.daemon import CTR, Daemon
from tests.support.images import busybox_image, write_oci_archive
from tests.support.tasks import IMAGE

PAUSE = "example.com/bench/pause:1"
IDLE = ("sh", "-c", "trap 'exit 0' TERM; while :; do sleep 3600 & wait $!; done")
RUNTIME = "io.containerd.runc.v2"  # containerd's shim: containerd's default, ours optional
OUR_RUNTIME = "io.containerd.pyrunc.v1"  # our CRI plugin's default


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- daemons --------------------------------------------------------------------------------


def ours_config(bridge: str, subnet: str, runtime: str = RUNTIME) -> str:
    return (
        "version = 2\n"
        '[plugins."io.containerd.grpc.v1.cri"]\n'
        f'sandbox_image = "{PAUSE}"\n'
        f'runtime = "{runtime}"\n'
        f'cni_bridge = "{bridge}"\n'
        f'cni_subnet = "{subnet}"\n'
        "restrict_oom_score_adj = true\n"
    )


class ContainerdCRI(Containerd):
    """containerd 1.6 with its CRI plugin on, its own CNI config dir and bridge."""

    def __init__(self, bridge: str, subnet: str) -> None:
        super().__init__()
        cni_conf = self.base / "cni"
        cni_conf.mkdir()
        conflist = {
            "cniVersion": "1.0.0",
            "name": f"ctd-bench-{bridge}",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": bridge,
                    "isGateway": True,
                    "ipMasq": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": subnet}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(self.base / "ipam"),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }
        (cni_conf / "10-bench.conflist").write_text(json.dumps(conflist))
        # Containerd wrote a config disabling its CRI: replace it by one enabling it.
        self.config_path.write_text(
            "version = 2\n"
            '[plugins."io.containerd.grpc.v1.cri"]\n'
            f'  sandbox_image = "{PAUSE}"\n'
            "  restrict_oom_score_adj = true\n"
            '[plugins."io.containerd.grpc.v1.cri".containerd]\n'
            f'  default_runtime_name = "runc"\n'
            '[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]\n'
            f'  runtime_type = "{RUNTIME}"\n'
            '[plugins."io.containerd.grpc.v1.cri".cni]\n'
            '  bin_dir = "/usr/lib/cni"\n'
            f'  conf_dir = "{cni_conf}"\n'
        )


def import_images(d: Daemon, archive: Path) -> None:
    d.ctr("images", "import", str(archive), namespace="k8s.io")


def delete_bridge(name: str) -> None:
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=name)
        if idx:
            ipr.link("del", index=idx[0])


# --- the workload -----------------------------------------------------------------------------


def pod_cfg(tag: str, log_dir: Path) -> api_pb2.PodSandboxConfig:
    return api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(
            name=tag, namespace="bench", uid=uuid.uuid4().hex, attempt=0
        ),
        hostname=tag,
        log_directory=str(log_dir),
    )


def ctr_cfg(name: str) -> api_pb2.ContainerConfig:
    return api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name=name),
        image=api_pb2.ImageSpec(image=IMAGE),
        command=list(IDLE[:1]),
        args=list(IDLE[1:]),
        log_path=f"{name}.log",
    )


class Bench:
    def __init__(self, name: str, address: str, log_dir: Path) -> None:
        self.name = name
        self.address = address
        self.log_dir = log_dir
        self.pods: list[str] = []
        self.seq: list[float] = []
        self.rates: list[float] = []
        self.lists: list[float] = []

    async def __aenter__(self) -> Bench:
        self.channel = grpc.aio.insecure_channel("unix:" + self.address)
        self.rt = api_pb2_grpc.RuntimeServiceStub(self.channel)
        await self.wait_ready()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.cleanup()
        await self.channel.close()

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while True:
            try:
                st = await self.rt.Status(api_pb2.StatusRequest())
                if all(c.status for c in st.status.conditions):
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: CRI not ready")
            await asyncio.sleep(0.2)

    async def pod(self, tag: str, containers: int = 1, start: bool = True) -> str:
        cfg = pod_cfg(tag, self.log_dir)
        pod = (await self.rt.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=cfg))).pod_sandbox_id
        self.pods.append(pod)
        for i in range(containers):
            cid = (
                await self.rt.CreateContainer(
                    api_pb2.CreateContainerRequest(
                        pod_sandbox_id=pod, config=ctr_cfg(f"c{i}"), sandbox_config=cfg
                    )
                )
            ).container_id
            if start:
                await self.rt.StartContainer(api_pb2.StartContainerRequest(container_id=cid))
        return pod

    async def cleanup(self) -> None:
        async def rm(pod: str) -> None:
            await self.rt.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod))
            await self.rt.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod))

        pods, self.pods = self.pods, []
        for i in range(0, len(pods), 10):
            await asyncio.gather(*(rm(p) for p in pods[i : i + 10]))

    async def timed_pod(self, tag: str) -> None:
        t0 = time.perf_counter()
        await self.pod(tag)
        self.seq.append(time.perf_counter() - t0)

    async def concurrent(self, n: int, round_: int) -> None:
        t0 = time.perf_counter()
        await asyncio.gather(*(self.pod(f"con{round_}-{i}") for i in range(n)))
        self.rates.append(n / (time.perf_counter() - t0))
        await self.cleanup()

    async def fill(self, n: int) -> None:
        per_pod = 5
        for i in range(0, n, per_pod):
            await self.pod(f"list{i}", containers=min(per_pod, n - i), start=False)
        got = len((await self.rt.ListContainers(api_pb2.ListContainersRequest())).containers)
        assert got == n, f"{self.name}: {got} containers listed, {n} expected"

    async def list_batch(self, calls: int) -> None:
        req = api_pb2.ListContainersRequest()
        for _ in range(calls):
            t0 = time.perf_counter()
            await self.rt.ListContainers(req)
            self.lists.append(time.perf_counter() - t0)

    def summary(self) -> dict[str, float]:
        return {
            "seq_median_ms": statistics.median(self.seq) * 1000,
            "seq_p90_ms": statistics.quantiles(self.seq, n=10)[-1] * 1000,
            "concurrent_pods_per_s": statistics.median(self.rates),
            "list_median_ms": statistics.median(self.lists) * 1000,
        }


ROWS = (
    ("seq_median_ms", "run+create+start, median (ms)", False),
    ("seq_p90_ms", "run+create+start, p90 (ms)", False),
    ("concurrent_pods_per_s", "concurrent pods (pods/s)", True),
    ("list_median_ms", "ListContainers, median (ms)", False),
)


def report(ours: dict[str, float], theirs: dict[str, float] | None) -> str:
    lines = [f"{'measure':36} {'pycontainerd':>13} {'containerd':>11} {'ratio':>7}  better"]
    for key, label, higher_better in ROWS:
        a = ours.get(key)
        b = theirs.get(key) if theirs else None
        ratio = f"{a / b:.2f}" if a and b else "-"
        verdict = "-"
        if a and b:
            verdict = "ours" if (a >= b if higher_better else a <= b) else "theirs"
        fa = f"{a:.1f}" if a else "-"
        fb = f"{b:.1f}" if b else "-"
        lines.append(f"{label:36} {fa:>13} {fb:>11} {ratio:>7}  {verdict}")
    lines.append("ratio = ours / containerd's (pods/s: higher is better, times: lower is better)")
    return "\n".join(lines)


async def run_all(
    daemons: dict[str, Daemon], args: argparse.Namespace, work: Path
) -> dict[str, dict[str, float]]:
    """Every measure interleaved between the daemons (same machine state for both):
    sequential pods alternate one by one, concurrent rounds and list batches by turns."""
    async with contextlib.AsyncExitStack() as stack:
        benches = [
            await stack.enter_async_context(Bench(name, d.address, work / f"logs-{name}"))
            for name, d in daemons.items()
        ]
        log(f"{args.pods} sequential pods each, alternating")
        for i in range(args.pods):
            for b in benches if i % 2 else benches[::-1]:
                await b.timed_pod(f"seq{i}")
        for b in benches:
            await b.cleanup()
        log(f"{args.concurrent} concurrent pods, {args.rounds} rounds each, by turns")
        for r in range(args.rounds):
            for b in benches if r % 2 else benches[::-1]:
                await b.concurrent(args.concurrent, r)
        log(f"ListContainers with {args.list} containers, batches by turns")
        for b in benches:
            await b.fill(args.list)
        for i in range(10):
            for b in benches if i % 2 else benches[::-1]:
                await b.list_batch(20)
        return {b.name: b.summary() for b in benches}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pods", type=int, default=20)
    p.add_argument("--concurrent", type=int, default=30)
    p.add_argument("--list", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3, help="rounds of concurrent pods")
    p.add_argument(
        "--our-runtime",
        default=OUR_RUNTIME,
        help=f"our daemon's CRI runtime (default {OUR_RUNTIME}, ours; {RUNTIME} is "
        "containerd's, which containerd uses)",
    )
    args = p.parse_args(argv)
    if os.geteuid() != 0 or CTR is None or shutil.which("runc") is None:
        log("needs root, runc and containerd's ctr")
        return 2
    work = Path(tempfile.mkdtemp(prefix="pcd-bcri-", dir="/tmp"))
    archive = work / "images.tar"
    bb = busybox_image()
    pause = dataclasses.replace(bb, entrypoint=IDLE, cmd=None)
    write_oci_archive(archive, {IMAGE: bb, PAUSE: pause})
    pid = os.getpid()
    ours_net = (f"pcdb{pid % 100000}", str(_pick_subnet(pid + 101)))
    taken = ipaddress.IPv4Network(ours_net[1])
    theirs_subnet = next(
        s for s in (_pick_subnet(pid + 211 + k) for k in range(8)) if not s.overlaps(taken)
    )
    theirs_net = (f"ctdb{pid % 100000}", str(theirs_subnet))
    # At containerd's log level (warn): the tests' debug logging costs CPU per request.
    # At containerd's log level (warn): the tests' debug logging costs CPU per request.
    daemons: dict[str, Daemon] = {
        "ours": QuietDaemon(config=ours_config(*ours_net, runtime=args.our_runtime))
    }
    if CONTAINERD is None:
        log("containerd is not installed: its column stays empty")
    else:
        daemons["theirs"] = ContainerdCRI(*theirs_net)
    try:
        for d in daemons.values():
            d.start()
            import_images(d, archive)
        results = asyncio.run(run_all(daemons, args, work))
    finally:
        for d in daemons.values():
            d.cleanup()
        for bridge in (ours_net[0], theirs_net[0]):
            delete_bridge(bridge)
        subprocess.run(["rm", "-rf", str(work)], check=False)
    print(f"shims: pycontainerd {args.our_runtime}, containerd {RUNTIME}")
    print(report(results["ours"], results.get("theirs")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
