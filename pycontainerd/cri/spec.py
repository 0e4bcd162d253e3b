"""OCI runtime specs for pod sandboxes and CRI containers.

Both start from the SDK's containerd defaults (``pycontainerd.client.spec.generate_spec``)
and then apply the CRI config the way containerd's CRI plugin does: the sandbox owns the
pod's network, IPC, UTS and PID namespaces; a container joins them through
``/proc/<sandbox pid>/ns/*`` as its namespace options say (``NODE``: the host's; ``TARGET``:
another container's PID namespace), bind-mounts the sandbox's ``hosts``, ``hostname`` and
``resolv.conf``, and gets the security context (user, capabilities — ``ALL`` in add or drop
means every one — read-only rootfs, no_new_privs, privileged, masked and read-only paths,
the seccomp profile ``seccomp.choose`` picks — RuntimeDefault built from the process's
capabilities, or a Localhost file) and Linux resources. Every pod member mounts the pod's
``/dev/shm`` (``shm_dir``; the host's when the pod shares the host IPC namespace). A
RuntimeDefault AppArmor profile is accepted and means no profile, as for containerd
without AppArmor. Everything here is pure except ``host_prep`` (stat devices, create
missing bind sources, read a seccomp profile), run in a thread by the caller.
"""

from __future__ import annotations

import copy
import os
import stat
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pycontainerd.api.cri.runtime.v1 import api_pb2
from pycontainerd.client.spec import ALL_CAPS, DEFAULT_CAPS, generate_spec
from pycontainerd.cri import seccomp
from pycontainerd.errdefs import FailedPrecondition, InvalidArgument

if TYPE_CHECKING:
    from collections.abc import Mapping

    from pycontainerd.client.spec import UserDB

__all__ = [
    "HostPrep",
    "OomPolicy",
    "container_spec",
    "host_prep",
    "image_argv",
    "sandbox_spec",
    "wanted_user",
]

NAMESPACE = "k8s.io"
SANDBOX_OOM_SCORE_ADJ = -998
_PROPAGATION = {
    api_pb2.PROPAGATION_PRIVATE: "rprivate",
    api_pb2.PROPAGATION_HOST_TO_CONTAINER: "rslave",
    api_pb2.PROPAGATION_BIDIRECTIONAL: "rshared",
}
CAP_SYS_RESOURCE = 24


@dataclass(frozen=True, slots=True)
class OomPolicy:
    """How a requested oom_score_adj meets this host: the daemon's own value, whether to
    clamp to it, and whether lowering it is possible at all (CAP_SYS_RESOURCE)."""

    own: int
    restrict: bool
    can_lower: bool

    @classmethod
    def probe(cls, restrict: bool) -> OomPolicy:
        with open("/proc/self/oom_score_adj", encoding="ascii") as f:
            own = int(f.read().strip() or 0)
        can_lower = True
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    can_lower = bool(int(line.split()[1], 16) >> CAP_SYS_RESOURCE & 1)
        return cls(own, restrict, can_lower)

    def apply(self, wanted: int) -> int:
        if wanted >= self.own:
            return wanted
        if self.restrict:
            return self.own
        if not self.can_lower:
            raise FailedPrecondition(
                f"oom_score_adj {wanted} is below the daemon's own ({self.own}) and this host "
                "lacks CAP_SYS_RESOURCE, so runc would fail to set it; enable "
                "restrict_oom_score_adj in the CRI plugin's config"
            )
        return wanted


@dataclass(slots=True)
class HostPrep:
    """Facts read from the host for a container spec."""

    devices: list[tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=list)
    seccomp_choice: seccomp.Choice = seccomp.NONE
    seccomp: dict[str, Any] | None = None  # a Localhost profile, read
    apparmor: bool = False


def host_prep(cfg: api_pb2.ContainerConfig, *, seccomp_default: bool = False) -> HostPrep:
    """Stat devices, create missing bind-mount sources, pick the seccomp profile and read
    it when it is a Localhost one."""
    out = HostPrep()
    for m in cfg.mounts:
        if m.host_path and not os.path.exists(m.host_path):
            os.makedirs(m.host_path, exist_ok=True)  # as kubelet/containerd expect
    for d in cfg.devices:
        try:
            st = os.stat(d.host_path)
        except OSError as exc:
            raise InvalidArgument(f"device {d.host_path!r}: {exc.strerror}") from exc
        if stat.S_ISCHR(st.st_mode):
            kind = "c"
        elif stat.S_ISBLK(st.st_mode):
            kind = "b"
        else:
            raise InvalidArgument(f"{d.host_path!r} is not a device")
        major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
        dev = {
            "path": d.container_path or d.host_path,
            "type": kind,
            "major": major,
            "minor": minor,
            "fileMode": stat.S_IMODE(st.st_mode),
            "uid": 0,
            "gid": 0,
        }
        rule = {
            "allow": True,
            "type": kind,
            "major": major,
            "minor": minor,
            "access": d.permissions or "rwm",
        }
        out.devices.append((dev, rule))
    sc = cfg.linux.security_context
    out.seccomp_choice = seccomp.choose(sc, privileged=sc.privileged, default_on=seccomp_default)
    if out.seccomp_choice.kind == "localhost":
        out.seccomp = seccomp.load_localhost(out.seccomp_choice.path)
    out.apparmor = _apparmor_enabled()
    return out


