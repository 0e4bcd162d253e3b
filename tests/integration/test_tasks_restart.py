"""Tasks outlive the daemon and the daemon outlives shims (reliability R1 to R4), with the
real daemon, shim and runc: SIGKILL the daemon under a running task and an exec, kill the
task while the daemon is down, SIGKILL a shim."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from pycontainerd.api.services.events.v1 import events_pb2, events_pb2_grpc
from pycontainerd.api.services.tasks.v1 import tasks_pb2 as pb
from pycontainerd.api.services.tasks.v1 import tasks_pb2_grpc
from pycontainerd.api.types.task import task_pb2
from tests.support.daemon import metadata
from tests.support.tasks import (
    RUNTIMES,
    bundle_dir,
    import_busybox,
    mounts_under,
    pid_alive,
    ppid_of,
    scoped_namespace,
    shim_pids,
    task_rows,
    wait_until,
    watching,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    from tests.support.daemon import Daemon

pytestmark = [pytest.mark.ctr, pytest.mark.root, pytest.mark.parametrize("runtime", RUNTIMES)]


@pytest.fixture
def ns(fresh_daemon: Daemon, runtime: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """A namespace of the test's own; whatever the test leaves running is removed after."""
    prefix = request.node.originalname.removeprefix("test_")[:20]
    with scoped_namespace(fresh_daemon, prefix, runtime) as name:
        yield name


SIGKILLED = 128 + signal.SIGKILL


def ps_pids(daemon: Daemon, ns: str, id_: str) -> set[int]:
    out = daemon.ctr("task", "ps", id_, namespace=ns).stdout
    return {int(line.split()[0]) for line in out.splitlines()[1:] if line.strip()}


def start_detached(daemon: Daemon, ns: str, runtime: str, id_: str) -> int:
    """`ctr run -d … sleep 1000`; the task's pid."""
    img = import_busybox(daemon, ns)
    daemon.ctr("run", "-d", "--runtime", runtime, img, id_, "sleep", "1000", namespace=ns)
    pid, status = task_rows(daemon, ns)[id_]
    assert status == "RUNNING" and pid_alive(pid)
    return pid


def gone(pid: int) -> bool:
    """Not even a zombie is left (someone reaped it)."""
    return not Path(f"/proc/{pid}").exists()


def assert_cleaned_up(daemon: Daemon, ns: str, id_: str, pids: list[int]) -> None:
    b = bundle_dir(daemon, ns, id_)
    wait_until(lambda: not b.exists(), f"bundle {b} to be removed", timeout=10)
    assert mounts_under(b) == []
    wait_until(lambda: shim_pids(daemon, ns, id_) == [], f"the shim of {id_} to exit")
    wait_until(lambda: all(map(gone, pids)), f"processes {pids} to be gone and reaped")


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_task_survives_daemon_restart(
    fresh_daemon: Daemon, ns: str, runtime: str, stop: signal.Signals
) -> None:
    d = fresh_daemon
    pid = start_detached(d, ns, runtime, "r1")
    d.ctr("task", "exec", "-d", "--exec-id", "e1", "r1", "sleep", "1000", namespace=ns)
    (exec_pid,) = ps_pids(d, ns, "r1") - {pid}
    shim = ppid_of(pid)
    assert shim in shim_pids(d, ns, "r1")

    # A Wait in flight when the daemon goes away fails (its code: the test below).
    old_channel = d.channel()
    old_wait = tasks_pb2_grpc.TasksStub(old_channel).Wait.future(
        pb.WaitRequest(container_id="r1"), metadata=metadata(ns), timeout=60
    )
    d.stop(stop)
    with pytest.raises(grpc.RpcError):
        old_wait.result()
    old_channel.close()
    assert pid_alive(pid) and pid_alive(exec_pid) and pid_alive(shim)

    d.start()
    assert task_rows(d, ns) == {"r1": (pid, "RUNNING")}
    assert ps_pids(d, ns, "r1") == {pid, exec_pid}
    with d.channel() as ch:
        stub = tasks_pb2_grpc.TasksStub(ch)
        md = metadata(ns)
        e1 = stub.Get(pb.GetRequest(container_id="r1", exec_id="e1"), metadata=md).process
        assert (e1.pid, e1.status) == (exec_pid, task_pb2.RUNNING)

        with watching(d, ns) as events:
            wait = stub.Wait.future(pb.WaitRequest(container_id="r1"), metadata=md, timeout=60)
            d.ctr("task", "kill", "-s", "SIGKILL", "r1", namespace=ns)
            assert wait.result().exit_status == SIGKILLED
            ev = events.wait_for(
                lambda e: e.topic == "/tasks/exit" and e.payload.get("id") == "r1", "r1's exit"
            )
            assert ev.payload.get("exit_status") == SIGKILLED
            assert ev.payload.get("pid") == pid
            d.ctr("task", "delete", "r1", namespace=ns)
            events.sync()
        exits = [e for e in events.events if e.topic == "/tasks/exit"]
        assert [e.payload.get("id") for e in exits].count("r1") == 1, events.events
        assert events.topics()[-1] == "/tasks/delete"
    assert task_rows(d, ns) == {}
    assert_cleaned_up(d, ns, "r1", [pid, exec_pid, shim])
    d.ctr("container", "rm", "r1", namespace=ns)


