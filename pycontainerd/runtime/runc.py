"""Typed wrapper around an OCI runtime binary (runc, crun, youki...): the only place runc runs.

Every call is ``<binary> --root R [--log L --log-format json] [--systemd-cgroup] <cmd> ...``,
as containerd's go-runc builds it. How the binary is started is left to a :class:`Runner`:
the default spawns through asyncio, the shim passes its reaper so that one ``waitpid`` loop
sees every exit (runc's and the containers'). Failures raise :class:`RuncError` carrying the
runtime's own message — from its captured stderr or, for ``create``/``exec`` whose stdio
belongs to the container, from the last ``error`` entry of the JSON log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from pycontainerd.errdefs import NotFound, PycdError

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "Result",
    "Runc",
    "RuncError",
    "Runner",
    "Stdio",
    "SubprocessRunner",
    "is_not_running",
]

DEFAULT_BINARY = "runc"


class RuncError(PycdError):
    """The runtime exited non-zero; ``message`` is its own error text."""

    def __init__(self, message: str, status: int = -1) -> None:
        super().__init__(message)
        self.status = status


def is_not_running(exc: BaseException) -> bool:
    """Whether a kill/pause error means the process is already gone (containerd's check)."""
    text = str(exc)
    return any(
        s in text for s in ("process already finished", "container not running", "no such process")
    ) or isinstance(exc, NotFound)


def is_not_exist(exc: BaseException) -> bool:
    text = str(exc)
    return "does not exist" in text or "not found" in text.lower()


@dataclass(frozen=True, slots=True)
class Stdio:
    """File descriptors for the child's 0, 1, 2; ``None`` means ``/dev/null``."""

    stdin: int | None = None
    stdout: int | None = None
    stderr: int | None = None


@dataclass(frozen=True, slots=True)
class Result:
    status: int
    stdout: bytes = b""
    stderr: bytes = b""


class Runner(Protocol):
    """Starts a program and waits for it: ``stdio`` given → those fds, no capture;
    otherwise stdout and stderr are captured and ``input`` (if any) is fed to stdin."""

    async def run(
        self, argv: Sequence[str], *, stdio: Stdio | None = None, input: bytes | None = None
    ) -> Result: ...


class SubprocessRunner:
    """A :class:`Runner` on asyncio subprocesses (for processes that own no reaper)."""

    async def run(
        self, argv: Sequence[str], *, stdio: Stdio | None = None, input: bytes | None = None
    ) -> Result:
        if stdio is not None:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=stdio.stdin if stdio.stdin is not None else subprocess.DEVNULL,
                stdout=stdio.stdout if stdio.stdout is not None else subprocess.DEVNULL,
                stderr=stdio.stderr if stdio.stderr is not None else subprocess.DEVNULL,
            )
            return Result(await proc.wait())
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = await proc.communicate(input)
        code = proc.returncode if proc.returncode is not None else -1
        return Result(code if code >= 0 else 128 - code, out, err)


