"""OCI runtime spec generation: containerd's Linux defaults plus the image config.

``generate_spec`` starts from the defaults containerd's ``oci.populateDefaultUnixSpec``
uses (14 capabilities, no inheritable set, pid/ipc/uts/mount/network namespaces, masked
and read-only /proc paths, cgroups path ``/<namespace>/<id>``) and layers on the image
config (Env, WorkingDir, User, Entrypoint/Cmd, deep-copied per container) and the
caller's options. User names are resolved against the image's own ``/etc/passwd`` and
``/etc/group`` (``UserDB``); numeric IDs outside [0, 2^31-1] are not IDs at all
(CVE-2024-40635) and fall back to a name lookup, which fails.
"""

from __future__ import annotations

import copy
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pycontainerd.errdefs import InvalidArgument, NotFound

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

__all__ = [
    "PROCESS_TYPE_URL",
    "SPEC_TYPE_URL",
    "Mount",
    "Resources",
    "UserDB",
    "generate_spec",
    "resolve_user",
]

SPEC_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
PROCESS_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/Process"
OCI_VERSION = "1.0.2-dev"
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MAX_ID = 2**31 - 1
DEFAULT_CAPS = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
)  # fmt: skip
ALL_CAPS = (
    *DEFAULT_CAPS, "CAP_DAC_READ_SEARCH", "CAP_LINUX_IMMUTABLE", "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN", "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO",
    "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_LEASE", "CAP_AUDIT_CONTROL",
    "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
)  # fmt: skip
MASKED_PATHS = (
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
    "/proc/scsi", "/sys/devices/virtual/powercap",
)  # fmt: skip
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")


def _default_mounts() -> list[dict[str, Any]]:
    def m(dst: str, typ: str, src: str, *opts: str) -> dict[str, Any]:
        return {"destination": dst, "type": typ, "source": src, "options": list(opts)}

    return [
        m("/proc", "proc", "proc", "nosuid", "noexec", "nodev"),
        m("/dev", "tmpfs", "tmpfs", "nosuid", "strictatime", "mode=755", "size=65536k"),
        m(
            "/dev/pts",
            "devpts",
            "devpts",
            "nosuid",
            "noexec",
            "newinstance",
            "ptmxmode=0666",
            "mode=0620",
            "gid=5",
        ),
        m("/dev/shm", "tmpfs", "shm", "nosuid", "noexec", "nodev", "mode=1777", "size=65536k"),
        m("/dev/mqueue", "mqueue", "mqueue", "nosuid", "noexec", "nodev"),
        m("/sys", "sysfs", "sysfs", "nosuid", "noexec", "nodev", "ro"),
        m("/run", "tmpfs", "tmpfs", "nosuid", "strictatime", "mode=755", "size=65536k"),
    ]


@dataclass(frozen=True, slots=True)
class Mount:
    """A mount into the container; a bind mount of a host path by default."""

    source: str
    destination: str
    type: str = "bind"
    options: tuple[str, ...] = ("rbind", "rw")

    @classmethod
    def bind(cls, source: str, destination: str, *, readonly: bool = False) -> Mount:
        return cls(source, destination, "bind", ("rbind", "ro" if readonly else "rw"))

    def to_json(self) -> dict[str, Any]:
        return {
            "destination": self.destination,
            "type": self.type,
            "source": self.source,
            "options": list(self.options),
        }


@dataclass(frozen=True, slots=True)
class Resources:
    memory: int | None = None  # bytes
    cpus: float | None = None  # CPUs' worth of time per period
    pids: int | None = None

    def apply(self, res: dict[str, Any]) -> None:
        if self.memory is not None:
            if self.memory <= 0:
                raise InvalidArgument("memory limit must be positive")
            res["memory"] = {"limit": self.memory}
        if self.cpus is not None:
            if self.cpus <= 0:
                raise InvalidArgument("cpus must be positive")
            res["cpu"] = {"quota": int(self.cpus * 100_000), "period": 100_000}
        if self.pids is not None:
            res["pids"] = {"limit": self.pids}


@dataclass(frozen=True, slots=True)
class UserDB:
    """The image's ``/etc/passwd`` and ``/etc/group`` text (empty when absent)."""

    passwd: str = ""
    group: str = ""

    def _rows(self, text: str, width: int) -> list[list[str]]:
        rows = []
        for line in text.splitlines():
            parts = line.split(":")
            if len(parts) >= width and parts[0] and not line.startswith("#"):
                rows.append(parts)
        return rows

    def user(self, key: str | int) -> tuple[str, int, int]:
        """(name, uid, gid) of a passwd entry by name or uid; NotFound if none."""
        for row in self._rows(self.passwd, 4):
            uid, gid = _as_id(row[2]), _as_id(row[3])
            if uid is None or gid is None:
                continue
            if row[0] == key or uid == key:
                return row[0], uid, gid
        raise NotFound(f"no user {key!r} in the image's /etc/passwd")

    def group_id(self, name: str) -> int:
        for row in self._rows(self.group, 3):
            gid = _as_id(row[2])
            if row[0] == name and gid is not None:
                return gid
        raise NotFound(f"no group {name!r} in the image's /etc/group")

    def groups_of(self, user: str) -> list[int]:
        out = []
        for row in self._rows(self.group, 4):
            gid = _as_id(row[2])
            if gid is not None and user in row[3].split(","):
                out.append(gid)
        return out


