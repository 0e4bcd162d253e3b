"""Benchmark: the CRI, ours beside containerd's CRI plugin, driven as a kubelet would.

Both daemons run side by side on private roots with the same two images in namespace
``k8s.io`` (busybox, and a pause-like image whose entrypoint idles, used as the sandbox
image by both), the same shim (``io.containerd.runc.v2``), the same CNI plugins on
bridges and subnets of their own, and ``restrict_oom_score_adj`` on. Measured over the CRI
socket with one Python gRPC client:

- RunPodSandbox + CreateContainer + StartContainer, one pod after another: median and p90
  latency over 20 pods;
- 30 pods (sandbox + one container each) started concurrently: pods per second until the
  last container started;
- ListContainers with 100 containers (20 pods of 5, created): median latency of 200 calls.

    .venv/bin/python -m tests.bench.bench_cri [--pods 20] [--concurrent 30] [--list 100]

containerd's side is skipped (with a note) when its binary is missing.
"""

from __future__ import annotations

import argparse
import asyncio
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
RUNTIME = "io.containerd.runc.v2"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- daemons --------------------------------------------------------------------------------


def ours_config(bridge: str, subnet: str) -> str:
    return (
        "version = 2\n"
        '[plugins."io.containerd.grpc.v1.cri"]\n'
        f'sandbox_image = "{PAUSE}"\n'
        f'runtime = "{RUNTIME}"\n'
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
        self.results: dict[str, float] = {}

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

    async def sequential(self, n: int) -> None:
        times = []
        for i in range(n):
            t0 = time.perf_counter()
            await self.pod(f"seq{i}")
            times.append(time.perf_counter() - t0)
        self.results["seq_median_ms"] = statistics.median(times) * 1000
        self.results["seq_p90_ms"] = statistics.quantiles(times, n=10)[-1] * 1000
        await self.cleanup()

    async def concurrent(self, n: int) -> None:
        t0 = time.perf_counter()
        await asyncio.gather(*(self.pod(f"con{i}") for i in range(n)))
        self.results["concurrent_pods_per_s"] = n / (time.perf_counter() - t0)
        await self.cleanup()

    async def list_containers(self, n: int, calls: int = 200) -> None:
        per_pod = 5
        for i in range(0, n, per_pod):
            await self.pod(f"list{i}", containers=min(per_pod, n - i), start=False)
        req = api_pb2.ListContainersRequest()
        got = len((await self.rt.ListContainers(req)).containers)
        assert got == n, f"{self.name}: {got} containers listed, {n} expected"
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            await self.rt.ListContainers(req)
            times.append(time.perf_counter() - t0)
        self.results["list_median_ms"] = statistics.median(times) * 1000
        await self.cleanup()


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


async def run_one(
    name: str, d: Daemon, args: argparse.Namespace, log_dir: Path
) -> dict[str, float]:
    async with Bench(name, d.address, log_dir) as b:
        log(f"{name}: {args.pods} sequential pods")
        await b.sequential(args.pods)
        log(f"{name}: {args.concurrent} concurrent pods")
        await b.concurrent(args.concurrent)
        log(f"{name}: ListContainers with {args.list} containers")
        await b.list_containers(args.list)
        return b.results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pods", type=int, default=20)
    p.add_argument("--concurrent", type=int, default=30)
    p.add_argument("--list", type=int, default=100)
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
    ours_d = QuietDaemon(config=ours_config(*ours_net))
    theirs_d: ContainerdCRI | None = None
    results: dict[str, dict[str, float]] = {}
    try:
        ours_d.start()
        import_images(ours_d, archive)
        results["ours"] = asyncio.run(run_one("pycontainerd", ours_d, args, work / "logs-ours"))
        ours_d.stop()
        if CONTAINERD is None:
            log("containerd is not installed: its column stays empty")
        else:
            theirs_d = ContainerdCRI(*theirs_net)
            theirs_d.start()
            import_images(theirs_d, archive)
            results["theirs"] = asyncio.run(
                run_one("containerd", theirs_d, args, work / "logs-theirs")
            )
    finally:
        ours_d.cleanup()
        if theirs_d is not None:
            theirs_d.cleanup()
        for bridge in (ours_net[0], theirs_net[0]):
            delete_bridge(bridge)
        subprocess.run(["rm", "-rf", str(work)], check=False)
    print(report(results["ours"], results.get("theirs")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
