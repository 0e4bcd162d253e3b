"""The daemon process: configuration, socket handling and shutdown."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import grpc
import pytest
from google.protobuf import empty_pb2

from pycontainerd.api.services.version.v1 import version_pb2_grpc
from tests.support.daemon import Daemon

if TYPE_CHECKING:
    from pathlib import Path


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pycontainerd", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_config_default_is_valid_input_to_serve(tmp_path: Path) -> None:
    res = run_cli("config", "default")
    assert res.returncode == 0
    assert "[grpc]" in res.stdout
    assert '[plugins."io.containerd.event.v1.exchange"]' in res.stdout
    d = Daemon(config=res.stdout)
    try:
        d.start()
        with d.channel() as ch:
            assert version_pb2_grpc.VersionStub(ch).Version(empty_pb2.Empty()).version
    finally:
        d.cleanup()


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("version = 2\nbogus = 1\n", "'bogus'"),
        ("version = 2\n[grpc]\nadress = 'x'\n", "'grpc.adress'"),
        ('version = 2\n[plugins."io.containerd.event.v1.exchange"]\nqueue = 3\n', "queue"),
        ('version = 2\n[plugins."io.containerd.nope.v1.x"]\n', "io.containerd.nope.v1.x"),
        ("version = 2\n[grpc]\nuid = 'root'\n", "must be an integer"),
        ("this is not toml", "not valid TOML"),
        ("version = 1\n", "unsupported config version"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path: Path, text: str, needle: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    sock = str(tmp_path / "pcd.sock")  # its .lock stays in tmp_path, not in /tmp
    res = run_cli(
        "serve",
        "--config",
        str(cfg),
        "--root",
        str(tmp_path / "r"),
        "--state",
        str(tmp_path / "s"),
        "--address",
        sock,
    )
    assert res.returncode != 0
    assert needle in res.stderr
    assert not os.path.exists(sock)


def test_unreadable_config_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    res = run_cli("serve", "--config", str(missing))
    assert res.returncode != 0
    assert str(missing) in res.stderr


def test_socket_mode_and_second_daemon_refused(daemon: Daemon) -> None:
    mode = stat.S_IMODE(os.stat(daemon.address).st_mode)
    assert mode == 0o660
    assert stat.S_ISSOCK(os.stat(daemon.address).st_mode)
    other = Daemon(config="version = 2\n")
    try:
        res = run_cli(
            "serve",
            "--root",
            str(other.root),
            "--state",
            str(other.state),
            "--address",
            daemon.address,
        )
        assert res.returncode != 0
        assert "already serving" in res.stderr or "another daemon" in res.stderr
    finally:
        other.cleanup()
    # The first daemon is untouched.
    with daemon.channel() as ch:
        version_pb2_grpc.VersionStub(ch).Version(empty_pb2.Empty())


def test_stale_socket_is_replaced() -> None:
    d = Daemon(config="version = 2\n")
    try:
        # A socket file with nobody behind it, as a crashed daemon leaves.
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(d.address)
        s.close()
        assert os.path.exists(d.address)
        d.start()
        with d.channel() as ch:
            version_pb2_grpc.VersionStub(ch).Version(empty_pb2.Empty())
    finally:
        d.cleanup()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_graceful_shutdown(sig: int) -> None:
    d = Daemon(config="version = 2\n").start()
    try:
        assert d.proc is not None
        started = time.monotonic()
        d.proc.send_signal(sig)
        rc = d.proc.wait(timeout=10)
        assert rc == 0
        assert time.monotonic() - started < 10
        assert not os.path.exists(d.address)
        assert "stopped" in d.log()
        with grpc.insecure_channel("unix:" + d.address) as ch, pytest.raises(grpc.RpcError):
            version_pb2_grpc.VersionStub(ch).Version(empty_pb2.Empty(), timeout=1)
    finally:
        d.cleanup()


def test_logs_are_structured(daemon: Daemon) -> None:
    first = daemon.log().splitlines()[0]
    assert first.startswith("time=")
    assert " level=" in first
    assert " msg=" in first


def test_dirs_are_private(daemon: Daemon) -> None:
    assert stat.S_IMODE(os.stat(daemon.root).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(daemon.state).st_mode) == 0o711
