"""The CRI plugin end to end: a kubelet's calls (crictl's flow) against the real daemon,
runc and CNI plugins, checking every status field a kubelet reads."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from pycontainerd.api.cri.runtime.v1 import api_pb2
from tests.client.registry_support import free_port
from tests.cri.helpers import (
    WAIT,
    container_config,
    pod_config,
    remove_pod,
    run_pod,
    start_container,
    status,
    wait_exited,
    wait_log,
)
from tests.support.tasks import IMAGE, pid_alive

if TYPE_CHECKING:
    from pathlib import Path

    from tests.cri.conftest import CRI
    from tests.support.daemon import Daemon

pytestmark = [pytest.mark.root]

LOG_LINE = re.compile(rb"^(\S+) (stdout|stderr) ([PF]) (.*)$")


async def test_version_and_status(cri: CRI) -> None:
    v = await cri.runtime.Version(api_pb2.VersionRequest())
    assert (v.runtime_name, v.runtime_api_version) == ("pycontainerd", "v1")
    st = await cri.runtime.Status(api_pb2.StatusRequest())
    conds = {c.type: c.status for c in st.status.conditions}
    assert conds == {"RuntimeReady": True, "NetworkReady": True}
    await cri.runtime.UpdateRuntimeConfig(
        api_pb2.UpdateRuntimeConfigRequest(
            runtime_config=api_pb2.RuntimeConfig(
                network_config=api_pb2.NetworkConfig(pod_cidr="10.0.0.0/24")
            )
        )
    )


async def test_images(cri: CRI) -> None:
    listed = await cri.images.ListImages(api_pb2.ListImagesRequest())
    [img] = [i for i in listed.images if IMAGE in i.repo_tags]
    assert img.id.startswith("sha256:") and img.size > 0
    assert any(d.startswith("example.com/tasks/busybox@sha256:") for d in img.repo_digests)
    by_id = await cri.images.ImageStatus(
        api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=img.id))
    )
    assert by_id.image.id == img.id
    missing = await cri.images.ImageStatus(
        api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image="example.com/none:1"))
    )
    assert not missing.HasField("image")
    fs = await cri.images.ImageFsInfo(api_pb2.ImageFsInfoRequest())
    assert fs.image_filesystems[0].used_bytes.value > 0


async def test_crictl_flow(cri: CRI, tmp_path: Path) -> None:
    pod_cfg = pod_config("flow", tmp_path, labels={"tier": "web"})
    pod = await run_pod(cri, pod_cfg)
    try:
        ps = (
            await cri.runtime.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod))
        ).status
        assert ps.id == pod and ps.state == api_pb2.SANDBOX_READY
        assert ps.metadata.name == "flow" and ps.labels["tier"] == "web"
        assert ps.network.ip and ps.created_at > 0
        listed = await cri.runtime.ListPodSandbox(
            api_pb2.ListPodSandboxRequest(
                filter=api_pb2.PodSandboxFilter(label_selector={"tier": "web"})
            )
        )
        assert [p.id for p in listed.items] == [pod]

        script = (
            "echo out $GREETING; echo err >&2; trap 'exit 0' TERM;"
            " while :; do sleep 1 & wait $!; done"
        )
        cfg = container_config("app", ["sh", "-c", script])
        created = await cri.runtime.CreateContainer(
            api_pb2.CreateContainerRequest(pod_sandbox_id=pod, config=cfg, sandbox_config=pod_cfg)
        )
        cid = created.container_id
        st = await status(cri, cid)
        assert st.state == api_pb2.CONTAINER_CREATED and st.created_at > 0 and st.started_at == 0
        assert st.image.user_specified_image == IMAGE
        assert st.image_ref.startswith("example.com/tasks/busybox@sha256:")
        assert st.log_path == str(tmp_path / "app.log")

        await cri.runtime.StartContainer(api_pb2.StartContainerRequest(container_id=cid))
        st = await status(cri, cid)
        assert st.state == api_pb2.CONTAINER_RUNNING and st.started_at >= st.created_at

        ex = await cri.runtime.ExecSync(
            api_pb2.ExecSyncRequest(container_id=cid, cmd=["sh", "-c", "hostname; exit 3"])
        )
        assert (ex.stdout, ex.exit_code) == (b"flow\n", 3)
        resolv = await cri.runtime.ExecSync(
            api_pb2.ExecSyncRequest(container_id=cid, cmd=["cat", "/etc/resolv.conf"])
        )
        assert b"nameserver 10.96.0.10" in resolv.stdout
        with pytest.raises(grpc.aio.AioRpcError) as slow:
            await cri.runtime.ExecSync(
                api_pb2.ExecSyncRequest(container_id=cid, cmd=["sleep", "30"], timeout=1)
            )
        assert slow.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

        data = await wait_log(tmp_path / "app.log", b"stderr F err")
        lines = [LOG_LINE.match(x) for x in data.splitlines()]
        assert all(lines), data
        got = {(m.group(2), m.group(3), m.group(4)) for m in lines if m}
        assert {(b"stdout", b"F", b"out hello"), (b"stderr", b"F", b"err")} <= got

        await cri.runtime.ReopenContainerLog(api_pb2.ReopenContainerLogRequest(container_id=cid))
        await cri.runtime.StopContainer(api_pb2.StopContainerRequest(container_id=cid, timeout=10))
        st = await status(cri, cid)
        assert st.state == api_pb2.CONTAINER_EXITED
        assert (st.exit_code, st.reason) == (0, "Completed")
        assert st.finished_at >= st.started_at > 0

        listed_c = await cri.runtime.ListContainers(
            api_pb2.ListContainersRequest(filter=api_pb2.ContainerFilter(pod_sandbox_id=pod))
        )
        assert [(c.id, c.state) for c in listed_c.containers] == [(cid, api_pb2.CONTAINER_EXITED)]
        await cri.runtime.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=cid))
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            await status(cri, cid)
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND

        await cri.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod))
        ps = (
            await cri.runtime.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod))
        ).status
        assert ps.state == api_pb2.SANDBOX_NOTREADY
    finally:
        await remove_pod(cri, pod)
    listed = await cri.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest())
    assert pod not in [p.id for p in listed.items]


async def test_exit_codes(cri: CRI, tmp_path: Path) -> None:
    pod_cfg = pod_config("exits", tmp_path)
    pod = await run_pod(cri, pod_cfg)
    try:
        bad = await start_container(
            cri, pod, pod_cfg, container_config("bad", ["sh", "-c", "echo bye; exit 3"])
        )
        good = await start_container(cri, pod, pod_cfg, container_config("good", ["true"]))
        st = await wait_exited(cri, bad)
        assert (st.state, st.exit_code, st.reason) == (api_pb2.CONTAINER_EXITED, 3, "Error")
        assert st.finished_at >= st.started_at > 0
        st = await wait_exited(cri, good)
        assert (st.exit_code, st.reason) == (0, "Completed")
        data = await wait_log(tmp_path / "bad.log", b"bye")
        assert data.endswith(b" stdout F bye\n")
    finally:
        await remove_pod(cri, pod)


async def test_bad_input(cri: CRI, tmp_path: Path) -> None:
    unknown = "0" * 64
    calls: list[Any] = [
        cri.runtime.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=unknown)),
        cri.runtime.StartContainer(api_pb2.StartContainerRequest(container_id=unknown)),
        cri.runtime.StopContainer(api_pb2.StopContainerRequest(container_id=unknown)),
        cri.runtime.ExecSync(api_pb2.ExecSyncRequest(container_id=unknown, cmd=["true"])),
        cri.runtime.PodSandboxStatus(api_pb2.PodSandboxStatusRequest(pod_sandbox_id=unknown)),
        cri.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=unknown)),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # Removing what is not there is not an error (kubelet retries removals).
    await cri.runtime.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=unknown))
    await cri.runtime.RemovePodSandbox(api_pb2.RemovePodSandboxRequest(pod_sandbox_id=unknown))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cri.runtime.RunPodSandbox(
            api_pb2.RunPodSandboxRequest(config=api_pb2.PodSandboxConfig())
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    pod_cfg = pod_config("dup", tmp_path, uid="dup-uid")
    pod = await run_pod(cri, pod_cfg)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as dup:
            await run_pod(cri, pod_cfg)
        assert dup.value.code() == grpc.StatusCode.UNKNOWN
        assert f"is reserved for '{pod}'" in (dup.value.details() or "")
        cfg = container_config("c", ["sleep", "1000"])
        first = await cri.runtime.CreateContainer(
            api_pb2.CreateContainerRequest(pod_sandbox_id=pod, config=cfg, sandbox_config=pod_cfg)
        )
        with pytest.raises(grpc.aio.AioRpcError) as dup:
            await cri.runtime.CreateContainer(
                api_pb2.CreateContainerRequest(
                    pod_sandbox_id=pod, config=cfg, sandbox_config=pod_cfg
                )
            )
        assert dup.value.code() == grpc.StatusCode.UNKNOWN
        assert first.container_id in (dup.value.details() or "")
        bad = container_config("noimg", ["true"])
        bad.image.image = "example.com/absent:1"
        with pytest.raises(grpc.aio.AioRpcError) as noimg:
            await cri.runtime.CreateContainer(
                api_pb2.CreateContainerRequest(pod_sandbox_id=pod, config=bad)
            )
        assert noimg.value.code() == grpc.StatusCode.NOT_FOUND
        listed = await cri.runtime.ListContainers(
            api_pb2.ListContainersRequest(filter=api_pb2.ContainerFilter(pod_sandbox_id=pod))
        )
        assert [c.id for c in listed.containers] == [first.container_id]
    finally:
        await remove_pod(cri, pod)
    # Everything is gone with the pod, so its names are free again.
    pod = await run_pod(cri, pod_cfg)
    await remove_pod(cri, pod)


async def test_pods_reach_each_other(cri: CRI, tmp_path: Path) -> None:
    server_cfg = pod_config("server", tmp_path)
    client_cfg = pod_config("client", tmp_path)
    server = await run_pod(cri, server_cfg)
    client = await run_pod(cri, client_cfg)
    try:
        web = "echo pong > /tmp/index.html; exec httpd -f -p 8080 -h /tmp"
        await start_container(cri, server, server_cfg, container_config("web", ["sh", "-c", web]))
        await start_container(cri, client, client_cfg, container_config("sh", ["sleep", "1000"]))
        ip = (
            await cri.runtime.PodSandboxStatus(
                api_pb2.PodSandboxStatusRequest(pod_sandbox_id=server)
            )
        ).status.network.ip
        [cid] = [
            c.id
            for c in (await cri.runtime.ListContainers(api_pb2.ListContainersRequest())).containers
            if c.pod_sandbox_id == client
        ]
        # httpd may still be starting: retry inside the container for a while.
        fetch = (
            f"for i in $(seq 50); do wget -q -O - http://{ip}:8080/ && exit 0; sleep 0.1; done;"
            " exit 1"
        )
        ex = await cri.runtime.ExecSync(
            api_pb2.ExecSyncRequest(container_id=cid, cmd=["sh", "-c", fetch], timeout=20)
        )
        assert (ex.exit_code, ex.stdout) == (0, b"pong\n"), ex.stderr
    finally:
        await remove_pod(cri, server)
        await remove_pod(cri, client)


async def test_daemon_restart_keeps_pods(cri: CRI, cri_daemon: Daemon, tmp_path: Path) -> None:
    pod_cfg = pod_config("survivor", tmp_path)
    pod = await run_pod(cri, pod_cfg)
    try:
        cid = await start_container(
            cri,
            pod,
            pod_cfg,
            container_config("ticker", ["sh", "-c", "while :; do echo tick; sleep 0.2; done"]),
        )
        before_pods = await cri.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest())
        before = await cri.runtime.ListContainers(api_pb2.ListContainersRequest())
        info = await cri.runtime.ContainerStatus(
            api_pb2.ContainerStatusRequest(container_id=cid, verbose=True)
        )
        pid = json.loads(info.info["info"])["pid"]
        assert pid_alive(pid)
        cri_daemon.kill9()
        cri_daemon.start()
        after_pods = await cri.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest())
        after = await cri.runtime.ListContainers(api_pb2.ListContainersRequest())
        assert sorted(p.SerializeToString() for p in after_pods.items) == sorted(
            p.SerializeToString() for p in before_pods.items
        )
        assert sorted(c.SerializeToString() for c in after.containers) == sorted(
            c.SerializeToString() for c in before.containers
        )
        assert pid_alive(pid)
        st = await status(cri, cid)
        assert st.state == api_pb2.CONTAINER_RUNNING
        # The log writer outlived the daemon too: new ticks keep arriving.
        log = tmp_path / "ticker.log"
        size = log.stat().st_size
        data = await wait_log(log, b"tick", after=size)
        assert b"stdout F tick" in data
        ex = await cri.runtime.ExecSync(api_pb2.ExecSyncRequest(container_id=cid, cmd=["true"]))
        assert ex.exit_code == 0
    finally:
        await remove_pod(cri, pod)


def _http_get(port: int) -> bytes:
    """GET / on 127.0.0.1:port, retried while the pod's server starts (bounded)."""
    deadline = time.monotonic() + 20
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
                chunks = []
                while chunk := s.recv(4096):
                    chunks.append(chunk)
                data = b"".join(chunks)
                if data:
                    return data
        except OSError:
            pass
        if time.monotonic() > deadline:
            return b""
        time.sleep(0.1)


