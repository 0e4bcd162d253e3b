"""Exec processes, terminals, pause/resume, pids, stats and update through the shim."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from typing import TYPE_CHECKING, Any

import pytest
from google.protobuf import any_pb2

from pycontainerd import typeurl
from pycontainerd.api.cgroups.v1 import metrics_pb2 as v1
from pycontainerd.api.events import task_pb2 as ev
from pycontainerd.api.runtime.runc.options import oci_pb2
from pycontainerd.api.runtime.task.v2 import shim_pb2 as api
from pycontainerd.errdefs import AlreadyExists, FailedPrecondition, NotFound
from pycontainerd.shim import metrics
from tests.shim.conftest import ShimEnv, call, empty, requires_runc

if TYPE_CHECKING:
    from pycontainerd.ttrpc import Client

pytestmark = [requires_runc, pytest.mark.root]

PROCESS_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"


def process_spec(args: list[str], terminal: bool = False) -> any_pb2.Any:
    spec: dict[str, Any] = {
        "args": args,
        "cwd": "/",
        "env": ["PATH=/bin:/usr/bin", "TERM=xterm"],
        "terminal": terminal,
        "user": {"uid": 0, "gid": 0},
    }
    return any_pb2.Any(type_url=PROCESS_URL, value=json.dumps(spec).encode())


async def running(env: ShimEnv, id: str, args: list[str] | None = None) -> Client:
    b = env.bundle(id, args or ["sleep", "1000"])
    client = await env.start(id, b)
    await env.create(client, id, b)
    await call(client, "Start", api.StartRequest(id=id), api.StartResponse)
    return client


async def finish(client: Client, id: str) -> None:
    await empty(client, "Kill", api.KillRequest(id=id, signal=signal.SIGKILL))
    await call(client, "Wait", api.WaitRequest(id=id), api.WaitResponse)
    await call(client, "Delete", api.DeleteRequest(id=id), api.DeleteResponse)
    await empty(client, "Shutdown", api.ShutdownRequest(id=id))


async def test_exec_output_exit_and_delete_process(shim_env: ShimEnv) -> None:
    client = await running(shim_env, "e1")
    out = shim_env.reader("x1", "stdout")
    err = shim_env.reader("x1", "stderr")
    req = api.ExecProcessRequest(
        id="e1",
        exec_id="x1",
        stdout=str(out.path),
        stderr=str(err.path),
        spec=process_spec(["sh", "-c", "echo out; echo err >&2; exit 5"]),
    )
    await empty(client, "Exec", req)
    with pytest.raises(AlreadyExists):
        await empty(client, "Exec", req)
    waiter = asyncio.ensure_future(
        call(client, "Wait", api.WaitRequest(id="e1", exec_id="x1"), api.WaitResponse)
    )
    started = await call(
        client, "Start", api.StartRequest(id="e1", exec_id="x1"), api.StartResponse
    )
    assert started.pid > 0
    assert (await waiter).exit_status == 5
    deleted = await call(
        client, "Delete", api.DeleteRequest(id="e1", exec_id="x1"), api.DeleteResponse
    )
    assert (deleted.pid, deleted.exit_status) == (started.pid, 5)
    assert await out.eof() == b"out\n"
    assert await err.eof() == b"err\n"
    with pytest.raises(NotFound):
        await call(client, "Delete", api.DeleteRequest(id="e1", exec_id="x1"), api.DeleteResponse)
    (exit_ev,) = await shim_env.events.wait_for("/tasks/exit", "e1")
    assert isinstance(exit_ev, ev.TaskExit)
    assert (exit_ev.id, exit_ev.exit_status) == ("x1", 5)
    assert shim_env.events.topics("e1")[-3:] == [
        "/tasks/exec-added",
        "/tasks/exec-started",
        "/tasks/exit",
    ]
    await finish(client, "e1")


async def test_exec_background_child_still_gets_eof(shim_env: ShimEnv) -> None:
    """A background child holding the exec's stdout must not keep the FIFO open."""
    client = await running(shim_env, "e2")
    out = shim_env.reader("x2", "stdout")
    req = api.ExecProcessRequest(
        id="e2",
        exec_id="x2",
        stdout=str(out.path),
        spec=process_spec(["sh", "-c", "echo started; sleep 1000 & exit 0"]),
    )
    await empty(client, "Exec", req)
    await call(client, "Start", api.StartRequest(id="e2", exec_id="x2"), api.StartResponse)
    await call(client, "Wait", api.WaitRequest(id="e2", exec_id="x2"), api.WaitResponse)
    await call(client, "Delete", api.DeleteRequest(id="e2", exec_id="x2"), api.DeleteResponse)
    assert await out.eof() == b"started\n"
    await finish(client, "e2")


async def test_kill_running_exec_and_delete_running_refused(shim_env: ShimEnv) -> None:
    client = await running(shim_env, "e3")
    await empty(
        client,
        "Exec",
        api.ExecProcessRequest(id="e3", exec_id="x3", spec=process_spec(["sleep", "1000"])),
    )
    with pytest.raises(FailedPrecondition):
        await empty(client, "Kill", api.KillRequest(id="e3", exec_id="x3", signal=9))
    await call(client, "Start", api.StartRequest(id="e3", exec_id="x3"), api.StartResponse)
    with pytest.raises(FailedPrecondition):
        await call(client, "Delete", api.DeleteRequest(id="e3", exec_id="x3"), api.DeleteResponse)
    pids = await call(client, "Pids", api.PidsRequest(id="e3"), api.PidsResponse)
    assert len(pids.processes) == 2
    infos = [p for p in pids.processes if p.HasField("info")]
    assert len(infos) == 1
    details = typeurl.unpack(infos[0].info)
    assert isinstance(details, oci_pb2.ProcessDetails)
    assert details.exec_id == "x3"
    await empty(client, "Kill", api.KillRequest(id="e3", exec_id="x3", signal=signal.SIGTERM))
    waited = await call(client, "Wait", api.WaitRequest(id="e3", exec_id="x3"), api.WaitResponse)
    assert waited.exit_status == 128 + signal.SIGTERM
    await finish(client, "e3")