def _as_id(text: str) -> int | None:
    """A numeric ID, or None for a name or a number outside [0, 2^31-1]."""
    if not text.isdigit():
        return None
    value = int(text)
    return value if value <= MAX_ID else None


def resolve_user(spec_user: str, db: UserDB) -> dict[str, Any]:
    """``user[:group]`` (names or IDs) -> the spec's ``process.user``.

    additionalGids are the final user's primary gid plus its /etc/group memberships
    (CVE-2023-25173); an explicit group replaces them with that group alone.
    """
    user_part, _, group_part = spec_user.partition(":")
    if not user_part:
        raise InvalidArgument(f"invalid user {spec_user!r}")
    uid = _as_id(user_part)
    name = ""
    gid = 0
    if uid is None:
        name, uid, gid = db.user(user_part)  # NotFound for names and out-of-range numbers
    else:
        try:
            name, _, gid = db.user(uid)
        except NotFound:
            gid = 0
    if group_part:
        g = _as_id(group_part)
        gid = g if g is not None else db.group_id(group_part)
        return {"uid": uid, "gid": gid, "additionalGids": [gid]}
    extra = sorted({gid, *(db.groups_of(name) if name else [])})
    return {"uid": uid, "gid": gid, "additionalGids": extra}


def _merge_env(base: Sequence[str], extra: Sequence[str]) -> list[str]:
    out: dict[str, str] = {}
    for item in (*base, *extra):
        key = item.split("=", 1)[0]
        out.pop(
            key, None
        )  # a later value replaces, and moves to the end like Go's ReplaceOrAppendEnvValues
        out[key] = item
    return list(out.values())


def generate_spec(
    namespace: str,
    container_id: str,
    image_config: Mapping[str, Any],
    *,
    args: Sequence[str] | None = None,
    env: Sequence[str] = (),
    cwd: str | None = None,
    user: str | None = None,
    userdb: UserDB | None = None,
    mounts: Sequence[Mount] = (),
    tty: bool = False,
    hostname: str | None = None,
    resources: Resources | None = None,
    privileged: bool = False,
    network: str = "none",
) -> dict[str, Any]:
    """The full OCI runtime spec for a container (JSON-ready dict).

    ``network``: ``host`` shares the host's network namespace (and its hosts and
    resolv.conf files); ``none`` gives a fresh empty one; a path names a namespace to join.
    """
    cfg = copy.deepcopy(dict(image_config))
    image_env = [e for e in cfg.get("Env") or [] if isinstance(e, str)]
    if not any(e.startswith("PATH=") for e in image_env):
        image_env.insert(0, DEFAULT_PATH)
    entrypoint = [str(x) for x in cfg.get("Entrypoint") or []]
    argv = [*entrypoint, *args] if args else [*entrypoint, *(str(x) for x in cfg.get("Cmd") or [])]
    if not argv:
        raise InvalidArgument("no command given and the image has neither Entrypoint nor Cmd")
    caps = list(ALL_CAPS if privileged else DEFAULT_CAPS)
    process: dict[str, Any] = {
        "terminal": tty,
        "user": {"uid": 0, "gid": 0},
        "args": argv,
        "env": _merge_env(image_env, env),
        "cwd": cwd or cfg.get("WorkingDir") or "/",
        "capabilities": {"bounding": caps, "permitted": caps, "effective": caps},
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
        "noNewPrivileges": not privileged,
    }
    wanted_user = user if user is not None else str(cfg.get("User") or "")
    if wanted_user:
        process["user"] = resolve_user(wanted_user, userdb or UserDB())
    namespaces: list[dict[str, str]] = [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
    spec_mounts = _default_mounts()
    if network == "host":
        spec_mounts += [
            Mount.bind("/etc/hosts", "/etc/hosts", readonly=True).to_json(),
            Mount.bind("/etc/resolv.conf", "/etc/resolv.conf", readonly=True).to_json(),
        ]
    elif network in ("none", "", "bridge"):
        namespaces.append({"type": "network"})
    else:
        namespaces.append({"type": "network", "path": network})
    if privileged:
        # Privileged: /sys writable, as containerd's WithPrivileged does through WithWriteableSysfs.
        for m in spec_mounts:
            if m["destination"] == "/sys":
                m["options"] = [o for o in m["options"] if o != "ro"]
    spec_mounts += [m.to_json() for m in mounts]
    resources_doc: dict[str, Any] = {
        "devices": [{"allow": privileged, "access": "rwm"}],
    }
    if resources is not None:
        resources.apply(resources_doc)
    spec: dict[str, Any] = {
        "ociVersion": OCI_VERSION,
        "process": process,
        "root": {"path": "rootfs"},
        "hostname": hostname if hostname is not None else container_id[:63],
        "mounts": spec_mounts,
        "linux": {
            "resources": resources_doc,
            "cgroupsPath": f"/{namespace}/{container_id}",
            "namespaces": namespaces,
            "maskedPaths": [] if privileged else list(MASKED_PATHS),
            "readonlyPaths": [] if privileged else list(READONLY_PATHS),
        },
    }
    if network == "host" and hostname is None:
        spec["hostname"] = socket.gethostname()  # as ctr does with --net-host
    return spec
