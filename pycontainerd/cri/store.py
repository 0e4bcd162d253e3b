"""What the CRI plugin remembers about pods and containers, and where it keeps it.

Nothing lives only in memory. A pod sandbox and a CRI container are each a containerd
container record in namespace ``k8s.io``: the label ``io.cri-containerd.kind`` says which,
and the extension ``io.pycontainerd.cri.metadata`` holds the immutable facts as JSON (the
CRI config as serialized protobuf, names, network namespace and IP, log path, image). What
changes — a container's pid, start and finish times, exit code and reason, its log writer —
is a small JSON status file under the plugin's root, replaced atomically on each change.
After a daemon restart both are read back (``RuntimeState.recover`` in ``runtime``), so
ids, names and states are the same as before. ``NameIndex`` reserves the CRI names
(``name_namespace_uid_attempt``), as containerd's name index does.

Each pod also has a directory under the plugin's state (``sandboxes/<id>``) with its
``hostname``, ``hosts`` and ``resolv.conf`` and, unless it shares the host's IPC
namespace, ``shm``: a 64 MiB tmpfs every member of the pod bind-mounts at ``/dev/shm``.
The tmpfs is a mount in the daemon's namespace, so it is unmounted when the pod stops and
when a directory no known pod owns is found at recovery (``reclaim_sandbox_dirs``).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from pycontainerd.api.cri.runtime.v1 import api_pb2
from pycontainerd.errdefs import DataLoss, PycdError
from pycontainerd.grpc.transport import Wire, encode_field
from pycontainerd.snapshots.mount import MNT_DETACH, Mount, unmount_all

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping
    from pathlib import Path

    from google.protobuf.message import Message

__all__ = [
    "CONTAINER_KIND",
    "EXT_KEY",
    "EXT_TYPE",
    "KIND_LABEL",
    "SANDBOX_KIND",
    "ContainerMeta",
    "ContainerStatus",
    "NameIndex",
    "NameReserved",
    "SandboxMeta",
    "StatusStore",
    "WireList",
    "mount_shm",
    "reclaim_sandbox_dirs",
    "remove_sandbox_dir",
    "unmount_shm",
]

KIND_LABEL = "io.cri-containerd.kind"
SANDBOX_KIND = "sandbox"
CONTAINER_KIND = "container"
EXT_KEY = "io.pycontainerd.cri.metadata"
EXT_TYPE = "pycontainerd.io/cri/Metadata"
SHM_SIZE = 64 << 20  # containerd's default pod /dev/shm size
SHM_OPTIONS = ("nosuid", "nodev", "noexec", "mode=1777", f"size={SHM_SIZE}")


class NameReserved(PycdError):
    """A sandbox or container name already belongs to another id (gRPC UNKNOWN, as
    containerd reports it)."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# Parsed configs, by their serialized bytes: List calls read every container's config and
# parsing dominated them. Callers treat the messages as read-only.
@functools.lru_cache(maxsize=4096)
def _sandbox_config(data: bytes) -> api_pb2.PodSandboxConfig:
    return api_pb2.PodSandboxConfig.FromString(data)


@functools.lru_cache(maxsize=4096)
def _container_config(data: bytes) -> api_pb2.ContainerConfig:
    return api_pb2.ContainerConfig.FromString(data)


@dataclass(slots=True)
class SandboxMeta:
    id: str
    name: str
    config: bytes  # api_pb2.PodSandboxConfig, serialized
    created_at: int  # ns since the epoch
    netns: str = ""
    ip: str = ""
    additional_ips: list[str] = field(default_factory=list)
    runtime_handler: str = ""

    def config_pb(self) -> api_pb2.PodSandboxConfig:
        return _sandbox_config(self.config)

    def to_json(self) -> bytes:
        doc = asdict(self)
        doc["config"] = _b64(self.config)
        return json.dumps(doc).encode()

    @classmethod
    def from_json(cls, data: bytes) -> SandboxMeta:
        doc = _load(data)
        doc["config"] = base64.b64decode(doc["config"])
        return cls(**doc)


@dataclass(slots=True)
class ContainerMeta:
    id: str
    name: str
    sandbox_id: str
    config: bytes  # api_pb2.ContainerConfig, serialized
    created_at: int
    image_name: str  # the image record used
    image_id: str  # its config digest
    image_ref: str  # what kubelet reports as imageRef (repo digest, else the id)
    log_path: str = ""
    stop_signal: str = "SIGTERM"

    def config_pb(self) -> api_pb2.ContainerConfig:
        return _container_config(self.config)

    def to_json(self) -> bytes:
        doc = asdict(self)
        doc["config"] = _b64(self.config)
        return json.dumps(doc).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ContainerMeta:
        doc = _load(data)
        doc["config"] = base64.b64decode(doc["config"])
        return cls(**doc)


