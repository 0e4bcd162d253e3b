"""The shim's task lifecycle over ttrpc, with real runc, overlay rootfs and client FIFOs."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from pycontainerd.api.events import task_pb2 as ev
from pycontainerd.api.runtime.task.v2 import shim_pb2 as api
from pycontainerd.errdefs import AlreadyExists, FailedPrecondition, NotFound, PycdError
from tests.shim.conftest import ShimEnv, call, empty, mounted, requires_runc

pytestmark = [requires_runc, pytest.mark.root]


async def _delete_and_shutdown(env: ShimEnv, client: object, id: str) -> api.DeleteResponse:
    from pycontainerd.ttrpc import Client

    assert isinstance(client, Client)
    resp = await call(client, "Delete", api.DeleteRequest(id=id), api.DeleteResponse)
    await empty(client, "Shutdown", api.ShutdownRequest(id=id))
    return resp


async def test_echo_stdout_and_exit_events(shim_env: ShimEnv) -> None:
    b = shim_env.bundle("c1", ["echo", "hello"])
    out = shim_env.reader("c1", "stdout")
    client = await shim_env.start("c1", b)
    created = await shim_env.create(client, "c1", b, stdout=str(out.path))
    assert created.pid > 0
    waiter = asyncio.ensure_future(call(client, "Wait", api.WaitRequest(id="c1"), api.WaitResponse))
    started = await call(client, "Start", api.StartRequest(id="c1"), api.StartResponse)
    assert started.pid == created.pid
    waited = await waiter
    assert waited.exit_status == 0
    assert waited.exited_at.seconds > 0
    assert await out.eof() == b"hello\n"
    state = await call(client, "State", api.StateRequest(id="c1"), api.StateResponse)
    assert state.status == 3  # STOPPED
    assert state.stdout == str(out.path)
    deleted = await _delete_and_shutdown(shim_env, client, "c1")
    assert deleted.pid == created.pid
    assert deleted.exit_status == 0
    (exit_ev,) = await shim_env.events.wait_for("/tasks/exit", "c1")
    assert isinstance(exit_ev, ev.TaskExit)
    assert (exit_ev.id, exit_ev.pid, exit_ev.exit_status) == ("c1", created.pid, 0)
    await shim_env.events.wait_for("/tasks/delete", "c1")
    assert shim_env.events.topics("c1") == [
        "/tasks/create",
        "/tasks/start",
        "/tasks/exit",
        "/tasks/delete",
    ]
    # After Delete the rootfs is unmounted and a second Delete is NotFound.
    assert not mounted(b / "rootfs")


async def test_exit_code_and_second_delete(shim_env: ShimEnv) -> None:
    b = shim_env.bundle("c2", ["sh", "-c", "exit 3"])
    client = await shim_env.start("c2", b)
    await shim_env.create(client, "c2", b)
    await call(client, "Start", api.StartRequest(id="c2"), api.StartResponse)
    waited = await call(client, "Wait", api.WaitRequest(id="c2"), api.WaitResponse)
    assert waited.exit_status == 3
    with pytest.raises(NotFound):
        await empty(client, "Kill", api.KillRequest(id="c2", signal=9))
    with pytest.raises(PycdError, match="stopped"):
        await call(client, "Start", api.StartRequest(id="c2"), api.StartResponse)
    deleted = await call(client, "Delete", api.DeleteRequest(id="c2"), api.DeleteResponse)
    assert deleted.exit_status == 3
    with pytest.raises(NotFound):
        await call(client, "Delete", api.DeleteRequest(id="c2"), api.DeleteResponse)
    await empty(client, "Shutdown", api.ShutdownRequest(id="c2"))


async def test_kill_and_wait_before_start(shim_env: ShimEnv) -> None:
    b = shim_env.bundle("c3", ["sleep", "1000"])
    client = await shim_env.start("c3", b)
    await shim_env.create(client, "c3", b)
    # Wait is valid on a CREATED task and blocks until the exit.
    waiter = asyncio.ensure_future(call(client, "Wait", api.WaitRequest(id="c3"), api.WaitResponse))
    await asyncio.sleep(0)
    with pytest.raises(AlreadyExists):
        await shim_env.create(client, "c3", b)
    await call(client, "Start", api.StartRequest(id="c3"), api.StartResponse)
    with pytest.raises(FailedPrecondition):
        await call(client, "Delete", api.DeleteRequest(id="c3"), api.DeleteResponse)
    assert not waiter.done()
    await empty(client, "Kill", api.KillRequest(id="c3", signal=signal.SIGKILL))
    waited = await waiter
    assert waited.exit_status == 137
    deleted = await _delete_and_shutdown(shim_env, client, "c3")
    assert deleted.exit_status == 137
    exits = await shim_env.events.wait_for("/tasks/exit", "c3")
    assert len(exits) == 1


async def test_delete_created_task(shim_env: ShimEnv) -> None:
    b = shim_env.bundle("c4", ["true"])
    client = await shim_env.start("c4", b)
    await shim_env.create(client, "c4", b)
    waiter = asyncio.ensure_future(call(client, "Wait", api.WaitRequest(id="c4"), api.WaitResponse))
    deleted = await _delete_and_shutdown(shim_env, client, "c4")
    assert deleted.exit_status == 137
    assert (await waiter).exit_status == 137
    assert not mounted(b / "rootfs")


async def test_create_failure_returns_runc_error(shim_env: ShimEnv) -> None:
    b = shim_env.bundle("c5", ["/no/such/binary"])
    client = await shim_env.start("c5", b)
    with pytest.raises(PycdError, match=r"no such file or directory|not found"):
        await shim_env.create(client, "c5", b)
    assert not mounted(b / "rootfs")
    with pytest.raises(NotFound):
        await call(client, "State", api.StateRequest(id="c5"), api.StateResponse)
    await empty(client, "Shutdown", api.ShutdownRequest(id="c5"))
    assert "/tasks/exit" not in shim_env.events.topics("c5")


async def test_stdin_fifo_and_closeio(shim_env: ShimEnv) -> None:
    b = shim_env.bundle("c6", ["cat"])
    stdin = shim_env.stdin_fifo("c6")
    out = shim_env.reader("c6", "stdout")
    client = await shim_env.start("c6", b)
    await shim_env.create(client, "c6", b, stdin=str(stdin), stdout=str(out.path))
    await call(client, "Start", api.StartRequest(id="c6"), api.StartResponse)
    w = os.open(stdin, os.O_WRONLY)
    os.write(w, b"ping\n")
    os.close(w)
    # The client's writer is closed but the shim still holds one: cat keeps running.
    await asyncio.sleep(0.3)
    state = await call(client, "State", api.StateRequest(id="c6"), api.StateResponse)
    assert state.status == 2  # RUNNING
    await empty(client, "CloseIO", api.CloseIORequest(id="c6", stdin=True))
    waited = await call(client, "Wait", api.WaitRequest(id="c6"), api.WaitResponse)
    assert waited.exit_status == 0
    assert await out.eof() == b"ping\n"
    await _delete_and_shutdown(shim_env, client, "c6")
