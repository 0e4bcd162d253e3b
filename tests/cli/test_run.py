"""``pcd run`` end to end on the real daemon, runc and CNI: output and exit codes, a
terminal through a pty, published ports, the bridge between containers, stop's grace
period, exec, and that ``rm`` leaves no namespace, IP, port rule or mount behind."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.cli.conftest import IMAGE
from tests.client.registry_support import free_port
from tests.network.conftest import _nat_rules
from tests.support.tasks import run_in_pty, wait_until

if TYPE_CHECKING:
    from tests.cli.conftest import Pcd

pytestmark = pytest.mark.root


def _leftovers(pcd: Pcd, cid: str) -> list[str]:
    """Everything of container ``cid`` still on the host."""
    found = []
    netns = pcd.exec_root / "netns" / cid
    if netns.exists():
        found.append(f"netns {netns}")
    ipam = pcd.exec_root / "net" / "ipam"
    for f in ipam.rglob("*") if ipam.exists() else []:
        if f.is_file() and cid in f.read_text(errors="replace"):
            found.append(f"ip lease {f.name}")
    if (pcd.exec_root / "net" / "attachments" / cid).exists():
        found.append("attachment record")
    found += [f"nat rule {r}" for r in _nat_rules() if cid[:12] in r or cid in r]
    found += [f"mount {ln}" for ln in Path("/proc/mounts").read_text().splitlines() if cid in ln]
    return found


def test_run_prints_output_and_propagates_exit_code(pcd: Pcd) -> None:
    res = pcd("run", "--rm", IMAGE, "echo", "hi")
    assert (res.returncode, res.stdout) == (0, "hi\n"), res.stderr
    res = pcd("run", "--rm", IMAGE, "sh", "-c", "echo out; echo err >&2; exit 7")
    assert (res.returncode, res.stdout, res.stderr) == (7, "out\n", "err\n")
    res = pcd("run", "--rm", "-i", IMAGE, "sh", "-c", "cat; echo end", input=b"piped\n")
    assert (res.returncode, res.stdout) == (0, "piped\nend\n")
    assert pcd.ok("ps", "-a", "-q") == ""  # --rm removed them all


def test_run_without_rm_keeps_an_exited_container(pcd: Pcd) -> None:
    res = pcd("run", "--name", "kept", IMAGE, "sh", "-c", "echo kept-out; exit 3")
    assert res.returncode == 3
    ps = pcd.ok("ps", "-a")
    assert "Exited (3)" in ps and "kept" in ps
    assert pcd.ok("logs", "kept") == "kept-out\n"  # attached runs are logged too
    pcd.ok("rm", "kept")


def test_run_it_through_a_pty(pcd: Pcd) -> None:
    rc, out = run_in_pty(
        [*pcd.argv("run", "--rm", "-it", IMAGE, "sh", "-c", "stty size; tty; exit 5")],
        rows=33,
        cols=77,
    )
    assert rc == 5, out
    assert "33 77" in out and "/dev/pts/" in out


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return bytes(resp.read())


def test_detached_httpd_published_port_then_rm_leaves_nothing(pcd: Pcd) -> None:
    port = free_port()
    script = (
        "mkdir -p /www && echo hello-from-httpd > /www/index.html && exec httpd -f -p 80 -h /www"
    )
    cid = pcd.ok(
        "run", "-d", "--name", "web", "-p", f"127.0.0.1:{port}:80", IMAGE, "sh", "-c", script
    ).strip()
    assert len(cid) == 64
    body = b""

    def served() -> bool:
        nonlocal body
        try:
            body = _get(f"http://127.0.0.1:{port}/index.html")
        except OSError:
            return False
        return True

    wait_until(served, "httpd answering on the published port")
    assert body == b"hello-from-httpd\n"
    ps = pcd.ok("ps")
    assert f"127.0.0.1:{port}->80/tcp" in ps and "web" in ps and "Up " in ps

    # The same port again, or a port a host program holds: refused before anything starts.
    again = pcd("run", "-d", "-p", f"127.0.0.1:{port}:80", IMAGE, "true")
    assert again.returncode == 125
    assert "already published by container web" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        taken = busy.getsockname()[1]
        res = pcd("run", "--rm", "-p", f"127.0.0.1:{taken}:80", IMAGE, "true")
    assert res.returncode == 125 and "already in use on the host" in res.stderr
    # Name in use.
    res = pcd("run", "--name", "web", IMAGE, "true")
    assert res.returncode == 125 and 'name "web" is already in use' in res.stderr
    assert pcd.ok("ps", "-a", "-q").split() == [cid[:12]]  # the failures left nothing

    assert _leftovers(pcd, cid) != []  # the probe sees a live container's state
    res = pcd("rm", "web")
    assert res.returncode == 1 and "stop it first" in res.stderr
    pcd.ok("rm", "-f", "web")
    assert pcd.ok("ps", "-a", "-q") == ""
    assert _leftovers(pcd, cid) == []
    with pytest.raises(OSError, match=r"refused|reset|timed out"):
        _get(f"http://127.0.0.1:{port}/index.html")


def test_two_containers_on_the_bridge_reach_each_other_and_exec(pcd: Pcd) -> None:
    pcd.ok("run", "-d", "--name", "peer", IMAGE, "sleep", "60")
    net = pcd.inspect("peer")["Network"]
    assert isinstance(net, dict)
    ip = net["IPAddress"]
    assert isinstance(ip, str) and ip
    res = pcd("run", "--rm", IMAGE, "busybox", "ping", "-c", "1", "-W", "5", ip)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 packets received" in res.stdout
    res = pcd("exec", "peer", "sh", "-c", "hostname; exit 4")
    assert res.returncode == 4 and res.stdout.strip() == pcd.inspect("peer")["Id"][:12]  # type: ignore[index]
    assert pcd.ok("exec", "-i", "peer", "cat", input=b"via-exec\n") == "via-exec\n"
    res = pcd("run", "--rm", "--network", "none", IMAGE, "sh", "-c", "ip -o link | wc -l")
    assert res.stdout.strip() == "1"  # only lo


def test_stop_kills_after_the_grace_period(pcd: Pcd) -> None:
    script = 'trap "echo ignoring-term" TERM; while true; do sleep 0.1; done'
    pcd.ok("run", "-d", "--name", "stubborn", IMAGE, "sh", "-c", script)
    wait_until(lambda: "Up " in pcd.ok("ps"), "the container running")
    pcd.ok("stop", "-t", "1", "stubborn")
    assert "Exited (137)" in pcd.ok("ps", "-a")  # SIGKILL, after the TERM was ignored
    assert "ignoring-term" in pcd.ok("logs", "stubborn")
    # A container that honours SIGTERM exits with it (128 + 15) well before the grace ends.
    pcd.ok(
        "run",
        "-d",
        "--name",
        "polite",
        IMAGE,
        "sh",
        "-c",
        "trap 'exit 143' TERM; while true; do sleep 0.1; done",
    )
    pcd.ok("stop", "-t", "30", "polite")
    assert "Exited (143)" in pcd.ok("ps", "-a")
    out = pcd.ok("container", "prune")
    assert "Total: 2 container(s) removed" in out


def test_bad_input_gives_one_clear_line(pcd: Pcd, tmp_path: Path) -> None:
    cases: list[tuple[list[str], str, int]] = [
        (["run", "--rm", "--pull", "never", "example.com/no/such:1", "true"],
         "not found locally", 125),
        (["run", "--rm", "Bad Ref!!", "true"], "invalid reference format", 125),
        (["run", "--rm", "--insecure-registry", f"127.0.0.1:{free_port()}",
          f"127.0.0.1:{free_port()}/x/y:1", "true"], "unreachable", 125),
        (["run", "--rm", IMAGE, "no-such-command"], "executable file not found", 127),
        (["run", "--rm", "-p", "99999:80", IMAGE, "true"], "out of range", 125),
        (["-a", str(tmp_path / "nope.sock"), "ps"], "cannot reach the daemon", 1),
        (["rm", "nonexistent"], "no such container", 1),
        (["logs", "nonexistent"], "no such container", 1),
    ]  # fmt: skip
    for args, text, code in cases:
        res = pcd(*args)
        assert res.returncode == code, (args, res.stderr)
        lines = [ln for ln in res.stderr.splitlines() if ln.startswith("pcd: ")]
        assert len(lines) == 1 and text in lines[0], (args, res.stderr)
        assert "Traceback" not in res.stderr
    assert pcd.ok("ps", "-a", "-q") == ""


def test_namespaces_and_events(pcd_bare: Pcd) -> None:
    pcd = pcd_bare
    created: list[str] = []
    with pcd.popen("events", 'topic=="/namespaces/create"') as watcher:
        assert watcher.stdout is not None
        line = ""
        try:
            # The subscription starts at some point after the process does: create
            # namespaces until one shows up (each is its own event).
            for i in range(20):
                created.append(f"{pcd.namespace}-ev{i}")
                pcd.ok("namespace", "create", created[-1], "a=b")
                ready, _, _ = select.select([watcher.stdout], [], [], 2.0)
                if ready:
                    line = watcher.stdout.readline()
                    break
        finally:
            watcher.send_signal(signal.SIGINT)
            watcher.wait(10)
    assert " /namespaces/create " in line
    assert json.loads(line.split(" ", 3)[3])["name"] in created
    listed = pcd.ok("namespace", "ls")
    assert all(n in listed for n in created) and "a=b" in listed
    pcd.ok("namespace", "rm", *created)
    assert not set(created) & set(pcd.ok("namespace", "ls", "-q").split())


def test_exit_code_of_a_killed_pcd_run_child(pcd: Pcd) -> None:
    """SIGTERM to an attached ``pcd run`` is forwarded to the container."""
    script = "trap 'exit 42' TERM; echo ready; while true; do sleep 0.1; done"
    with pcd.popen("run", "--rm", IMAGE, "sh", "-c", script) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(30) == 42