def image_argv(command: list[str], args: list[str], image_config: Mapping[str, Any]) -> list[str]:
    """CRI's rule: ``command`` replaces Entrypoint, ``args`` replace Cmd."""
    entry = [str(x) for x in image_config.get("Entrypoint") or []]
    cmd = [str(x) for x in image_config.get("Cmd") or []]
    if command:
        return [*command, *args]
    return [*entry, *(args or cmd)]


def _bare(image_config: Mapping[str, Any], argv: list[str]) -> dict[str, Any]:
    cfg = copy.deepcopy(dict(image_config))
    cfg["Entrypoint"] = []
    cfg["Cmd"] = argv
    return cfg


def wanted_user(sc: api_pb2.LinuxContainerSecurityContext, image_user: str) -> str:
    """``user[:group]`` from the security context, else the image's User."""
    if sc.run_as_username:
        user = sc.run_as_username
    elif sc.HasField("run_as_user"):
        user = str(sc.run_as_user.value)
    else:
        user = image_user
    if sc.HasField("run_as_group") and user:
        user = f"{user.partition(':')[0]}:{sc.run_as_group.value}"
    return user


def _cap_name(name: str) -> str:
    cap = name.upper()
    cap = cap if cap.startswith("CAP_") else "CAP_" + cap
    if cap not in ALL_CAPS:
        raise InvalidArgument(f"unknown capability {name!r}")
    return cap


def _capabilities(caps: api_pb2.Capability) -> list[str]:
    add = [c.upper() for c in caps.add_capabilities]
    drop = [c.upper() for c in caps.drop_capabilities]
    current = list(DEFAULT_CAPS)
    if "ALL" in add:
        current = list(ALL_CAPS)
    if "ALL" in drop:
        current = []
    for c in add:
        if c != "ALL" and _cap_name(c) not in current:
            current.append(_cap_name(c))
    dropped = {_cap_name(c) for c in drop if c != "ALL"}
    return [c for c in current if c not in dropped]


def _set_mount(mounts: list[dict[str, Any]], m: dict[str, Any]) -> None:
    """Add ``m``, replacing any mount at the same destination (the CRI's wins)."""
    mounts[:] = [x for x in mounts if x["destination"] != m["destination"]]
    mounts.append(m)


def _bind(src: str, dst: str, *, ro: bool, propagation: str = "rprivate") -> dict[str, Any]:
    return {
        "destination": dst,
        "type": "bind",
        "source": src,
        "options": ["rbind", propagation, "ro" if ro else "rw"],
    }


def _shm_bind(files_dir: str, ipc: api_pb2.NamespaceMode.ValueType, *, ro: bool) -> dict[str, Any]:
    """The pod's /dev/shm: its own tmpfs, or the host's when it shares the host's IPC."""
    src = "/dev/shm" if ipc == api_pb2.NODE else f"{files_dir}/shm"
    m = _bind(src, "/dev/shm", ro=ro)
    m["options"] += ["nosuid", "nodev", "noexec"]
    return m


def _namespaces(spec: dict[str, Any], entries: dict[str, str | None]) -> None:
    """Set the spec's namespaces: a path joins, "" makes a new one, None leaves it out."""
    out = [ns for ns in spec["linux"]["namespaces"] if ns["type"] not in entries]
    for typ, path in entries.items():
        if path is None:
            continue
        out.append({"type": typ, "path": path} if path else {"type": typ})
    spec["linux"]["namespaces"] = out


