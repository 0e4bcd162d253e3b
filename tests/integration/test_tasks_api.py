"""Bad input to the Tasks API over the generated stubs, against the real daemon, shim and
runc: the status codes containerd gives, and a failed create (a spec runc rejects) that
reports runc's own words and leaves nothing behind (R12: no exit event either)."""

from __future__ import annotations

import json
import signal
from typing import TYPE_CHECKING

import grpc
import pytest
from google.protobuf import any_pb2

from pycontainerd.api.services.containers.v1 import containers_pb2, containers_pb2_grpc
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
    scoped_namespace,
    shim_pids,
    wait_until,
    watching,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from tests.support.daemon import Daemon

pytestmark = [pytest.mark.ctr, pytest.mark.root, pytest.mark.parametrize("runtime", RUNTIMES)]


@pytest.fixture
def ns(daemon: Daemon, runtime: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """A namespace of the test's own; whatever the test leaves running is removed after."""
    prefix = request.node.originalname.removeprefix("test_")[:20]
    with scoped_namespace(daemon, prefix, runtime) as name:
        yield name


PROCESS_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"
# Start on a started or stopped process, Delete of a running one, Exec in or Pause of a
# stopped one: containerd answers UNKNOWN ("cannot start a stopped process", "cannot
# delete a running process"); FAILED_PRECONDITION says the same thing more precisely.
REFUSED = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.FAILED_PRECONDITION}


class Api:
    """Tasks and Containers stubs bound to one namespace."""

    def __init__(self, channel: grpc.Channel, ns: str) -> None:
        self.tasks = tasks_pb2_grpc.TasksStub(channel)
        self.containers = containers_pb2_grpc.ContainersStub(channel)
        self.md = metadata(ns)

    def error(self, fn: Callable[..., object], req: object) -> grpc.RpcError:
        """Call `fn(req)` expecting an RpcError; return it."""
        with pytest.raises(grpc.RpcError) as info:
            fn(req, metadata=self.md, timeout=60)
        return info.value

    def code(self, fn: Callable[..., object], req: object) -> grpc.StatusCode:
        return self.error(fn, req).code()

    def process_spec(self, container_id: str, args: list[str]) -> any_pb2.Any:
        """The container's process with other args, as ctr sends it with Exec."""
        c = self.containers.Get(
            containers_pb2.GetContainerRequest(id=container_id), metadata=self.md
        ).container
        process = json.loads(c.spec.value)["process"]
        process["args"] = args
        process["terminal"] = False
        return any_pb2.Any(type_url=PROCESS_URL, value=json.dumps(process).encode())


@pytest.fixture
def api(daemon: Daemon) -> Iterator[Callable[[str], Api]]:
    channel = daemon.channel()
    yield lambda ns: Api(channel, ns)
    channel.close()


