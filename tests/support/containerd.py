"""Run Debian's real containerd beside ours, on private paths, for comparisons."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from tests.support.daemon import Daemon

CONTAINERD = shutil.which("containerd")


class Containerd(Daemon):
    """containerd 1.6 with its CRI plugin off, on its own root, state and socket."""

    def __init__(self, base: Path | None = None, config: str = "") -> None:
        base = base or Path(tempfile.mkdtemp(prefix="ctd-", dir="/tmp"))
        super().__init__(base, config)
        self.config_path.write_text(
            'version = 2\ndisabled_plugins = ["io.containerd.grpc.v1.cri"]\n' + config
        )

    def command(self) -> list[str]:
        assert CONTAINERD is not None
        return [
            CONTAINERD,
            "--config",
            str(self.config_path),
            "--root",
            str(self.root),
            "--state",
            str(self.state),
            "--address",
            self.address,
            "--log-level",
            "warn",
        ]