def _resources(res: api_pb2.LinuxContainerResources, doc: dict[str, Any]) -> None:
    cpu: dict[str, Any] = {}
    if res.cpu_shares:
        cpu["shares"] = res.cpu_shares
    if res.cpu_quota:
        cpu["quota"] = res.cpu_quota
    if res.cpu_period:
        cpu["period"] = res.cpu_period
    if res.cpuset_cpus:
        cpu["cpus"] = res.cpuset_cpus
    if res.cpuset_mems:
        cpu["mems"] = res.cpuset_mems
    if cpu:
        doc["cpu"] = cpu
    mem: dict[str, Any] = {}
    if res.memory_limit_in_bytes:
        mem["limit"] = res.memory_limit_in_bytes
    if res.memory_swap_limit_in_bytes:
        mem["swap"] = res.memory_swap_limit_in_bytes
    if mem:
        doc["memory"] = mem
    if res.hugepage_limits:
        doc["hugepageLimits"] = [
            {"pageSize": h.page_size, "limit": h.limit} for h in res.hugepage_limits
        ]
    if res.unified:
        doc["unified"] = dict(res.unified)


def resources_doc(res: api_pb2.LinuxContainerResources) -> dict[str, Any]:
    """The spec's ``linux.resources`` for an update (UpdateContainerResources)."""
    doc: dict[str, Any] = {}
    _resources(res, doc)
    return doc


def _cgroups_path(parent: str, id_: str) -> str:
    return f"{parent.rstrip('/')}/{id_}" if parent else f"/{NAMESPACE}/{id_}"