async def test_terminal_init_and_resize(shim_env: ShimEnv) -> None:
    b = shim_env.bundle("t1", ["sh", "-c", "sleep 0.3; stty size; tty"], terminal=True)
    out = shim_env.reader("t1", "stdout")
    stdin = shim_env.stdin_fifo("t1")
    client = await shim_env.start("t1", b)
    await shim_env.create(client, "t1", b, stdin=str(stdin), stdout=str(out.path), terminal=True)
    await empty(client, "ResizePty", api.ResizePtyRequest(id="t1", width=91, height=27))
    await call(client, "Start", api.StartRequest(id="t1"), api.StartResponse)
    waited = await call(client, "Wait", api.WaitRequest(id="t1"), api.WaitResponse)
    assert waited.exit_status == 0
    text = (await out.eof()).decode()
    assert "27 91" in text
    assert "/dev/pts/" in text
    await call(client, "Delete", api.DeleteRequest(id="t1"), api.DeleteResponse)
    await empty(client, "Shutdown", api.ShutdownRequest(id="t1"))


async def test_terminal_exec_with_input(shim_env: ShimEnv) -> None:
    client = await running(shim_env, "t2")
    out = shim_env.reader("tx", "stdout")
    stdin = shim_env.stdin_fifo("tx")
    req = api.ExecProcessRequest(
        id="t2",
        exec_id="tx",
        terminal=True,
        stdin=str(stdin),
        stdout=str(out.path),
        spec=process_spec(["sh", "-c", "read line; echo got-$line"], terminal=True),
    )
    await empty(client, "Exec", req)
    await call(client, "Start", api.StartRequest(id="t2", exec_id="tx"), api.StartResponse)
    w = os.open(stdin, os.O_WRONLY)
    os.write(w, b"abc\n")
    waited = await call(client, "Wait", api.WaitRequest(id="t2", exec_id="tx"), api.WaitResponse)
    os.close(w)
    assert waited.exit_status == 0
    await call(client, "Delete", api.DeleteRequest(id="t2", exec_id="tx"), api.DeleteResponse)
    assert b"got-abc" in await out.eof()
    await finish(client, "t2")


async def test_pause_resume_stats_update(shim_env: ShimEnv) -> None:
    client = await running(shim_env, "p1")
    await empty(client, "Pause", api.PauseRequest(id="p1"))
    state = await call(client, "State", api.StateRequest(id="p1"), api.StateResponse)
    assert state.status == 4  # PAUSED
    await empty(client, "Resume", api.ResumeRequest(id="p1"))
    state = await call(client, "State", api.StateRequest(id="p1"), api.StateResponse)
    assert state.status == 2  # RUNNING
    stats = await call(client, "Stats", api.StatsRequest(id="p1"), api.StatsResponse)
    m = typeurl.unpack(stats.stats)
    if metrics.cgroup_v2():
        assert stats.stats.type_url == "io.containerd.cgroups.v2.Metrics"
    else:
        assert stats.stats.type_url == "io.containerd.cgroups.v1.Metrics"
        assert isinstance(m, v1.Metrics)
        assert m.pids.current >= 1
        assert m.memory.usage.usage > 0
    resources = {"pids": {"limit": 77}}
    await empty(
        client,
        "Update",
        api.UpdateTaskRequest(
            id="p1",
            resources=any_pb2.Any(
                type_url="types.containerd.io/opencontainers/runtime-spec/1/LinuxResources",
                value=json.dumps(resources).encode(),
            ),
        ),
    )
    stats = await call(client, "Stats", api.StatsRequest(id="p1"), api.StatsResponse)
    assert typeurl.unpack(stats.stats).pids.limit == 77  # type: ignore[attr-defined]
    topics = shim_env.events.topics("p1")
    assert "/tasks/paused" in topics
    assert "/tasks/resumed" in topics
    connect = await call(client, "Connect", api.ConnectRequest(id="p1"), api.ConnectResponse)
    assert connect.task_pid == state.pid
    assert connect.shim_pid > 0
    await finish(client, "p1")


async def test_oom_event(shim_env: ShimEnv) -> None:
    if metrics.cgroup_v2():
        pytest.skip("OOM notifications are implemented for cgroup v1 only")
    spec = json.loads(json.dumps(shim_env.spec))
    spec["linux"]["resources"] = {"memory": {"limit": 16 << 20, "swap": 16 << 20}}
    # tail keeps its whole input in memory: 64 MiB against a 16 MiB limit.
    b = shim_env.bundle(
        "o1", ["sh", "-c", "head -c 67108864 /dev/zero | tail > /dev/null"], spec=spec
    )
    client = await shim_env.start("o1", b)
    await shim_env.create(client, "o1", b)
    await call(client, "Start", api.StartRequest(id="o1"), api.StartResponse)
    waited = await call(client, "Wait", api.WaitRequest(id="o1"), api.WaitResponse)
    assert waited.exit_status != 0
    (oom,) = (await shim_env.events.wait_for("/tasks/oom", "o1"))[:1]
    assert isinstance(oom, ev.TaskOOM)
    await call(client, "Delete", api.DeleteRequest(id="o1"), api.DeleteResponse)
    await empty(client, "Shutdown", api.ShutdownRequest(id="o1"))