def test_task_calls_on_missing_or_wrong_state(
    daemon: Daemon, ns: str, api: Callable[[str], Api], runtime: str
) -> None:
    img = import_busybox(daemon, ns)
    daemon.ctr("container", "create", "--runtime", runtime, img, "a1", "sleep", "1000",
               namespace=ns)  # fmt: skip
    a = api(ns)
    C = grpc.StatusCode

    assert a.code(a.tasks.Create, pb.CreateTaskRequest(container_id="nope")) == C.NOT_FOUND
    # The container exists but has no task.
    assert a.code(a.tasks.Get, pb.GetRequest(container_id="a1")) == C.NOT_FOUND
    assert a.code(a.tasks.Wait, pb.WaitRequest(container_id="a1")) == C.NOT_FOUND
    assert a.code(a.tasks.Kill, pb.KillRequest(container_id="a1", signal=9)) == C.NOT_FOUND
    assert a.code(a.tasks.Delete, pb.DeleteTaskRequest(container_id="a1")) == C.NOT_FOUND

    # No rootfs and no stdio in the request: the daemon mounts the container's snapshot
    # and the process gets /dev/null.
    created = a.tasks.Create(pb.CreateTaskRequest(container_id="a1"), metadata=a.md, timeout=60)
    assert created.pid > 0
    assert a.code(a.tasks.Create, pb.CreateTaskRequest(container_id="a1")) == C.ALREADY_EXISTS
    got = a.tasks.Get(pb.GetRequest(container_id="a1"), metadata=a.md).process
    assert (got.pid, got.status) == (created.pid, task_pb2.CREATED)

    started = a.tasks.Start(pb.StartRequest(container_id="a1"), metadata=a.md, timeout=60)
    assert started.pid == created.pid and pid_alive(started.pid)
    assert a.code(a.tasks.Start, pb.StartRequest(container_id="a1")) in REFUSED
    # A running task is not deleted (and stays usable); tasks are per namespace.
    assert a.code(a.tasks.Delete, pb.DeleteTaskRequest(container_id="a1")) in REFUSED
    assert a.tasks.Get(pb.GetRequest(container_id="a1"), metadata=a.md).process.status == (
        task_pb2.RUNNING
    )
    other = api(ns + "-other")
    assert other.code(other.tasks.Get, pb.GetRequest(container_id="a1")) == C.NOT_FOUND
    assert other.code(other.tasks.Kill, pb.KillRequest(container_id="a1", signal=9)) == C.NOT_FOUND

    spec = a.process_spec("a1", ["sleep", "1000"])
    empty_id = pb.ExecProcessRequest(container_id="a1", exec_id="", spec=spec)
    assert a.code(a.tasks.Exec, empty_id) == C.INVALID_ARGUMENT
    a.tasks.Exec(pb.ExecProcessRequest(container_id="a1", exec_id="x1", spec=spec), metadata=a.md)
    dup = pb.ExecProcessRequest(container_id="a1", exec_id="x1", spec=spec)
    assert a.code(a.tasks.Exec, dup) == C.ALREADY_EXISTS
    assert a.code(a.tasks.Start, pb.StartRequest(container_id="a1", exec_id="x9")) == C.NOT_FOUND
    unknown = pb.DeleteProcessRequest(container_id="a1", exec_id="x9")
    assert a.code(a.tasks.DeleteProcess, unknown) == C.NOT_FOUND

    a.tasks.Kill(pb.KillRequest(container_id="a1", signal=signal.SIGKILL), metadata=a.md)
    waited = a.tasks.Wait(pb.WaitRequest(container_id="a1"), metadata=a.md, timeout=60)
    assert waited.exit_status == 128 + signal.SIGKILL
    got = a.tasks.Get(pb.GetRequest(container_id="a1"), metadata=a.md).process
    assert (got.status, got.exit_status) == (task_pb2.STOPPED, 137)
    assert a.code(a.tasks.Kill, pb.KillRequest(container_id="a1", signal=9)) == C.NOT_FOUND
    assert a.code(a.tasks.Start, pb.StartRequest(container_id="a1")) in REFUSED
    late = pb.ExecProcessRequest(container_id="a1", exec_id="x2", spec=spec)
    assert a.code(a.tasks.Exec, late) in REFUSED
    assert a.code(a.tasks.Pause, pb.PauseTaskRequest(container_id="a1")) in REFUSED

    deleted = a.tasks.Delete(pb.DeleteTaskRequest(container_id="a1"), metadata=a.md, timeout=60)
    assert (deleted.pid, deleted.exit_status) == (created.pid, 137)
    assert a.code(a.tasks.Delete, pb.DeleteTaskRequest(container_id="a1")) == C.NOT_FOUND
    assert a.code(a.tasks.Get, pb.GetRequest(container_id="a1")) == C.NOT_FOUND
    b = bundle_dir(daemon, ns, "a1")
    assert not b.exists() and mounts_under(b) == []
    wait_until(lambda: shim_pids(daemon, ns, "a1") == [], "the shim of a1 to exit")
    daemon.ctr("container", "rm", "a1", namespace=ns)