def sandbox_spec(
    cfg: api_pb2.PodSandboxConfig,
    id_: str,
    image_config: Mapping[str, Any],
    *,
    command: list[str],
    netns: str,
    files_dir: str,
    oom: OomPolicy,
    seccomp_choice: seccomp.Choice = seccomp.NONE,
    seccomp_localhost: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The spec of a pod's sandbox process (``netns`` "": host network)."""
    argv = command or image_argv([], [], image_config)
    sc = cfg.linux.security_context
    ns_opts = sc.namespace_options
    host_net = ns_opts.network == api_pb2.NODE
    spec = generate_spec(
        NAMESPACE, id_, _bare(image_config, argv), hostname=cfg.hostname or None,
        privileged=sc.privileged, network="host" if host_net else netns,
    )  # fmt: skip
    _namespaces(
        spec,
        {
            "pid": None if ns_opts.pid == api_pb2.NODE else "",
            "ipc": None if ns_opts.ipc == api_pb2.NODE else "",
            "uts": None if host_net else "",
        },
    )
    if host_net:
        spec["hostname"] = cfg.hostname or os.uname().nodename
    for name in ("hosts", "hostname", "resolv.conf"):
        _set_mount(spec["mounts"], _bind(f"{files_dir}/{name}", f"/etc/{name}", ro=True))
    _set_mount(spec["mounts"], _shm_bind(files_dir, ns_opts.ipc, ro=True))
    spec["process"]["oomScoreAdj"] = oom.apply(SANDBOX_OOM_SCORE_ADJ)
    spec["process"]["noNewPrivileges"] = True
    profile = seccomp.profile_for(seccomp_choice, spec, seccomp_localhost)
    if profile is not None and not sc.privileged:
        spec["linux"]["seccomp"] = profile
    if cfg.linux.sysctls:
        spec["linux"]["sysctl"] = dict(cfg.linux.sysctls)
    spec["linux"]["cgroupsPath"] = _cgroups_path(cfg.linux.cgroup_parent, id_)
    spec["annotations"] = {
        **cfg.annotations,
        "io.kubernetes.cri.container-type": "sandbox",
        "io.kubernetes.cri.sandbox-id": id_,
        "io.kubernetes.cri.sandbox-name": cfg.metadata.name,
        "io.kubernetes.cri.sandbox-namespace": cfg.metadata.namespace,
        "io.kubernetes.cri.sandbox-uid": cfg.metadata.uid,
    }
    return spec


def container_spec(
    cfg: api_pb2.ContainerConfig,
    id_: str,
    *,
    sandbox_id: str,
    sandbox_cfg: api_pb2.PodSandboxConfig,
    sandbox_pid: int,
    target_pid: int,
    netns: str,
    files_dir: str,
    image_name: str,
    image_config: Mapping[str, Any],
    userdb: UserDB | None,
    prep: HostPrep,
    oom: OomPolicy,
) -> dict[str, Any]:
    """The spec of a container of the sandbox whose process is ``sandbox_pid``."""
    sc = cfg.linux.security_context
    sb_sc = sandbox_cfg.linux.security_context
    if sc.privileged and not sb_sc.privileged:
        raise InvalidArgument("no privileged container allowed in a non-privileged sandbox")
    argv = image_argv(list(cfg.command), list(cfg.args), image_config)
    if not argv:
        raise InvalidArgument("no command specified and the image has none")
    sb_ns = sb_sc.namespace_options
    host_net = sb_ns.network == api_pb2.NODE
    hostname = sandbox_cfg.hostname or (os.uname().nodename if host_net else "")
    env = [f"{kv.key}={kv.value.decode(errors='replace')}" for kv in cfg.envs]
    if hostname:
        env.insert(0, f"HOSTNAME={hostname}")
    user = wanted_user(sc, str(image_config.get("User") or ""))
    spec = generate_spec(
        NAMESPACE, id_, _bare(image_config, argv), env=env, cwd=cfg.working_dir or None,
        user=user or None, userdb=userdb, tty=cfg.tty, privileged=sc.privileged,
        network="host" if host_net else netns,
    )  # fmt: skip
    process = spec["process"]
    if sc.supplemental_groups:
        gids = process["user"].setdefault("additionalGids", [])
        gids.extend(g for g in sc.supplemental_groups if g not in gids)
    if not sc.privileged:
        caps = _capabilities(sc.capabilities)
        process["capabilities"] = {"bounding": caps, "permitted": caps, "effective": caps}
        if sc.masked_paths:
            spec["linux"]["maskedPaths"] = list(sc.masked_paths)
        if sc.readonly_paths:
            spec["linux"]["readonlyPaths"] = list(sc.readonly_paths)
    process["noNewPrivileges"] = sc.no_new_privs
    if sc.apparmor.profile_type == api_pb2.SecurityProfile.Localhost and prep.apparmor:
        process["apparmorProfile"] = sc.apparmor.localhost_ref.removeprefix("localhost/")
    profile = seccomp.profile_for(prep.seccomp_choice, spec, prep.seccomp)
    if profile is not None and not sc.privileged:
        spec["linux"]["seccomp"] = profile
    if sc.readonly_rootfs:
        spec["root"]["readonly"] = True
    pid_mode = sc.namespace_options.pid
    pid: str | None = f"/proc/{sandbox_pid}/ns/pid"
    if pid_mode == api_pb2.CONTAINER:
        pid = ""
    elif pid_mode == api_pb2.NODE:
        pid = None
    elif pid_mode == api_pb2.TARGET:
        pid = f"/proc/{target_pid}/ns/pid"
    _namespaces(
        spec,
        {
            "pid": pid,
            "ipc": None if sb_ns.ipc == api_pb2.NODE else f"/proc/{sandbox_pid}/ns/ipc",
            "uts": None if host_net else f"/proc/{sandbox_pid}/ns/uts",
        },
    )
    # A container joining the pod's UTS namespace must not set a hostname (runc refuses).
    spec.pop("hostname", None)
    mounts: list[dict[str, Any]] = spec["mounts"]
    for name in ("hosts", "hostname", "resolv.conf"):
        _set_mount(mounts, _bind(f"{files_dir}/{name}", f"/etc/{name}", ro=sc.readonly_rootfs))
    # Before the CRI mounts: one of them may put something else at /dev/shm.
    _set_mount(mounts, _shm_bind(files_dir, sb_ns.ipc, ro=False))
    rootfs_propagation = ""
    for m in cfg.mounts:
        prop = _PROPAGATION.get(m.propagation, "rprivate")
        if prop == "rshared" or (prop == "rslave" and rootfs_propagation != "rshared"):
            rootfs_propagation = prop
        _set_mount(mounts, _bind(m.host_path, m.container_path, ro=m.readonly, propagation=prop))
    if rootfs_propagation:
        spec["linux"]["rootfsPropagation"] = rootfs_propagation
    res_doc: dict[str, Any] = spec["linux"]["resources"]
    _resources(cfg.linux.resources, res_doc)
    for dev, rule in prep.devices:
        spec["linux"].setdefault("devices", []).append(dev)
        res_doc["devices"].append(rule)
    process["oomScoreAdj"] = oom.apply(cfg.linux.resources.oom_score_adj)
    spec["linux"]["cgroupsPath"] = _cgroups_path(sandbox_cfg.linux.cgroup_parent, id_)
    spec["annotations"] = {
        **cfg.annotations,
        "io.kubernetes.cri.container-type": "container",
        "io.kubernetes.cri.container-name": cfg.metadata.name,
        "io.kubernetes.cri.sandbox-id": sandbox_id,
        "io.kubernetes.cri.sandbox-name": sandbox_cfg.metadata.name,
        "io.kubernetes.cri.sandbox-namespace": sandbox_cfg.metadata.namespace,
        "io.kubernetes.cri.sandbox-uid": sandbox_cfg.metadata.uid,
        "io.kubernetes.cri.image-name": image_name,
    }
    return spec


def _apparmor_enabled() -> bool:
    try:
        with open("/sys/module/apparmor/parameters/enabled", encoding="ascii") as f:
            return f.read().strip() == "Y"
    except OSError:
        return False
