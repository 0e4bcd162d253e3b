"""Builders for CRI configs and small waits, shared by the CRI tests."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import TYPE_CHECKING

from pycontainerd.api.cri.runtime.v1 import api_pb2
from tests.support.tasks import IMAGE

if TYPE_CHECKING:
    from pathlib import Path

    from tests.cri.conftest import CRI

WAIT = 30.0


def pod_config(
    name: str,
    log_dir: Path,
    *,
    uid: str | None = None,
    hostname: str = "",
    labels: dict[str, str] | None = None,
    ports: tuple[tuple[int, int], ...] = (),
) -> api_pb2.PodSandboxConfig:
    cfg = api_pb2.PodSandboxConfig(
        metadata=api_pb2.PodSandboxMetadata(
            name=name, namespace="default", uid=uid or uuid.uuid4().hex, attempt=0
        ),
        hostname=hostname or name,
        log_directory=str(log_dir),
        labels=labels or {},
        annotations={"test": name},
        dns_config=api_pb2.DNSConfig(servers=["10.96.0.10"], searches=["default.svc"]),
    )
    for host_port, container_port in ports:
        cfg.port_mappings.add(
            protocol=api_pb2.TCP, container_port=container_port, host_port=host_port,
            host_ip="127.0.0.1",
        )  # fmt: skip
    return cfg


def container_config(
    name: str, args: list[str], *, log_path: str = "", labels: dict[str, str] | None = None
) -> api_pb2.ContainerConfig:
    return api_pb2.ContainerConfig(
        metadata=api_pb2.ContainerMetadata(name=name),
        image=api_pb2.ImageSpec(image=IMAGE),
        command=args[:1],
        args=args[1:],
        envs=[api_pb2.KeyValue(key="GREETING", value=b"hello")],
        labels=labels or {"app": name},
        annotations={"note": name},
        log_path=log_path or f"{name}.log",
    )


async def run_pod(cri: CRI, cfg: api_pb2.PodSandboxConfig) -> str:
    resp = await cri.runtime.RunPodSandbox(api_pb2.RunPodSandboxRequest(config=cfg))
    return resp.pod_sandbox_id


async def start_container(
    cri: CRI, pod_id: str, pod_cfg: api_pb2.PodSandboxConfig, cfg: api_pb2.ContainerConfig
) -> str:
    resp = await cri.runtime.CreateContainer(
        api_pb2.CreateContainerRequest(pod_sandbox_id=pod_id, config=cfg, sandbox_config=pod_cfg)
    )
    await cri.runtime.StartContainer(api_pb2.StartContainerRequest(container_id=resp.container_id))
    return resp.container_id


async def remove_pod(cri: CRI, pod_id: str) -> None:
    await cri.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    await cri.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=pod_id))


async def status(cri: CRI, cid: str) -> api_pb2.ContainerStatus:
    resp = await cri.runtime.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid))
    return resp.status


async def wait_exited(cri: CRI, cid: str) -> api_pb2.ContainerStatus:
    deadline = time.monotonic() + WAIT
    while True:
        st = await status(cri, cid)
        if st.state == api_pb2.CONTAINER_EXITED or time.monotonic() > deadline:
            return st
        await asyncio.sleep(0.05)


def _read(path: Path, after: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(after)
            return f.read()
    except FileNotFoundError:
        return b""


async def wait_log(path: Path, needle: bytes, after: int = 0) -> bytes:
    """The log file's content past ``after`` once it holds ``needle`` (or what it has at
    the deadline)."""
    deadline = time.monotonic() + WAIT
    while True:
        data = await asyncio.to_thread(_read, path, after)
        if needle in data or time.monotonic() > deadline:
            return data
        await asyncio.sleep(0.05)
