"""Containers and tasks through the SDK, the same tests against our daemon and real
containerd (runtime io.containerd.runc.v2): run with captured output and exit code,
stdin and CloseIO, exec, pids, metrics, kill, a terminal with resize, the image config
(env, cwd, user) in the spec, and the task events in order."""

from __future__ import annotations

import asyncio
import signal
from typing import TYPE_CHECKING

import pytest

from pycontainerd.client import TaskIO
from pycontainerd.errdefs import FailedPrecondition, NotFound
from tests.support.images import DEFAULT_PATH_ENV, Image, busybox_image, write_oci_archive
from tests.support.tasks import RUNC_V2_SHIM

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    from pycontainerd.client import Client, Container
    from pycontainerd.client.events import Event

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not RUNC_V2_SHIM.is_file(), reason=f"{RUNC_V2_SHIM} is missing"),
]

CONFIGURED = "example.com/sdk/configured:1"


@pytest.fixture
async def ready(any_client: Client, archives: dict[str, Path], tmp_path: Path) -> Client:
    """The client's namespace holds busybox, plus a variant with Env/WorkingDir/User set."""
    await any_client.import_archive(archives["oci"])
    configured = Image(
        layers=busybox_image().layers,
        env=(DEFAULT_PATH_ENV, "FOO=from-image"),
        working_dir="/tmp",
        user="nobody",
        cmd=("sh", "-c", "id -u; id -g; pwd; echo $FOO"),
    )
    path = tmp_path / "configured.tar"
    write_oci_archive(path, {CONFIGURED: configured})
    await any_client.import_archive(path)
    return any_client


async def run(
    client: Client, cid: str, image: str = "example.com/sdk/busybox:1", **opts: object
) -> tuple[int, bytes, bytes]:
    """Create, start, wait and delete; (exit code, stdout, stderr)."""
    container = await client.create_container(cid, image, **opts)  # type: ignore[arg-type]
    io = await TaskIO.create(cid)
    task = await container.new_task(io)
    waiter = asyncio.ensure_future(task.wait())
    await task.start()
    status = await waiter
    deleted = await task.delete()
    assert deleted.code == status.code
    await container.delete()
    return status.code, io.stdout, io.stderr


async def test_run_captures_output_and_exit_code(ready: Client) -> None:
    code, out, err = await run(ready, "run1", args=["sh", "-c", "echo hi; echo oops >&2; exit 3"])
    assert (code, out, err) == (3, b"hi\n", b"oops\n")
    assert await ready.list_containers() == []
    with pytest.raises(NotFound):
        await ready.load_container("run1")


async def test_image_config_env_cwd_user(ready: Client) -> None:
    code, out, _ = await run(ready, "cfg1", CONFIGURED)
    assert code == 0
    assert out.decode().split() == ["65534", "65534", "/tmp", "from-image"]
    code, out, _ = await run(
        ready, "cfg2", CONFIGURED, env=["FOO=from-caller"], user="0:0", cwd="/"
    )
    assert out.decode().split() == ["0", "0", "/", "from-caller"]


async def test_out_of_range_uid_is_refused_not_root(ready: Client) -> None:
    for uid in ("4294967296", "2147483648"):
        with pytest.raises(NotFound, match="no user"):
            await ready.create_container(f"uid{uid[:3]}", "example.com/sdk/busybox:1", user=uid)
    assert await ready.list_containers() == []


async def test_stdin_then_close_io(ready: Client) -> None:
    container = await ready.create_container("cat1", "example.com/sdk/busybox:1", args=["cat"])
    io = await TaskIO.create("cat1", stdin=b"line one\nline two\n")
    task = await container.new_task(io)
    waiter = asyncio.ensure_future(task.wait())
    await task.start()
    await task.close_stdin()
    assert (await waiter).code == 0
    await task.delete()
    assert io.stdout == b"line one\nline two\n"
    await container.delete()


async def sleeper(client: Client, cid: str) -> tuple[Container, object]:
    container = await client.create_container(
        cid, "example.com/sdk/busybox:1", args=["sleep", "1000"]
    )
    task = await container.new_task(await TaskIO.create(cid))
    await task.start()
    return container, task


async def test_exec_pids_metrics_kill(ready: Client) -> None:
    container, task = await sleeper(ready, "exec1")
    from pycontainerd.client import Task

    assert isinstance(task, Task)
    assert await task.status() == "running"
    assert task.pid in await task.pids()
    metric = await task.metrics()
    assert metric.id == "exec1"
    assert metric.data.DESCRIPTOR.full_name in {
        "io.containerd.cgroups.v1.Metrics",
        "io.containerd.cgroups.v2.Metrics",
    }  # decoded, not left as a raw Any

    io = await TaskIO.create("e1")
    proc = await task.exec("e1", ["sh", "-c", "echo from-exec; exit 7"], io=io)
    waiter = asyncio.ensure_future(proc.wait())
    await proc.start()
    assert (await waiter).code == 7
    assert (await proc.delete()).code == 7
    assert io.stdout == b"from-exec\n"

    with pytest.raises(FailedPrecondition):
        await task.delete()  # still running: refused before any Delete is sent
    with pytest.raises(FailedPrecondition):
        await container.delete()
    waiter = asyncio.ensure_future(task.wait())
    await task.kill(signal.SIGKILL)
    assert (await waiter).code == 128 + signal.SIGKILL
    await task.delete()
    await container.delete()


async def test_terminal_and_resize(ready: Client) -> None:
    resized = asyncio.Event()

    async def stdin() -> AsyncIterator[bytes]:
        await resized.wait()
        yield b"go\n"

    container = await ready.create_container(
        "tty1", "example.com/sdk/busybox:1", args=["sh", "-c", "read x; stty size"], tty=True
    )
    io = await TaskIO.create("tty1", stdin=stdin(), terminal=True)
    assert io.stderr_path == ""
    task = await container.new_task(io)
    waiter = asyncio.ensure_future(task.wait())
    await task.start()
    await task.resize(100, 40)
    resized.set()
    assert (await waiter).code == 0
    await task.delete()
    assert b"40 100" in io.stdout
    await container.delete()


async def test_task_events_in_order(ready: Client) -> None:
    ns = ready.namespace
    seen: list[Event] = []
    stream = ready.subscribe(f"namespace=={ns}")
    reader = asyncio.ensure_future(_collect(stream, seen, "/containers/delete"))
    # Make sure the subscription is live before acting: wait for a marker of ours.
    for i in range(200):
        await ready.tag_image("example.com/sdk/busybox:1", f"example.com/sdk/mark:{i}")
        await asyncio.sleep(0.01)
        if seen:
            break
    assert seen
    await run(ready, "ev1", args=["true"])
    await reader
    topics = [e.topic for e in seen if e.topic.startswith(("/tasks/", "/containers/"))]
    assert topics == [
        "/containers/create",
        "/tasks/create",
        "/tasks/start",
        "/tasks/exit",
        "/tasks/delete",
        "/containers/delete",
    ]
    exit_event = next(e for e in seen if e.topic == "/tasks/exit")
    assert exit_event.payload.container_id == "ev1"  # type: ignore[union-attr]


async def _collect(stream: AsyncIterator[Event], out: list[Event], last: str) -> None:
    async for ev in stream:
        out.append(ev)
        if ev.topic == last:
            await stream.aclose()  # type: ignore[attr-defined]
            return
