"""The generated API code matches protos/, and the package works from a built wheel."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GENERATED = REPO / "pycontainerd" / "api"


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and p.suffix in (".py", ".pyi") and "__pycache__" not in p.parts
    }


def test_generated_code_is_current(tmp_path: Path) -> None:
    env_py = {**os.environ, "PYTHON": sys.executable}
    subprocess.run([str(REPO / "scripts" / "gen-protos"), str(tmp_path)], check=True, env=env_py)
    fresh = _tree(tmp_path / "pycontainerd" / "api")
    installed = _tree(GENERATED)
    assert fresh, "protoc generated nothing"
    stale = sorted(k for k in fresh if installed.get(k) != fresh[k])
    extra = sorted(set(installed) - set(fresh))
    assert not stale, f"generated code is stale, reinstall (pip install -e .): {stale[:5]}"
    assert not extra, f"generated files without a .proto: {extra[:5]}"


def test_wire_names_match_containerd() -> None:
    from pycontainerd.api.services.events.v1 import events_pb2
    from pycontainerd.api.services.tasks.v1 import tasks_pb2

    svc = tasks_pb2.DESCRIPTOR.services_by_name["Tasks"]
    assert svc.full_name == "containerd.services.tasks.v1.Tasks"
    create = tasks_pb2.CreateTaskRequest.DESCRIPTOR.fields_by_name
    assert (
        create["container_id"].number,
        create["terminal"].number,
        create["runtime_path"].number,
    ) == (1, 7, 10)
    env = events_pb2.Envelope.DESCRIPTOR.fields_by_name
    assert [env[n].number for n in ("timestamp", "namespace", "topic", "event")] == [1, 2, 3, 4]


@pytest.mark.slow
def test_builtin_plugins_import_from_a_wheel(tmp_path: Path) -> None:
    # protoc finds the mypy-protobuf plugins on PATH, beside this interpreter.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--outdir",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        env=env,
    )
    (wheel,) = tmp_path.glob("pycontainerd-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        zf.extractall(site)
    assert "pycontainerd/plugins/builtins.py" in names
    assert not any(n.startswith("plugins/") for n in names), "a bare top-level 'plugins' package"
    assert any(n.startswith("pycontainerd/api/services/tasks/v1/tasks_pb2") for n in names)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import pycontainerd, pycontainerd.plugins.builtins as b;"
        "assert pycontainerd.__file__.startswith(sys.argv[1]), pycontainerd.__file__;"
        "print(len(b.BUILTINS))"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(site)], capture_output=True, text=True, check=True
    )
    assert int(res.stdout) >= 8