def _load(data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise DataLoss(f"CRI metadata is corrupt: {exc}") from exc
    if not isinstance(doc, dict):
        raise DataLoss("CRI metadata is not an object")
    return doc


@dataclass(slots=True)
class ContainerStatus:
    """A container's changing state; times in ns since the epoch (0: not yet)."""

    pid: int = 0
    started_at: int = 0
    finished_at: int = 0
    exit_code: int = 0
    reason: str = ""
    message: str = ""
    oom: bool = False
    log_writer_pid: int = 0
    removing: bool = False

    @property
    def state(self) -> api_pb2.ContainerState.ValueType:
        if self.finished_at:
            return api_pb2.CONTAINER_EXITED
        if self.started_at:
            return api_pb2.CONTAINER_RUNNING
        return api_pb2.CONTAINER_CREATED


class StatusStore:
    """Per-container directories under ``root``: ``status.json`` and the log FIFOs."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def dir(self, id_: str) -> Path:
        return self.root / id_

    def save(self, id_: str, status: ContainerStatus) -> None:
        d = self.dir(id_)
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(prefix=".status.", dir=d)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(asdict(status), f)
        os.replace(tmp, d / "status.json")

    def load(self, id_: str) -> ContainerStatus:
        try:
            data = (self.dir(id_) / "status.json").read_bytes()
        except FileNotFoundError:
            return ContainerStatus()
        doc = _load(data)
        known = set(ContainerStatus.__dataclass_fields__)
        return ContainerStatus(**{k: v for k, v in doc.items() if k in known})

    def remove(self, id_: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.dir(id_))


class NameIndex:
    """CRI names to ids; a name belongs to one id until released."""

    def __init__(self) -> None:
        self._by_name: dict[str, str] = {}

    def reserve(self, name: str, id_: str) -> None:
        owner = self._by_name.get(name)
        if owner is not None and owner != id_:
            raise NameReserved(
                f"failed to reserve name {name!r}: name {name!r} is reserved for {owner!r}"
            )
        self._by_name[name] = id_

    def release(self, name: str, id_: str) -> None:
        if self._by_name.get(name) == id_:
            del self._by_name[name]


def sandbox_name(md: api_pb2.PodSandboxMetadata) -> str:
    return "_".join((md.name, md.namespace, md.uid, str(md.attempt)))


def container_name(md: api_pb2.ContainerMetadata, sandbox: api_pb2.PodSandboxMetadata) -> str:
    return "_".join((md.name, sandbox.name, sandbox.namespace, sandbox.uid, str(md.attempt)))


# ---------------------------------------------------------------------- pod directories
# Blocking: call these from a worker thread.


def mount_shm(sandbox_dir: Path) -> Path:
    """Mount the pod's ``/dev/shm`` tmpfs at ``<sandbox_dir>/shm``; its path."""
    target = sandbox_dir / "shm"
    target.mkdir(mode=0o700, exist_ok=True)
    Mount("tmpfs", "shm", options=SHM_OPTIONS).mount(target)
    return target


def unmount_shm(sandbox_dir: Path) -> None:
    """Unmount the pod's ``/dev/shm`` tmpfs if it is mounted (detached: a process whose
    working directory is there must not keep the pod from stopping)."""
    unmount_all(sandbox_dir / "shm", MNT_DETACH)


def remove_sandbox_dir(sandbox_dir: Path) -> None:
    """Unmount the pod's tmpfs, then remove its directory (never the tmpfs's content
    through a still-mounted tmpfs: that is the pod's memory, not disk)."""
    unmount_shm(sandbox_dir)
    shutil.rmtree(sandbox_dir, ignore_errors=True)


def reclaim_sandbox_dirs(root: Path, known: set[str]) -> list[str]:
    """Remove the directories under ``root`` of pods not in ``known``; their ids."""
    try:
        entries = list(root.iterdir())
    except FileNotFoundError:
        return []
    gone = []
    for d in entries:
        if d.name not in known and d.is_dir():
            remove_sandbox_dir(d)
            gone.append(d.name)
    return gone


def filter_matches(
    f: api_pb2.ContainerFilter | api_pb2.PodSandboxFilter | None,
    item_id: str,
    state: int,
    labels: Callable[[], Mapping[str, str]],
) -> bool:
    """What the CRI's container and sandbox filters have in common: no filter matches
    everything; else an id prefix, a state, and a label selector (``labels`` is read
    only when the cheaper checks pass)."""
    if f is None:
        return True
    if f.id and not item_id.startswith(f.id):
        return False
    if f.HasField("state") and state != f.state.state:
        return False
    found = labels()
    return all(found.get(k) == v for k, v in f.label_selector.items())


class WireList:
    """A list answer (repeated field 1 of the response) built from per-item encodings.

    An item's entry changes only with its state, so each is encoded once per state and
    the answer is their concatenation: building a hundred messages per call (kubelet
    lists every second or so) cost ~20 µs each. Items gone since the previous answer
    drop out of the cache.
    """

    def __init__(self) -> None:
        self._kept: dict[str, tuple[int, bytes]] = {}

    def answer(self, items: Iterable[tuple[str, int, bool, Callable[[], Message]]]) -> Wire:
        """``items``: (id, state, listed by the filter, the entry's message when needed)."""
        kept: dict[str, tuple[int, bytes]] = {}
        out = []
        for id_, state, listed, build in items:
            hit = self._kept.get(id_)
            if hit is None or hit[0] != state:
                hit = (state, encode_field(1, build().SerializeToString()))
            kept[id_] = hit
            if listed:
                out.append(hit[1])
        self._kept = kept
        return Wire(b"".join(out))