async def test_port_mapping_from_localhost(cri: CRI, tmp_path: Path) -> None:
    port = free_port()
    pod_cfg = pod_config("published", tmp_path, ports=((port, 8080),))
    pod = await run_pod(cri, pod_cfg)
    try:
        web = "echo published > /tmp/index.html; exec httpd -f -p 8080 -h /tmp"
        await start_container(cri, pod, pod_cfg, container_config("web", ["sh", "-c", web]))
        data = await asyncio.to_thread(_http_get, port)
        assert data.endswith(b"published\n"), data
    finally:
        await remove_pod(cri, pod)
    # The mapping went with the pod.
    assert await asyncio.to_thread(_http_get_once, port) == b""


def _http_get_once(port: int) -> bytes:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            return s.recv(4096)
    except OSError:
        return b""


async def test_security_context(cri: CRI, tmp_path: Path) -> None:
    pod_cfg = pod_config("secure", tmp_path)
    pod = await run_pod(cri, pod_cfg)
    try:
        cfg = container_config("locked", ["sleep", "1000"])
        sc = cfg.linux.security_context
        sc.run_as_user.value = 65534
        sc.readonly_rootfs = True
        sc.no_new_privs = True
        sc.capabilities.drop_capabilities.append("ALL")
        sc.capabilities.add_capabilities.append("NET_BIND_SERVICE")
        cfg.linux.resources.memory_limit_in_bytes = 64 << 20
        cfg.linux.resources.oom_score_adj = -500  # clamped to the daemon's own on this host
        cid = await start_container(cri, pod, pod_cfg, cfg)
        script = "id -u; grep -E '^(CapEff|NoNewPrivs)' /proc/self/status; touch /x || echo ro"
        ex = await cri.runtime.ExecSync(
            api_pb2.ExecSyncRequest(container_id=cid, cmd=["sh", "-c", script])
        )
        lines = ex.stdout.decode().split("\n")
        assert lines[0] == "65534"
        assert lines[1].split() == ["CapEff:", "0000000000000000"]  # not root: none effective
        assert lines[2].split() == ["NoNewPrivs:", "1"]
        assert lines[3] == "ro"
    finally:
        await remove_pod(cri, pod)