def _end_of(stream: Any) -> grpc.RpcError:
    """The error that ends an event stream, after any probe events still queued."""
    try:
        for event in stream:
            assert event.topic == "/namespaces/update"
    except grpc.RpcError as exc:
        return exc
    raise AssertionError("the event stream ended without an error")


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_calls_in_flight_fail_unavailable_when_daemon_stops(
    fresh_daemon: Daemon, ns: str, runtime: str, stop: signal.Signals
) -> None:
    """A daemon going away ends open calls with UNAVAILABLE, as containerd's (Go gRPC's
    `Server.Stop` closes the transports). CANCELLED means "the client gave up": moby's
    event loop, for one, then stops for good instead of resubscribing after the restart."""
    d = fresh_daemon
    start_detached(d, ns, runtime, "w1")
    with d.channel() as ch:
        wait = tasks_pb2_grpc.TasksStub(ch).Wait.future(
            pb.WaitRequest(container_id="w1"), metadata=metadata(ns), timeout=60
        )
        stream = events_pb2_grpc.EventsStub(ch).Subscribe(
            events_pb2.SubscribeRequest(), metadata=metadata(ns), timeout=60
        )
        # Both calls are open on the server: the subscription delivers an event, and the
        # Wait is still pending. The call returns before the server has registered the
        # subscriber, and an event published before that reaches no one: label until one
        # arrives.
        arrived = threading.Event()

        def probe() -> None:
            for i in range(100):
                d.ctr("namespaces", "label", ns, f"probe={i}", namespace=ns)
                if arrived.wait(0.2):
                    return

        prober = threading.Thread(target=probe)
        prober.start()
        try:
            assert next(stream).topic == "/namespaces/update"
        finally:
            arrived.set()
            prober.join()
        assert not wait.done()
        d.stop(stop)
        with pytest.raises(grpc.RpcError) as info:
            wait.result()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
        ended = _end_of(stream)
        assert ended.code() == grpc.StatusCode.UNAVAILABLE, ended
    d.start()
    d.ctr("task", "kill", "-s", "SIGKILL", "w1", namespace=ns)


def test_task_killed_while_daemon_down(fresh_daemon: Daemon, ns: str, runtime: str) -> None:
    d = fresh_daemon
    pid = start_detached(d, ns, runtime, "r2")
    shim = ppid_of(pid)
    d.kill9()
    os.kill(pid, signal.SIGKILL)
    # The shim, its parent, reaps it: it is gone before the daemon is back.
    wait_until(lambda: gone(pid), "the killed task to be reaped by its shim")

    d.start()
    with d.channel() as ch:
        stub = tasks_pb2_grpc.TasksStub(ch)
        md = metadata(ns)
        waited = stub.Wait(pb.WaitRequest(container_id="r2"), metadata=md, timeout=30)
        assert waited.exit_status == SIGKILLED
        assert task_rows(d, ns) == {"r2": (pid, "STOPPED")}
        deleted = stub.Delete(pb.DeleteTaskRequest(container_id="r2"), metadata=md, timeout=30)
        assert (deleted.pid, deleted.exit_status) == (pid, SIGKILLED)
    assert task_rows(d, ns) == {}
    assert_cleaned_up(d, ns, "r2", [shim])
    d.ctr("container", "rm", "r2", namespace=ns)


def test_shim_sigkill_is_cleaned_up(fresh_daemon: Daemon, ns: str, runtime: str) -> None:
    d = fresh_daemon
    pid = start_detached(d, ns, runtime, "s1")
    shim = ppid_of(pid)
    assert shim_pids(d, ns, "s1") == [shim]

    with watching(d, ns) as events:
        os.kill(shim, signal.SIGKILL)
        ev = events.wait_topic("/tasks/delete")
        events.sync()
    assert events.topics("/tasks/") == ["/tasks/exit", "/tasks/delete"]
    exit_ = events.events[0].payload
    assert exit_.get("container_id") == "s1" and exit_.get("id") == "s1", exit_
    # containerd reports the status `shim delete` found (runc killed the task), else 255.
    assert exit_.get("exit_status") in (SIGKILLED, 255), exit_
    assert ev.payload.get("container_id") == "s1"

    with d.channel() as ch:
        stub = tasks_pb2_grpc.TasksStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            stub.Get(pb.GetRequest(container_id="s1"), metadata=metadata(ns))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert task_rows(d, ns) == {}
    assert_cleaned_up(d, ns, "s1", [pid, shim])

    # The daemon keeps serving, and the container can be run again.
    d.ctr("container", "rm", "s1", namespace=ns)
    img = import_busybox(d, ns)
    res = d.ctr("run", "--rm", "--runtime", runtime, img, "s1", "echo", "alive", namespace=ns)
    assert res.stdout == "alive\n"


def test_shim_killed_while_daemon_down(fresh_daemon: Daemon, ns: str, runtime: str) -> None:
    d = fresh_daemon
    pid = start_detached(d, ns, runtime, "s2")
    shim = ppid_of(pid)
    d.kill9()
    os.kill(shim, signal.SIGKILL)
    wait_until(lambda: gone(shim), "the killed shim to be reaped")

    # Loading finds the shim dead, runs `shim delete` (runc kills the task) and cleans up.
    d.start()
    with d.channel() as ch:
        stub = tasks_pb2_grpc.TasksStub(ch)
        with pytest.raises(grpc.RpcError) as info:
            stub.Get(pb.GetRequest(container_id="s2"), metadata=metadata(ns))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert task_rows(d, ns) == {}
    b = bundle_dir(d, ns, "s2")
    wait_until(lambda: not b.exists(), f"bundle {b} to be removed", timeout=10)
    assert mounts_under(b) == []
    # The orphaned task was reparented away from the dead shim; it must not run on.
    wait_until(lambda: not pid_alive(pid), "the orphaned task to be killed")
    d.ctr("container", "rm", "s2", namespace=ns)
