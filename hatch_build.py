"""Build hook: generate the Python code for protos/ (protobuf, gRPC stubs, mypy stubs).

Run by hatchling for every build (wheel and editable install) and by ``scripts/gen-protos``.
We use our own hook rather than hatch-protobuf because ``google/rpc/status.proto`` (from
googleapis-common-protos, a build dependency) must be found in the *build* environment,
which hatch-protobuf's ``import_site_packages`` does not look at: a fresh venv failed.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

ROOT = Path(__file__).resolve().parent
PROTOS = ROOT / "protos"


def _googleapis_include() -> str:
    spec = importlib.util.find_spec("google.rpc.status_pb2")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "googleapis-common-protos is required to build (google/rpc/status.proto)"
        )
    return str(Path(spec.origin).resolve().parents[2])


def _plugin(tmp: str, name: str, func: str) -> str:
    # mypy-protobuf's plugins as scripts on this interpreter: no reliance on PATH.
    path = os.path.join(tmp, f"protoc-gen-{name}")
    with open(path, "w") as f:
        f.write(f"#!{sys.executable}\nfrom mypy_protobuf.main import {func}\n{func}()\n")
    os.chmod(path, 0o755)
    return path


def proto_files() -> list[str]:
    return sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))


def generate(out: Path) -> list[Path]:
    """Write the generated modules for every .proto under ``out``; returns the files."""
    out.mkdir(parents=True, exist_ok=True)
    files = proto_files()
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"--proto_path={PROTOS}",
            f"--proto_path={_googleapis_include()}",
            f"--plugin=protoc-gen-mypy={_plugin(tmp, 'mypy', 'main')}",
            f"--plugin=protoc-gen-mypy_grpc={_plugin(tmp, 'mypy_grpc', 'grpc')}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"--mypy_out={out}",
            f"--mypy_grpc_out={out}",
            *files,
        ]
        subprocess.run(args, check=True, cwd=ROOT)
    generated = []
    for f in files:
        stem = f[: -len(".proto")]
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi"):
            generated.append(out / (stem + suffix))
    return generated


class ProtoBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        for path in generate(ROOT):
            build_data["artifacts"].append(path.relative_to(ROOT).as_posix())


if __name__ == "__main__":
    generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)