async def test_lists_follow_state_and_filters(cri: CRI, tmp_path: Path) -> None:
    """List answers are cached per item and state: every change of state shows, and the
    filters (id prefix, pod, state, labels) select from the current states."""
    pod_cfg = pod_config("lister", tmp_path, labels={"tier": "list"})
    pod = await run_pod(cri, pod_cfg)
    try:
        quick = await start_container(
            cri, pod, pod_cfg, container_config("quick", ["true"], labels={"role": "a"})
        )
        slow = await start_container(
            cri, pod, pod_cfg, container_config("slow", ["sleep", "1000"], labels={"role": "b"})
        )
        await wait_exited(cri, quick)

        async def ids(**flt: Any) -> set[str]:
            req = api_pb2.ListContainersRequest(filter=api_pb2.ContainerFilter(**flt))
            return {c.id for c in (await cri.runtime.ListContainers(req)).containers}

        exited = api_pb2.ContainerStateValue(state=api_pb2.CONTAINER_EXITED)
        running = api_pb2.ContainerStateValue(state=api_pb2.CONTAINER_RUNNING)
        assert await ids(pod_sandbox_id=pod) == {quick, slow}
        assert await ids(pod_sandbox_id=pod, state=exited) == {quick}
        assert await ids(pod_sandbox_id=pod, state=running) == {slow}
        assert await ids(label_selector={"role": "b"}) == {slow}
        assert await ids(id=slow[:12]) == {slow}
        await cri.runtime.StopContainer(api_pb2.StopContainerRequest(container_id=slow, timeout=1))
        assert await ids(pod_sandbox_id=pod, state=exited) == {quick, slow}
        listed = await cri.runtime.ListContainers(api_pb2.ListContainersRequest())
        [entry] = [c for c in listed.containers if c.id == slow]
        assert entry.state == api_pb2.CONTAINER_EXITED
        assert entry.labels["role"] == "b"
        assert entry.metadata.name == "slow"
        ready = api_pb2.PodSandboxStateValue(state=api_pb2.SANDBOX_READY)
        pods = await cri.runtime.ListPodSandbox(
            api_pb2.ListPodSandboxRequest(filter=api_pb2.PodSandboxFilter(state=ready))
        )
        assert pod in {p.id for p in pods.items}
        await cri.runtime.StopPodSandbox(api_pb2.StopPodSandboxRequest(pod_sandbox_id=pod))
        pods = await cri.runtime.ListPodSandbox(
            api_pb2.ListPodSandboxRequest(filter=api_pb2.PodSandboxFilter(state=ready))
        )
        assert pod not in {p.id for p in pods.items}
    finally:
        await remove_pod(cri, pod)
    assert pod not in {
        p.id for p in (await cri.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest())).items
    }


