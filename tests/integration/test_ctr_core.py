"""The foundation as containerd's own ``ctr`` sees it: version, plugins, namespaces,
leases and events against the real daemon."""

from __future__ import annotations

import re
import select
import subprocess
import time

import pytest

from tests.support.daemon import CTR, Daemon

pytestmark = pytest.mark.ctr


def test_version_shows_our_server(daemon: Daemon) -> None:
    out = daemon.ctr("version").stdout
    server = out.split("Server:")[1]
    assert re.search(r"Version:\s+0\.1\.0", server)
    assert re.search(r"Revision:\s+pycontainerd", server)
    uuid = re.search(r"UUID:\s+([0-9a-f-]{36})", server)
    assert uuid is not None
    # The UUID is persisted: asking again gives the same one.
    assert uuid.group(1) in daemon.ctr("version").stdout


def test_plugins_ls_reports_ok_and_the_broken_plugin(daemon: Daemon) -> None:
    rows = {}
    for line in daemon.ctr("plugins", "ls").stdout.splitlines()[1:]:
        cols = line.split()
        rows[(cols[0], cols[1])] = cols[-1]
    for key in [
        ("io.containerd.grpc.v1", "version"),
        ("io.containerd.grpc.v1", "introspection"),
        ("io.containerd.grpc.v1", "namespaces"),
        ("io.containerd.grpc.v1", "leases"),
        ("io.containerd.grpc.v1", "events"),
        ("io.containerd.event.v1", "exchange"),
        ("io.containerd.metadata.v1", "bolt"),
    ]:
        assert rows[key] == "ok", key
    assert rows[("io.pycontainerd.test.v1", "broken")] == "error"
    detailed = daemon.ctr("plugins", "ls", "-d", "id==broken").stdout
    assert "always fails to initialise" in detailed


def test_plugins_ls_filters(daemon: Daemon) -> None:
    out = daemon.ctr("plugins", "ls", "type==io.containerd.grpc.v1").stdout
    types = {line.split()[0] for line in out.splitlines()[1:]}
    assert types == {"io.containerd.grpc.v1"}


def test_namespaces_create_label_ls_rm(daemon: Daemon) -> None:
    daemon.ctr("namespaces", "create", "nsprobe", "a=b")
    daemon.ctr("namespaces", "label", "nsprobe", "c=d")
    listing = daemon.ctr("namespaces", "ls").stdout
    line = next(x for x in listing.splitlines() if x.startswith("nsprobe "))
    assert "a=b" in line and "c=d" in line
    daemon.ctr("namespaces", "label", "nsprobe", "a=")  # an empty value removes the label
    line = next(
        x for x in daemon.ctr("namespaces", "ls").stdout.splitlines() if x.startswith("nsprobe ")
    )
    assert "a=b" not in line and "c=d" in line
    daemon.ctr("namespaces", "rm", "nsprobe")
    assert "nsprobe" not in daemon.ctr("namespaces", "ls").stdout


def test_namespace_errors(daemon: Daemon) -> None:
    daemon.ctr("namespaces", "create", "dup")
    res = daemon.ctr("namespaces", "create", "dup", check=False)
    assert res.returncode != 0 and "already exists" in res.stderr
    res = daemon.ctr("namespaces", "create", "bad name!", check=False)
    assert res.returncode != 0 and "invalid argument" in res.stderr
    # ctr treats NOT_FOUND on delete as done (the API test checks the code itself).
    assert daemon.ctr("namespaces", "rm", "never-made").stdout.strip() == "never-made"
    # A namespace holding a lease is still empty for deletion (as in containerd).
    daemon.ctr("leases", "create", "--id", "keep", namespace="dup")
    daemon.ctr("namespaces", "rm", "dup")


def test_leases_create_ls_rm(daemon: Daemon) -> None:
    daemon.ctr("leases", "create", "--id", "l1", "--expires", "1h", "foo=bar", namespace="leasens")
    out = daemon.ctr("leases", "ls", namespace="leasens").stdout
    line = next(x for x in out.splitlines() if x.startswith("l1 "))
    assert "foo=bar" in line and "containerd.io/gc.expire=" in line
    # The namespace came into being with its first write.
    assert "leasens" in daemon.ctr("namespaces", "ls").stdout
    res = daemon.ctr("leases", "create", "--id", "l1", namespace="leasens", check=False)
    assert res.returncode != 0 and "already exists" in res.stderr
    daemon.ctr("leases", "rm", "l1", namespace="leasens")
    assert "l1 " not in daemon.ctr("leases", "ls", namespace="leasens").stdout
    res = daemon.ctr("leases", "rm", "l1", namespace="leasens", check=False)
    assert res.returncode != 0 and "not found" in res.stderr


def test_ctr_events_receives_namespace_create(daemon: Daemon) -> None:
    assert CTR is not None
    with subprocess.Popen(
        [CTR, "-a", daemon.address, "events"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as proc:
        # Publish until the subscriber is attached and has printed the event.
        deadline = time.monotonic() + 20
        seen = ""
        n = 0
        assert proc.stdout is not None
        while time.monotonic() < deadline and "/namespaces/create" not in seen:
            n += 1
            daemon.ctr("namespaces", "create", f"evns{n}", "k=v")
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if ready:
                seen += proc.stdout.readline()
        assert "/namespaces/create" in seen
        proc.terminate()
        proc.wait(5)
        line = next(x for x in seen.splitlines() if "/namespaces/create" in x)
        # ctr decoded the payload (it drops events whose Any type URL it cannot resolve).
        assert '"name":"evns' in line.replace(" ", "")
