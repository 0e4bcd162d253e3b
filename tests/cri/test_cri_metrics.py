"""What kubelet observes without polling each object: CRI metrics (its
PodAndContainerStatsFromCRI: descriptors and per-pod metrics of a running pod) and the
container event stream (its Evented PLEG), through the real daemon's gRPC stubs."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import grpc
import pytest

from pycontainerd.api.cri.runtime.v1 import api_pb2
from pycontainerd.cri.stats import net_counters
from tests.cri.helpers import (
    container_config,
    pod_config,
    remove_pod,
    run_pod,
    start_container,
    status,
    wait_exited,
)

if TYPE_CHECKING:
    from pathlib import Path

    from tests.cri.conftest import CRI

# Keep 4 MiB of memory resident in a shell variable, then idle.
HOLD = (
    "x=$(dd if=/dev/zero bs=1024 count=4096 2>/dev/null | tr '\\0' a);"
    " trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done"
)
GATEWAY = "busybox ip route | busybox awk '/^default/ {print $3}'"


def test_net_counters() -> None:
    text = (
        "Inter-|   Receive |  Transmit\n face |bytes packets|bytes packets\n"
        "    lo: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16\n"
        "  eth0: 100 2 0 1 0 0 0 0 300 4 0 0 0 0 0 0\n"
    )
    assert net_counters(text) == {"eth0": [100, 2, 0, 1, 0, 0, 0, 0, 300, 4, 0, 0, 0, 0, 0, 0]}


async def _descriptors(cri: CRI) -> dict[str, api_pb2.MetricDescriptor]:
    resp = await cri.runtime.ListMetricDescriptors(api_pb2.ListMetricDescriptorsRequest())
    out = {d.name: d for d in resp.descriptors}
    assert len(out) == len(resp.descriptors)  # names are unique
    return out


@pytest.mark.root
async def test_metric_descriptors(cri: CRI) -> None:
    descs = await _descriptors(cri)
    for name in (
        "container_cpu_usage_seconds_total", "container_memory_usage_bytes",
        "container_memory_working_set_bytes", "container_spec_memory_limit_bytes",
        "container_network_receive_bytes_total", "container_network_transmit_bytes_total",
    ):  # fmt: skip
        assert name in descs, name
        assert descs[name].help
    for d in descs.values():
        assert list(d.label_keys[:3]) == ["id", "name", "image"], d.name
    assert list(descs["container_cpu_usage_seconds_total"].label_keys)[3:] == ["cpu"]
    assert list(descs["container_network_receive_bytes_total"].label_keys)[3:] == ["interface"]
    # Static: the same on every call, as kubelet reads them once.
    assert await _descriptors(cri) == descs


@pytest.mark.root
async def test_pod_sandbox_metrics(cri: CRI, tmp_path: Path) -> None:
    descs = await _descriptors(cri)
    pod_cfg = pod_config("metrics", tmp_path)
    pod = await run_pod(cri, pod_cfg)
    try:
        cfg = container_config("holder", ["sh", "-c", HOLD])
        cfg.linux.resources.memory_limit_in_bytes = 64 << 20
        cid = await start_container(cri, pod, pod_cfg, cfg)
        done = await start_container(cri, pod, pod_cfg, container_config("done", ["true"]))
        await wait_exited(cri, done)
        # Send something out of eth0 (an ARP request at least, answered or not).
        await cri.runtime.ExecSync(
            api_pb2.ExecSyncRequest(
                container_id=cid,
                cmd=["sh", "-c", f"busybox ping -c 1 -W 1 $({GATEWAY}) || true"],
                timeout=20,
            )
        )

        resp = await cri.runtime.ListPodSandboxMetrics(api_pb2.ListPodSandboxMetricsRequest())
        [pm] = [p for p in resp.pod_metrics if p.pod_sandbox_id == pod]
        # Every metric has a descriptor and one value per label key.
        every = [*pm.metrics, *(m for c in pm.container_metrics for m in c.metrics)]
        for m in every:
            assert m.name in descs, m.name
            assert len(m.label_values) == len(descs[m.name].label_keys), m.name
            assert m.timestamp > 0

        # Only running containers have figures.
        [cm] = pm.container_metrics
        assert cm.container_id == cid
        by_name = {m.name: m for m in cm.metrics}
        for m in cm.metrics:
            assert list(m.label_values[:3]) == [cid, "holder", cfg.image.image]
        cpu = by_name["container_cpu_usage_seconds_total"]
        assert (cpu.metric_type, cpu.label_values[3]) == (api_pb2.COUNTER, "total")
        usage = by_name["container_memory_usage_bytes"].value.value
        working = by_name["container_memory_working_set_bytes"].value.value
        assert usage >= working >= 4 << 20
        assert by_name["container_memory_working_set_bytes"].metric_type == api_pb2.GAUGE
        assert by_name["container_spec_memory_limit_bytes"].value.value == 64 << 20
        assert by_name["container_threads"].value.value >= 1
        started = (await status(cri, cid)).started_at
        assert by_name["container_start_time_seconds"].value.value == started // 1_000_000_000

        # The pod's own metrics: its network counters, per interface, loopback left out.
        net = {(m.name, m.label_values[3]): m for m in pm.metrics}
        assert {iface for _, iface in net} == {"eth0"}
        tx = net["container_network_transmit_bytes_total", "eth0"]
        assert tx.metric_type == api_pb2.COUNTER and tx.value.value > 0
        assert list(tx.label_values[:3]) == [pod, "metrics", tx.label_values[2]]
        assert tx.label_values[2]  # the sandbox image
    finally:
        await remove_pod(cri, pod)
    resp = await cri.runtime.ListPodSandboxMetrics(api_pb2.ListPodSandboxMetricsRequest())
    assert pod not in [p.pod_sandbox_id for p in resp.pod_metrics]


# ---------------------------------------------------------------------- container events


@pytest.mark.root
async def test_container_events(cri: CRI, tmp_path: Path) -> None:
    call = cri.runtime.GetContainerEvents(api_pb2.GetEventsRequest())
    await call.initial_metadata()  # subscribed: nothing from here on is missed
    seen: list[api_pb2.ContainerEventResponse] = []

    async def until(id_: str, kind: int) -> api_pb2.ContainerEventResponse:
        async def read() -> api_pb2.ContainerEventResponse:
            while True:
                ev = await call.read()
                assert ev is not grpc.aio.EOF
                assert isinstance(ev, api_pb2.ContainerEventResponse)
                seen.append(ev)
                if (ev.container_id, ev.container_event_type) == (id_, kind):
                    return ev

        return await asyncio.wait_for(read(), 60)  # a guard against hanging, not a check

    pod_cfg = pod_config("events", tmp_path)
    pod = await run_pod(cri, pod_cfg)
    removed = False
    try:
        ev = await until(pod, api_pb2.CONTAINER_STARTED_EVENT)
        assert ev.pod_sandbox_status.state == api_pb2.SANDBOX_READY and ev.created_at > 0
        resp = await cri.runtime.CreateContainer(
            api_pb2.CreateContainerRequest(
                pod_sandbox_id=pod, config=container_config("c", ["sleep", "600"])
            )
        )
        cid = resp.container_id
        ev = await until(cid, api_pb2.CONTAINER_CREATED_EVENT)
        assert [(s.id, s.state) for s in ev.containers_statuses] == [
            (cid, api_pb2.CONTAINER_CREATED)
        ]
        await cri.runtime.StartContainer(api_pb2.StartContainerRequest(container_id=cid))
        ev = await until(cid, api_pb2.CONTAINER_STARTED_EVENT)
        assert ev.containers_statuses[0].state == api_pb2.CONTAINER_RUNNING
        await cri.runtime.StopContainer(api_pb2.StopContainerRequest(container_id=cid))
        ev = await until(cid, api_pb2.CONTAINER_STOPPED_EVENT)
        assert ev.containers_statuses[0].state == api_pb2.CONTAINER_EXITED
        await cri.runtime.RemoveContainer(api_pb2.RemoveContainerRequest(container_id=cid))
        ev = await until(cid, api_pb2.CONTAINER_DELETED_EVENT)
        assert ev.pod_sandbox_status.id == pod and not ev.containers_statuses
        await remove_pod(cri, pod)
        removed = True
        await until(pod, api_pb2.CONTAINER_STOPPED_EVENT)
        ev = await until(pod, api_pb2.CONTAINER_DELETED_EVENT)
        assert not ev.HasField("pod_sandbox_status")
    finally:
        call.cancel()
        if not removed:
            await remove_pod(cri, pod)
    ours = [(e.container_id, e.container_event_type) for e in seen if e.container_id in (pod, cid)]
    assert ours == [
        (pod, api_pb2.CONTAINER_STARTED_EVENT),
        (cid, api_pb2.CONTAINER_CREATED_EVENT),
        (cid, api_pb2.CONTAINER_STARTED_EVENT),
        (cid, api_pb2.CONTAINER_STOPPED_EVENT),
        (cid, api_pb2.CONTAINER_DELETED_EVENT),
        (pod, api_pb2.CONTAINER_STOPPED_EVENT),
        (pod, api_pb2.CONTAINER_DELETED_EVENT),
    ]