def test_concurrent_creates_of_one_task(
    daemon: Daemon, ns: str, api: Callable[[str], Api], runtime: str
) -> None:
    img = import_busybox(daemon, ns)
    daemon.ctr("container", "create", "--runtime", runtime, img, "r1", "sleep", "1000",
               namespace=ns)  # fmt: skip
    a = api(ns)
    req = pb.CreateTaskRequest(container_id="r1")
    calls = [a.tasks.Create.future(req, metadata=a.md, timeout=60) for _ in range(3)]
    outcomes = []
    for call in calls:
        try:
            outcomes.append(("ok", call.result().pid))
        except grpc.RpcError as exc:
            outcomes.append((exc.code().name, 0))
    assert sorted(o[0] for o in outcomes) == ["ALREADY_EXISTS", "ALREADY_EXISTS", "ok"], outcomes
    pid = next(p for kind, p in outcomes if kind == "ok")
    got = a.tasks.Get(pb.GetRequest(container_id="r1"), metadata=a.md).process
    assert (got.pid, got.status) == (pid, task_pb2.CREATED)
    assert shim_pids(daemon, ns, "r1") != []
    # Deleting the created (never started) task takes everything away.
    a.tasks.Delete(pb.DeleteTaskRequest(container_id="r1"), metadata=a.md, timeout=60)
    b = bundle_dir(daemon, ns, "r1")
    assert not b.exists() and mounts_under(b) == []
    wait_until(lambda: shim_pids(daemon, ns, "r1") == [], "the shim of r1 to exit")
    wait_until(lambda: not pid_alive(pid), "the created init of r1 to go")
    daemon.ctr("container", "rm", "r1", namespace=ns)


BAD_SPECS = {
    # runc: `exec: "/no/such/binary": stat /no/such/binary: no such file or directory`
    "missing-binary": (
        ["--", "/no/such/binary"],
        ("/no/such/binary", "no such file or directory"),
    ),
    # runc validates the spec: a relative working directory is refused.
    "relative-cwd": (["--cwd", "not/absolute", "--", "true"], ("Cwd must be an absolute path",)),
}


@pytest.mark.parametrize("case", list(BAD_SPECS), ids=list(BAD_SPECS))
def test_create_rejected_by_runc_leaves_nothing(
    daemon: Daemon, ns: str, api: Callable[[str], Api], runtime: str, case: str
) -> None:
    img = import_busybox(daemon, ns)
    flags, words = BAD_SPECS[case]
    dashdash = flags.index("--")
    daemon.ctr("container", "create", "--runtime", runtime, *flags[:dashdash], img, "bad",
               *flags[dashdash + 1 :], namespace=ns)  # fmt: skip
    a = api(ns)
    with watching(daemon, ns) as events:
        err = a.error(a.tasks.Create, pb.CreateTaskRequest(container_id="bad"))
        events.sync()
    details = err.details() or ""
    # The reason runc gave reaches the client.
    assert all(w in details for w in words), details
    assert err.code() not in (grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND), details

    # Nothing is left: no task, no bundle, no mount of its rootfs, no shim, no events.
    assert a.code(a.tasks.Get, pb.GetRequest(container_id="bad")) == grpc.StatusCode.NOT_FOUND
    b = bundle_dir(daemon, ns, "bad")
    assert not b.exists(), sorted(p.name for p in b.iterdir())
    assert mounts_under(b) == []
    wait_until(lambda: shim_pids(daemon, ns, "bad") == [], "the shim of the failed task to exit")
    assert events.topics("/tasks/") == []

    # The container is not stuck: it can be removed, and its id works again.
    daemon.ctr("container", "rm", "bad", namespace=ns)
    res = daemon.ctr("run", "--rm", "--runtime", runtime, img, "bad", "echo", "ok",
                     namespace=ns)  # fmt: skip
    assert res.stdout == "ok\n"
