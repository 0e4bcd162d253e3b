"""Our shim under the real containerd: ``ctr run --runtime io.containerd.pyrunc.v1``.

containerd finds ``containerd-shim-pyrunc-v1`` on its PATH: a wrapper script in a temp dir
that runs ``python -m pycontainerd.shim`` is put first on the PATH of containerd's process.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import TYPE_CHECKING

import pytest

from tests.shim.conftest import SKIP
from tests.support.containerd import CONTAINERD, Containerd
from tests.support.daemon import CTR
from tests.support.images import busybox_image, write_oci_archive

pytestmark = [
    pytest.mark.root,
    pytest.mark.ctr,
    pytest.mark.skipif(SKIP is not None, reason=SKIP or ""),
    pytest.mark.skipif(CONTAINERD is None or CTR is None, reason="needs containerd and ctr"),
]

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

RUNTIME = "io.containerd.pyrunc.v1"
REF = "docker.io/library/busybox:shimtest"


class ContainerdWithPyrunc(Containerd):
    """containerd whose PATH starts with a directory holding our shim's wrapper."""

    def __init__(self) -> None:
        super().__init__()
        self.bin = self.base / "bin"
        self.bin.mkdir()
        shim = self.bin / "containerd-shim-pyrunc-v1"
        shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m pycontainerd.shim "$@"\n')
        shim.chmod(0o755)

    def env(self) -> dict[str, str]:
        env = super().env()
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        return env


@pytest.fixture(scope="module")
def containerd() -> Iterator[ContainerdWithPyrunc]:
    d = ContainerdWithPyrunc().start()
    archive = d.base / "busybox.tar"
    write_oci_archive(archive, {REF: busybox_image()})
    d.ctr("images", "import", str(archive))
    yield d
    d.cleanup()
    _kill_zygote(d.base)


def _kill_zygote(base: Path) -> None:
    from tests.shim.conftest import _kill_socket_owner

    sdir = base / "s"
    if sdir.is_dir():
        for sock in sdir.iterdir():
            _kill_socket_owner(sock)
    shutil.rmtree(base, ignore_errors=True)


def test_ctr_run_rm_echo(containerd: ContainerdWithPyrunc) -> None:
    res = containerd.ctr("run", "--rm", "--runtime", RUNTIME, REF, "c1", "echo", "hello")
    assert res.stdout == "hello\n", containerd.log()
    # --rm removed everything: no task, no container.
    assert "c1" not in containerd.ctr("containers", "ls", "-q").stdout


def test_ctr_run_exit_code_and_exec(containerd: ContainerdWithPyrunc) -> None:
    res = containerd.ctr(
        "run", "--rm", "--runtime", RUNTIME, REF, "c2", "sh", "-c", "exit 7", check=False
    )
    assert res.returncode == 7, res.stderr + containerd.log()
    containerd.ctr("run", "-d", "--runtime", RUNTIME, REF, "c3", "sleep", "1000")
    try:
        out = containerd.ctr("task", "exec", "--exec-id", "x1", "c3", "echo", "from-exec")
        assert out.stdout == "from-exec\n"
        ps = containerd.ctr("task", "ls").stdout
        assert "c3" in ps
        assert "RUNNING" in ps
    finally:
        containerd.ctr("task", "kill", "-s", "SIGKILL", "c3", check=False)
        for _ in range(100):
            if "STOPPED" in containerd.ctr("task", "ls").stdout:
                break
            time.sleep(0.05)
        containerd.ctr("task", "delete", "c3", check=False)
        containerd.ctr("containers", "delete", "c3", check=False)
