"""Run the real daemon as a subprocess for tests and benchmarks."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Self

import grpc

REPO = Path(__file__).resolve().parents[2]
SUPPORT = Path(__file__).resolve().parent
CTR = shutil.which("ctr")


def wait_for_socket(
    path: str, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode}")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return
        except OSError:
            time.sleep(0.01)
        finally:
            s.close()
    raise TimeoutError(f"no daemon answered on {path} within {timeout}s")


class Daemon:
    """A pycontainerd daemon on a private root, state and socket."""

    def __init__(self, base: Path | None = None, config: str = "") -> None:
        # Unix socket paths are limited to ~104 bytes: keep everything under a short /tmp dir.
        self.base = base or Path(tempfile.mkdtemp(prefix="pcd-", dir="/tmp"))
        self.root = self.base / "root"
        self.state = self.base / "state"
        self.address = str(self.base / "pcd.sock")
        self.config_path = self.base / "config.toml"
        self.config_path.write_text(config)
        self.log_path = self.base / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
        return env

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "pycontainerd",
            "serve",
            "--config",
            str(self.config_path),
            "--root",
            str(self.root),
            "--state",
            str(self.state),
            "--address",
            self.address,
            "--log-level",
            "debug",
        ]

    def start(self, timeout: float = 20.0) -> Self:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            self.command(), stdout=log, stderr=log, env=self.env(), cwd=self.base
        )
        log.close()
        try:
            wait_for_socket(self.address, timeout, self.proc)
        except Exception as exc:
            raise RuntimeError(f"daemon did not start: {exc}\n{self.log()}") from exc
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rc = self.proc.returncode
        self.proc = None
        return rc

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel("unix:" + self.address)

    def ctr(
        self,
        *args: str,
        namespace: str = "default",
        input: bytes | None = None,
        timeout: float = 60.0,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        if CTR is None:
            raise RuntimeError("ctr is not installed")
        cmd = [CTR, "-a", self.address, "-n", namespace, *args]
        res = subprocess.run(
            cmd,
            input=input.decode() if input else None,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and res.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
            )
        return res

    def cleanup(self) -> None:
        self.stop()
        # The CRI's namespace directory stays a mount point after the daemon exits (as
        # iproute2's does), and a test that killed the daemon may leave task mounts:
        # either would keep the directory, and the mount, for good.
        unmount_under(self.base)
        shutil.rmtree(self.base, ignore_errors=True)


def metadata(
    namespace: str | None = "default", lease: str | None = None
) -> tuple[tuple[str, str | bytes], ...]:
    md: list[tuple[str, str | bytes]] = []
    if namespace is not None:
        md.append(("containerd-namespace", namespace))
    if lease is not None:
        md.append(("containerd-lease", lease))
    return tuple(md)


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path`, from /proc/self/mountinfo (we share the daemon's
    mount namespace)."""
    prefix = str(path)
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
            if point == prefix or point.startswith(prefix + "/"):
                out.append(point)
    return out


def unmount_under(path: Path) -> None:
    """Detach every mount at or below `path`, deepest first."""
    for point in sorted(mounts_under(path), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
