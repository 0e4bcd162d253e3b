"""CRI stats against the real daemon: container and pod CPU, memory, writable layer and
network figures for running containers, filters, and unknown ids."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc
import pytest

from pycontainerd.api.cri.runtime.v1 import api_pb2
from pycontainerd.cri.stats import parse_net_dev
from tests.cri.helpers import (
    container_config,
    pod_config,
    remove_pod,
    run_pod,
    start_container,
    wait_exited,
)

if TYPE_CHECKING:
    from pathlib import Path

    from tests.cri.conftest import CRI

pytestmark = [pytest.mark.root]

# Burn some CPU, keep some memory and write 512 KiB into the writable layer, then idle.
BUSY = (
    "dd if=/dev/zero of=/scratch bs=1024 count=512 2>/dev/null;"
    " i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done;"
    " trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done"
)


async def test_container_and_pod_stats(cri: CRI, tmp_path: Path) -> None:
    pod_cfg = pod_config("stats", tmp_path, labels={"team": "stats"})
    pod = await run_pod(cri, pod_cfg)
    try:
        cid = await start_container(
            cri, pod, pod_cfg, container_config("busy", ["sh", "-c", BUSY], labels={"k": "v"})
        )
        done = await start_container(cri, pod, pod_cfg, container_config("done", ["true"]))
        await wait_exited(cri, done)
        # The writable layer grows once dd has run.
        await cri.runtime.ExecSync(
            api_pb2.ExecSyncRequest(
                container_id=cid, cmd=["sh", "-c", "while [ ! -s /scratch ]; do sleep 0.1; done"]
            )
        )
        await cri.runtime.ExecSync(
            api_pb2.ExecSyncRequest(
                container_id=cid,
                cmd=["sh", "-c", "while [ $(wc -c < /scratch) -lt 524288 ]; do sleep 0.1; done"],
            )
        )

        st = (
            await cri.runtime.ContainerStats(api_pb2.ContainerStatsRequest(container_id=cid))
        ).stats
        assert st.attributes.id == cid and st.attributes.metadata.name == "busy"
        assert st.attributes.labels["k"] == "v"
        assert st.cpu.timestamp > 0 and st.cpu.usage_core_nano_seconds.value > 0
        assert st.memory.timestamp > 0 and st.memory.working_set_bytes.value > 0
        assert st.memory.usage_bytes.value >= st.memory.working_set_bytes.value
        assert st.writable_layer.used_bytes.value >= 512 * 1024
        assert st.writable_layer.inodes_used.value >= 1
        assert st.writable_layer.fs_id.mountpoint

        listed = (
            await cri.runtime.ListContainerStats(
                api_pb2.ListContainerStatsRequest(
                    filter=api_pb2.ContainerStatsFilter(pod_sandbox_id=pod)
                )
            )
        ).stats
        by_id = {s.attributes.id: s for s in listed}
        assert set(by_id) == {cid, done}
        # A second sample gives a rate; an exited container has no CPU or memory figures.
        assert by_id[cid].cpu.HasField("usage_nano_cores")
        assert not by_id[done].HasField("cpu") and not by_id[done].HasField("memory")
        labelled = await cri.runtime.ListContainerStats(
            api_pb2.ListContainerStatsRequest(
                filter=api_pb2.ContainerStatsFilter(label_selector={"k": "v"})
            )
        )
        assert [s.attributes.id for s in labelled.stats] == [cid]

        ps = (
            await cri.runtime.PodSandboxStats(api_pb2.PodSandboxStatsRequest(pod_sandbox_id=pod))
        ).stats
        assert ps.attributes.id == pod and ps.attributes.labels["team"] == "stats"
        linux = ps.linux
        assert linux.cpu.usage_core_nano_seconds.value >= st.cpu.usage_core_nano_seconds.value
        assert linux.memory.working_set_bytes.value > 0
        assert linux.process.process_count.value >= 2  # the sandbox's shell and the container's
        assert linux.network.default_interface.name == "eth0"
        assert "lo" not in [i.name for i in linux.network.interfaces]
        assert {c.attributes.id for c in linux.containers} == {cid, done}

        pods = await cri.runtime.ListPodSandboxStats(
            api_pb2.ListPodSandboxStatsRequest(
                filter=api_pb2.PodSandboxStatsFilter(label_selector={"team": "stats"})
            )
        )
        assert [p.attributes.id for p in pods.stats] == [pod]
    finally:
        await remove_pod(cri, pod)


async def test_unknown_ids(cri: CRI) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cri.runtime.ContainerStats(api_pb2.ContainerStatsRequest(container_id="f" * 64))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await cri.runtime.PodSandboxStats(api_pb2.PodSandboxStatsRequest(pod_sandbox_id="f" * 64))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_parse_net_dev() -> None:
    text = (
        "Inter-|   Receive                            "
        "                    |  Transmit\n"
        " face |bytes    packets errs drop fifo frame compressed multicast"
        "|bytes    packets errs drop fifo colls carrier compressed\n"
        "    lo:     100       1    0    0    0     0          0         0"
        "      100       1    0    0    0     0       0          0\n"
        "  eth0:    5000      40    2    0    0     0          0         0"
        "     7000      50    3    0    0     0       0          0\n"
    )
    [eth0] = parse_net_dev(text)
    assert (eth0.name, eth0.rx_bytes.value, eth0.rx_errors.value) == ("eth0", 5000, 2)
    assert (eth0.tx_bytes.value, eth0.tx_errors.value) == (7000, 3)