async def test_pod_after_its_image_snapshots_went(
    cri: CRI, cri_daemon: Daemon, tmp_path: Path
) -> None:
    """The unpacked chain an image's pods start from is remembered; when its snapshots
    are gone (removed, collected), the next pod unpacks the image again."""
    pod_cfg = pod_config("chain-a", tmp_path)
    pod = await run_pod(cri, pod_cfg)
    await remove_pod(cri, pod)
    removed = 0
    while True:  # every committed snapshot, children first
        out = cri_daemon.ctr("snapshots", "ls", namespace="k8s.io").stdout
        rows = [line.split() for line in out.splitlines()[1:]]
        parents = {r[1] for r in rows if len(r) == 3}
        leaves = [r[0] for r in rows if r[-1] == "Committed" and r[0] not in parents]
        if not leaves:
            break
        for key in leaves:
            cri_daemon.ctr("snapshots", "rm", key, namespace="k8s.io")
            removed += 1
    assert removed
    pod_cfg = pod_config("chain-b", tmp_path)
    pod = await run_pod(cri, pod_cfg)
    try:
        cid = await start_container(cri, pod, pod_cfg, container_config("c", ["sleep", "100"]))
        assert (await status(cri, cid)).state == api_pb2.CONTAINER_RUNNING
    finally:
        await remove_pod(cri, pod)


async def test_images_changed_by_another_client_show(cri: CRI, cri_daemon: Daemon) -> None:
    """The image catalog's listing is cached until an image event: a tag added or removed
    with ctr shows in ImageStatus and ListImages."""

    async def status_of(ref: str) -> str:
        resp = await cri.images.ImageStatus(
            api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=ref))
        )
        return resp.image.id

    async def eventually(ref: str, present: bool) -> None:
        deadline = time.monotonic() + WAIT
        while bool(await status_of(ref)) != present:
            assert time.monotonic() < deadline, f"{ref} present={present} never seen"
            await asyncio.sleep(0.02)

    name = "docker.io/library/retagged:1"
    before = await cri.images.ListImages(api_pb2.ListImagesRequest())  # fills the cache
    assert not any(name in i.repo_tags for i in before.images)
    assert not await status_of(name)
    cri_daemon.ctr("images", "tag", IMAGE, name, namespace="k8s.io")
    try:
        await eventually(name, True)
        listed = await cri.images.ListImages(api_pb2.ListImagesRequest())
        assert any(name in i.repo_tags for i in listed.images)
    finally:
        cri_daemon.ctr("images", "rm", name, namespace="k8s.io")
    await eventually(name, False)
