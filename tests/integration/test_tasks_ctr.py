"""Running containers as containerd's own ``ctr`` drives them against the real daemon, the
real shim and real runc: output, exit codes, stdin, a real pty, the detached lifecycle
(exec, ps, pause, resume, metrics, kill, delete), the events of one ``ctr run --rm``
(R12: exactly one exit) and many containers at once."""

from __future__ import annotations

import os
import re
import subprocess
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import pytest

from tests.support.daemon import CTR
from tests.support.tasks import (
    RUNTIMES,
    bundle_dir,
    import_busybox,
    mounts_under,
    pid_alive,
    run_in_pty,
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
def ns(daemon: Daemon, runtime: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """A namespace of the test's own; whatever the test leaves running is removed after."""
    prefix = request.node.originalname.removeprefix("test_")[:20]
    with scoped_namespace(daemon, prefix, runtime) as name:
        yield name


# How many containers the concurrency test starts, and how many ctr processes at a time.
MANY = 100
AT_ONCE = 20


def run(daemon: Daemon, ns: str, runtime: str, *args: str) -> subprocess.CompletedProcess[str]:
    return daemon.ctr("run", "--runtime", runtime, *args, namespace=ns, check=False)


def assert_clean(daemon: Daemon, ns: str, ids: list[str]) -> None:
    """Nothing of these containers is left: no record, task, bundle or mount."""
    assert daemon.ctr("container", "ls", "-q", namespace=ns).stdout.split() == []
    assert task_rows(daemon, ns) == {}
    for id_ in ids:
        b = bundle_dir(daemon, ns, id_)
        assert not b.exists(), b
        assert mounts_under(b) == []


def test_run_output_exit_codes_and_stdin(daemon: Daemon, ns: str, runtime: str) -> None:
    img = import_busybox(daemon, ns)

    res = run(daemon, ns, runtime, "--rm", img, "c1", "echo", "hello")
    assert (res.returncode, res.stdout) == (0, "hello\n"), res.stderr

    res = run(daemon, ns, runtime, "--rm", img, "c2", "sh", "-c", "echo to-err >&2; exit 3")
    assert res.returncode == 3
    assert res.stderr.splitlines()[-1:] == ["to-err"]

    # A task SIGKILLed from outside (PID 1 cannot be killed from inside): ctr exits 128+9.
    assert CTR is not None
    argv = [CTR, "-a", daemon.address, "-n", ns, "run", "--rm", "--runtime", runtime]
    with subprocess.Popen(
        [*argv, img, "c3", "sleep", "1000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as proc:
        try:
            wait_until(lambda: task_rows(daemon, ns).get("c3", (0, ""))[1] == "RUNNING", "c3")
            daemon.ctr("task", "kill", "-s", "SIGKILL", "c3", namespace=ns)
            assert proc.wait(60) == 137
        finally:
            if proc.poll() is None:
                proc.kill()

    # Stdin is copied to the container; EOF arrives through CloseIO. The input comes late
    # on purpose: ctr 1.6 loses an EOF that arrives before Tasks/Create returns (§4.4).
    res = subprocess.run(
        f"(sleep 1; printf 'line one\\nline two\\n') | {CTR} -a {daemon.address} -n {ns} "
        f"run --rm --runtime {runtime} {img} c4 sh -c 'cat; echo done-$?'",
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (res.returncode, res.stdout) == (0, "line one\nline two\ndone-0\n"), res.stderr

    assert_clean(daemon, ns, ["c1", "c2", "c3", "c4"])


def test_run_with_a_terminal(daemon: Daemon, ns: str, runtime: str) -> None:
    img = import_busybox(daemon, ns)
    assert CTR is not None
    argv = [CTR, "-a", daemon.address, "-n", ns, "run", "--rm", "-t", "--runtime", runtime]
    # ctr sends ResizePty only after Start (containerd too): until it lands the pty has no
    # size and `stty size` prints nothing (busybox still exits 0), so poll a while.
    script = (
        'tty; i=0; until s=$(stty size 2>/dev/null) && [ -n "$s" ]; do'
        " i=$((i+1)); [ $i -gt 200 ] && break; sleep 0.05; done; echo size=$s; exit 5"
    )
    rc, out = run_in_pty([*argv, img, "t1", "sh", "-c", script], rows=33, cols=77)
    assert rc == 5, out
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    # The container's stdio is a pty of its own, sized like ours through ResizePty.
    assert any(re.fullmatch(r"/dev/pts/\d+", line) for line in lines), out
    assert "size=33 77" in lines, out
    assert_clean(daemon, ns, ["t1"])


def test_detached_task_lifecycle(daemon: Daemon, ns: str, runtime: str) -> None:
    img = import_busybox(daemon, ns)
    # It writes to stdout and stderr only once ctr has gone (it exits right after Start):
    # the output must go somewhere harmless, not kill the task with SIGPIPE.
    script = (
        "echo one; until [ -e /tmp/go ]; do sleep 0.05; done;"
        " echo two; echo three >&2; touch /tmp/done; exec sleep 1000"
    )
    res = run(daemon, ns, runtime, "-d", img, "d1", "sh", "-c", script)
    assert res.returncode == 0, res.stderr
    pid, status = task_rows(daemon, ns)["d1"]
    assert status == "RUNNING" and pid_alive(pid)
    daemon.ctr("task", "exec", "--exec-id", "go", "d1", "touch", "/tmp/go", namespace=ns)
    probes = iter(range(10_000))

    def done() -> bool:
        argv = ("task", "exec", "--exec-id", f"p{next(probes)}", "d1", "test", "-e", "/tmp/done")
        return daemon.ctr(*argv, namespace=ns, check=False).returncode == 0

    wait_until(done, "the detached task to write after ctr left")
    assert task_rows(daemon, ns)["d1"] == (pid, "RUNNING")

    out = daemon.ctr("task", "exec", "--exec-id", "e1", "d1", "sh", "-c", "echo hi; exit 4",
                     namespace=ns, check=False)  # fmt: skip
    assert (out.returncode, out.stdout) == (4, "hi\n"), out.stderr

    ps = daemon.ctr("task", "ps", "d1", namespace=ns).stdout
    assert str(pid) in [line.split()[0] for line in ps.splitlines()[1:]]

    daemon.ctr("task", "pause", "d1", namespace=ns)
    assert task_rows(daemon, ns)["d1"] == (pid, "PAUSED")
    daemon.ctr("task", "resume", "d1", namespace=ns)
    assert task_rows(daemon, ns)["d1"] == (pid, "RUNNING")

    metrics = daemon.ctr("task", "metrics", "d1", namespace=ns).stdout
    assert "ID" in metrics and "d1" in metrics, metrics
    assert re.search(r"memory\.usage_in_bytes|memory\.usage|pids\.current", metrics), metrics

    # A running task cannot be deleted (ctr checks, the daemon never sees a Delete).
    res = daemon.ctr("task", "delete", "d1", namespace=ns, check=False)
    assert res.returncode != 0 and "running" in res.stderr

    # busybox sleep as PID 1 ignores SIGTERM; SIGKILL stops it.
    daemon.ctr("task", "kill", "-s", "SIGKILL", "d1", namespace=ns)
    wait_until(lambda: task_rows(daemon, ns)["d1"][1] == "STOPPED", "d1 to stop")
    assert not pid_alive(pid)
    res = daemon.ctr("task", "kill", "-s", "SIGKILL", "d1", namespace=ns, check=False)
    assert res.returncode != 0 and "not found" in res.stderr

    daemon.ctr("task", "delete", "d1", namespace=ns)
    assert task_rows(daemon, ns) == {}
    daemon.ctr("container", "rm", "d1", namespace=ns)
    assert_clean(daemon, ns, ["d1"])


def test_events_of_one_run(daemon: Daemon, ns: str, runtime: str) -> None:
    img = import_busybox(daemon, ns)
    with watching(daemon, ns) as events:
        res = run(daemon, ns, runtime, "--rm", img, "ev1", "true")
        assert res.returncode == 0, res.stderr
        events.wait_topic("/containers/delete")
        # A marker after everything: late duplicates would have arrived before it.
        events.sync()
    assert events.topics() == [
        "/snapshot/prepare",
        "/containers/create",
        "/tasks/create",
        "/tasks/start",
        "/tasks/exit",
        "/tasks/delete",
        "/snapshot/remove",
        "/containers/delete",
    ]
    by_topic = {e.topic: e.payload for e in events.events}
    exit_ = by_topic["/tasks/exit"]
    assert exit_.get("container_id") == "ev1" and exit_.get("id") == "ev1", exit_
    assert exit_.get("pid") == by_topic["/tasks/start"].get("pid") != None  # noqa: E711
    assert not exit_.get("exit_status"), exit_  # omitted when 0
    assert by_topic["/tasks/create"].get("bundle") == str(bundle_dir(daemon, ns, "ev1"))


def test_events_of_exec_pause_resume(daemon: Daemon, ns: str, runtime: str) -> None:
    img = import_busybox(daemon, ns)
    res = run(daemon, ns, runtime, "-d", img, "x1", "sleep", "1000")
    assert res.returncode == 0, res.stderr
    with watching(daemon, ns) as events:
        out = daemon.ctr("task", "exec", "--exec-id", "e1", "x1", "sh", "-c", "exit 6",
                         namespace=ns, check=False)  # fmt: skip
        assert out.returncode == 6, out.stderr
        daemon.ctr("task", "pause", "x1", namespace=ns)
        daemon.ctr("task", "resume", "x1", namespace=ns)
        events.sync()
        # No event for DeleteProcess (ctr sent it before returning).
        assert events.topics() == [
            "/tasks/exec-added",
            "/tasks/exec-started",
            "/tasks/exit",
            "/tasks/paused",
            "/tasks/resumed",
        ]
        added, started, exit_ = (e.payload for e in events.events[:3])
        assert (added.get("container_id"), added.get("exec_id")) == ("x1", "e1")
        assert (started.get("exec_id"), exit_.get("id")) == ("e1", "e1")
        assert exit_.get("pid") == started.get("pid") != None  # noqa: E711
        assert exit_.get("exit_status") == 6
        assert events.events[3].payload.get("container_id") == "x1"
    daemon.ctr("task", "kill", "-s", "SIGKILL", "x1", namespace=ns)
    wait_until(lambda: task_rows(daemon, ns)["x1"][1] == "STOPPED", "x1 to stop")
    daemon.ctr("task", "delete", "x1", namespace=ns)
    daemon.ctr("container", "rm", "x1", namespace=ns)
    assert_clean(daemon, ns, ["x1"])


def test_many_containers_at_once(daemon: Daemon, ns: str, runtime: str) -> None:
    img = import_busybox(daemon, ns)
    ids = [f"m{i}" for i in range(MANY)]
    # One run first, so what a runtime sets up once (a zygote, say) is in the baseline.
    res = run(daemon, ns, runtime, "--rm", img, "warm", "true")
    assert res.returncode == 0, res.stderr
    fds_before = daemon_fds(daemon)

    def one(id_: str) -> tuple[str, int, str]:
        res = run(daemon, ns, runtime, "--rm", img, id_, "sh", "-c", f"echo {id_}")
        return res.stdout, res.returncode, res.stderr

    with ThreadPoolExecutor(AT_ONCE) as pool:
        results = dict(zip(ids, pool.map(one, ids), strict=True))
    failed = {id_: r for id_, r in results.items() if r[:2] != (f"{id_}\n", 0)}
    assert failed == {}
    assert_clean(daemon, ns, ids)
    wait_until(lambda: shim_pids(daemon, ns) == [], "every shim to exit", timeout=10)
    # R13: the daemon holds no more descriptors (sockets, pipes, fifos) than before.
    wait_until(
        lambda: not daemon_fds(daemon) - fds_before,
        "the daemon's descriptors to return to the baseline",
        timeout=10,
    )


def daemon_fds(daemon: Daemon) -> Counter[str]:
    """What the daemon's open descriptors point at (`socket:[…]` and such lose their inode)."""
    assert daemon.proc is not None
    fd_dir = f"/proc/{daemon.proc.pid}/fd"
    out: Counter[str] = Counter()
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except OSError:
            continue  # closed meanwhile
        out[re.sub(r":\[\d+\]$", "", target)] += 1
    return out