def _last_log_error(path: str) -> str:
    """The message of the last ``error``/``fatal`` entry of a runc JSON log ("" if none)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 65536))
            lines = f.read().splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and entry.get("level") in ("error", "fatal"):
                return str(entry.get("msg", ""))
    return ""


class Runc:
    """One runtime binary with one state root (``--root``) and one log file."""

    def __init__(
        self,
        root: str,
        *,
        binary: str = DEFAULT_BINARY,
        log: str | None = None,
        systemd_cgroup: bool = False,
        criu: str = "",
        runner: Runner | None = None,
    ) -> None:
        self.root = root
        self.binary = binary or DEFAULT_BINARY
        self.log = log
        self.systemd_cgroup = systemd_cgroup
        self.criu = criu
        self.runner: Runner = runner if runner is not None else SubprocessRunner()

    def _argv(self, *args: str) -> list[str]:
        argv = [self.binary, "--root", self.root]
        if self.log:
            argv += ["--log", self.log, "--log-format", "json"]
        if self.criu:
            argv += ["--criu", self.criu]
        if self.systemd_cgroup:
            argv.append("--systemd-cgroup")
        argv.extend(args)
        return argv

    async def _fail(self, what: str, res: Result) -> RuncError:
        text = res.stderr.decode(errors="replace").strip()
        if not text and self.log:
            text = await asyncio.to_thread(_last_log_error, self.log)
        # runc's stderr in json mode is a log line too: keep only its message.
        if text.startswith("{"):
            with contextlib.suppress(ValueError):
                text = str(json.loads(text.splitlines()[-1]).get("msg", text))
        return RuncError(
            f"{what}: {text or f'{self.binary} exited with status {res.status}'}", res.status
        )

    async def _call(self, what: str, *args: str, input: bytes | None = None) -> bytes:
        res = await self.runner.run(self._argv(*args), input=input)
        if res.status != 0:
            raise await self._fail(what, res)
        return res.stdout

    async def _call_stdio(self, what: str, stdio: Stdio, *args: str) -> None:
        res = await self.runner.run(self._argv(*args), stdio=stdio)
        if res.status != 0:
            raise await self._fail(what, res)

    async def create(
        self,
        id: str,
        bundle: str,
        *,
        pid_file: str,
        stdio: Stdio,
        console_socket: str | None = None,
        no_pivot: bool = False,
        no_new_keyring: bool = False,
    ) -> None:
        """``runc create``: the container's init waits in runc's exec FIFO until ``start``."""
        args = ["create", "--bundle", bundle, "--pid-file", pid_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        if no_pivot:
            args.append("--no-pivot")
        if no_new_keyring:
            args.append("--no-new-keyring")
        await self._call_stdio("OCI runtime create failed", stdio, *args, id)

    async def start(self, id: str) -> None:
        await self._call("OCI runtime start failed", "start", id)

    async def exec(
        self,
        id: str,
        process_file: str,
        *,
        pid_file: str,
        stdio: Stdio,
        console_socket: str | None = None,
    ) -> None:
        """``runc exec --detach``: returns once the process runs (its pid is in ``pid_file``)."""
        args = ["exec", "--process", process_file, "--detach", "--pid-file", pid_file]
        if console_socket:
            args += ["--console-socket", console_socket]
        await self._call_stdio("OCI runtime exec failed", stdio, *args, id)

    async def kill(self, id: str, signal: int, *, all: bool = False) -> None:
        args = ["kill"] + (["--all"] if all else []) + [id, str(signal)]
        await self._call("OCI runtime kill failed", *args)

    async def delete(self, id: str, *, force: bool = False) -> None:
        args = ["delete"] + (["--force"] if force else []) + [id]
        await self._call("OCI runtime delete failed", *args)

    async def pause(self, id: str) -> None:
        await self._call("OCI runtime pause failed", "pause", id)

    async def resume(self, id: str) -> None:
        await self._call("OCI runtime resume failed", "resume", id)

    async def ps(self, id: str) -> list[int]:
        out = await self._call("OCI runtime ps failed", "ps", "--format", "json", id)
        pids = json.loads(out or b"[]")
        return [int(p) for p in pids or []]

    async def state(self, id: str) -> dict[str, Any]:
        out = await self._call("OCI runtime state failed", "state", id)
        data: dict[str, Any] = json.loads(out)
        return data

    async def stats(self, id: str) -> dict[str, Any]:
        """The ``data`` of ``runc events --stats`` (cgroup statistics, runc's JSON shape)."""
        out = await self._call("OCI runtime stats failed", "events", "--stats", id)
        event = json.loads(out)
        data: dict[str, Any] = event.get("data") or {}
        return data

    async def update(self, id: str, resources_json: bytes) -> None:
        await self._call(
            "OCI runtime update failed", "update", "--resources", "-", id, input=resources_json
        )

    async def checkpoint(
        self,
        id: str,
        image_path: str,
        *,
        work_path: str = "",
        leave_running: bool = True,
        tcp_established: bool = False,
        ext_unix_sk: bool = False,
        shell_job: bool = False,
        file_locks: bool = False,
        empty_ns: Sequence[str] = (),
        cgroups_mode: str = "",
    ) -> None:
        args = ["checkpoint", "--image-path", image_path]
        if work_path:
            args += ["--work-path", work_path]
        if leave_running:
            args.append("--leave-running")
        if tcp_established:
            args.append("--tcp-established")
        if ext_unix_sk:
            args.append("--ext-unix-sk")
        if shell_job:
            args.append("--shell-job")
        if file_locks:
            args.append("--file-locks")
        for ns in empty_ns:
            args += ["--empty-ns", ns]
        if cgroups_mode:
            args += ["--manage-cgroups-mode", cgroups_mode]
        await self._call("OCI runtime checkpoint failed", *args, id)
