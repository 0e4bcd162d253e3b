"""CRI security: the RuntimeDefault seccomp profile (built, chosen, and enforced by runc
inside real containers) and the pod's shared ``/dev/shm``."""

from __future__ import annotations

import asyncio
import errno
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pycontainerd.api.cri.runtime.v1 import api_pb2
from pycontainerd.client.spec import DEFAULT_CAPS
from pycontainerd.config import decode_dataclass
from pycontainerd.cri import seccomp
from pycontainerd.cri.options import CRIConfig
from pycontainerd.cri.spec import host_prep
from pycontainerd.cri.store import mount_shm
from pycontainerd.errdefs import InvalidArgument
from tests.cri.helpers import (
    container_config,
    pod_config,
    remove_pod,
    run_pod,
    start_container,
)

if TYPE_CHECKING:
    from tests.cri.conftest import CRI
    from tests.support.daemon import Daemon

IDLE = ["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1 & wait $!; done"]
SP = api_pb2.SecurityProfile


# ---------------------------------------------------------------------- the profile


def _allowed(profile: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """The allow rules naming ``name``."""
    rules = profile["syscalls"]
    assert isinstance(rules, list)
    return [r for r in rules if name in r["names"] and r["action"] == "SCMP_ACT_ALLOW"]


def test_default_profile_without_admin() -> None:
    p = seccomp.default_profile(DEFAULT_CAPS, machine="x86_64", kernel=(6, 1))
    json.dumps(p)  # plain JSON, as it goes into config.json
    assert p["defaultAction"] == "SCMP_ACT_ERRNO"
    assert p["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    for name in ("read", "execve", "arch_prctl", "ptrace", "chroot"):
        assert _allowed(p, name) and not _allowed(p, name)[0].get("args"), name
    for name in ("unshare", "mount", "setns", "reboot", "kexec_load", "add_key", "acct"):
        assert not _allowed(p, name), name
    [clone] = _allowed(p, "clone")
    assert clone["args"] == [
        {"index": 0, "value": seccomp.CLONE_NAMESPACE_FLAGS, "valueTwo": 0,
         "op": "SCMP_CMP_MASKED_EQ"}
    ]  # fmt: skip
    [clone3] = [r for r in p["syscalls"] if "clone3" in r["names"]]
    assert (clone3["action"], clone3["errnoRet"]) == ("SCMP_ACT_ERRNO", errno.ENOSYS)
    [sock] = _allowed(p, "socket")
    assert sock["args"] == [{"index": 0, "value": 40, "valueTwo": 0, "op": "SCMP_CMP_NE"}]
    personas = sorted(r["args"][0]["value"] for r in _allowed(p, "personality"))
    assert personas == [0, 8, 0x20000, 0x20008, 0xFFFFFFFF]


def test_default_profile_follows_capabilities_machine_and_kernel() -> None:
    p = seccomp.default_profile(
        [*DEFAULT_CAPS, "CAP_SYS_ADMIN", "CAP_SYS_BOOT"], machine="aarch64", kernel=(4, 4)
    )
    assert p["architectures"] == ["SCMP_ARCH_ARM", "SCMP_ARCH_AARCH64"]
    for name in ("unshare", "mount", "setns", "clone", "clone3", "reboot", "set_tls"):
        assert _allowed(p, name) and not _allowed(p, name)[0].get("args"), name
    assert not [r for r in p["syscalls"] if r["action"] != "SCMP_ACT_ALLOW"]
    assert not _allowed(p, "ptrace")  # before 4.8 ptrace could escape seccomp
    assert not _allowed(p, "arch_prctl")
    traced = seccomp.default_profile(["CAP_SYS_PTRACE"], machine="x86_64", kernel=(4, 4))
    assert _allowed(traced, "ptrace") and _allowed(traced, "process_vm_readv")


def _sc(**kw: object) -> api_pb2.LinuxContainerSecurityContext:
    return api_pb2.LinuxContainerSecurityContext(**kw)  # type: ignore[arg-type]


def test_choose() -> None:
    none, default = seccomp.NONE, seccomp.Choice("runtime_default")
    # Nothing asked: unconfined, unless seccomp_default is on.
    assert seccomp.choose(_sc(), privileged=False, default_on=False) == none
    assert seccomp.choose(_sc(), privileged=False, default_on=True) == default
    # RuntimeDefault is the enum's zero: presence of the message is what asks for it.
    explicit = _sc(seccomp=SP(profile_type=SP.RuntimeDefault))
    assert seccomp.choose(explicit, privileged=False, default_on=False) == default
    assert seccomp.choose(explicit, privileged=True, default_on=True) == none
    unconfined = _sc(seccomp=SP(profile_type=SP.Unconfined))
    assert seccomp.choose(unconfined, privileged=False, default_on=True) == none
    local = _sc(seccomp=SP(profile_type=SP.Localhost, localhost_ref="localhost//p.json"))
    assert seccomp.choose(local, privileged=False, default_on=False) == seccomp.Choice(
        "localhost", "/p.json"
    )
    for legacy, want in [
        ("runtime/default", default), ("docker/default", default), ("unconfined", none),
        ("localhost//x.json", seccomp.Choice("localhost", "/x.json")),
    ]:  # fmt: skip
        got = seccomp.choose(_sc(seccomp_profile_path=legacy), privileged=False, default_on=True)
        assert got == want, legacy
    bad = _sc(seccomp=SP(profile_type=SP.RuntimeDefault, localhost_ref="x"))
    with pytest.raises(InvalidArgument):
        seccomp.choose(bad, privileged=False, default_on=False)


def test_seccomp_default_option() -> None:
    cfg = decode_dataclass(CRIConfig, {"seccomp_default": True}, "cri")
    assert cfg.seccomp_default and not CRIConfig().seccomp_default
    plain = container_config("c", ["true"])
    assert host_prep(plain).seccomp_choice == seccomp.NONE
    assert host_prep(plain, seccomp_default=True).seccomp_choice.kind == "runtime_default"


# ---------------------------------------------------------------------- in containers


def _with_seccomp(
    cfg: api_pb2.ContainerConfig, profile: int | None, add_caps: tuple[str, ...] = ()
) -> api_pb2.ContainerConfig:
    sc = cfg.linux.security_context
    if profile is not None:
        sc.seccomp.profile_type = profile  # type: ignore[assignment]
    sc.capabilities.add_capabilities.extend(add_caps)
    return cfg


async def _exec(cri: CRI, cid: str, cmd: list[str]) -> tuple[int, str]:
    resp = await cri.runtime.ExecSync(
        api_pb2.ExecSyncRequest(container_id=cid, cmd=cmd, timeout=20)
    )
    return resp.exit_code, (resp.stdout + resp.stderr).decode()


async def _seccomp_mode(cri: CRI, cid: str) -> str:
    code, out = await _exec(cri, cid, ["sh", "-c", "grep '^Seccomp:' /proc/self/status"])
    assert code == 0, out
    return out.split()[1]


def _proc_seccomp(pid: int) -> str:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        return next(line.split()[1] for line in f if line.startswith("Seccomp:"))


@pytest.mark.root
async def test_runtime_default_is_enforced(cri: CRI, tmp_path: Path) -> None:
    pod_cfg = pod_config("seccomp", tmp_path)
    pod_cfg.linux.security_context.seccomp.profile_type = SP.RuntimeDefault
    pod = await run_pod(cri, pod_cfg)
    try:
        confined = await start_container(
            cri, pod, pod_cfg, _with_seccomp(container_config("confined", IDLE), SP.RuntimeDefault)
        )
        free = await start_container(
            cri, pod, pod_cfg, _with_seccomp(container_config("free", IDLE), SP.Unconfined)
        )
        unset = await start_container(
            cri, pod, pod_cfg, _with_seccomp(container_config("unset", IDLE), None)
        )
        admin = await start_container(
            cri, pod, pod_cfg,
            _with_seccomp(container_config("admin", IDLE), SP.RuntimeDefault, ("SYS_ADMIN",)),
        )  # fmt: skip

        # Mode 2 is "filter": runc installed our profile (so it accepted its JSON).
        assert await _seccomp_mode(cri, confined) == "2"
        assert await _seccomp_mode(cri, admin) == "2"
        assert await _seccomp_mode(cri, free) == "0"
        assert await _seccomp_mode(cri, unset) == "0"  # containerd 1.6's default
        # The pod's own process runs under the profile the pod asked for.
        info = await cri.runtime.PodSandboxStatus(
            api_pb2.PodSandboxStatusRequest(pod_sandbox_id=pod, verbose=True)
        )
        assert _proc_seccomp(json.loads(info.info["info"])["pid"]) == "2"

        # Ordinary work goes on under the filter: fork, exec, files, sockets.
        code, out = await _exec(cri, confined, ["sh", "-c", "echo hi > /tmp/f && cat /tmp/f"])
        assert code == 0 and out.startswith("hi"), out
        # A new user namespace needs unshare(2), which only CAP_SYS_ADMIN unlocks in the
        # default profile: refused with EPERM there, allowed unconfined or with the cap.
        code, out = await _exec(cri, confined, ["busybox", "unshare", "-U", "true"])
        assert code != 0 and "Operation not permitted" in out, out
        code, out = await _exec(cri, free, ["busybox", "unshare", "-U", "true"])
        assert code == 0, out
        code, out = await _exec(cri, admin, ["busybox", "unshare", "-U", "true"])
        assert code == 0, out
    finally:
        await remove_pod(cri, pod)


# ---------------------------------------------------------------------- pod /dev/shm


def _shm_mounts(pod_id: str) -> list[str]:
    """The daemon-side mount points of ``pod_id``'s /dev/shm tmpfs."""
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return [
            line.split()[4] for line in f if line.split()[4].endswith(f"/sandboxes/{pod_id}/shm")
        ]


@pytest.mark.root
async def test_pod_shares_its_own_dev_shm(cri: CRI, tmp_path: Path) -> None:
    a_cfg = pod_config("shm-a", tmp_path)
    b_cfg = pod_config("shm-b", tmp_path)
    pod_a = await run_pod(cri, a_cfg)
    pod_b = await run_pod(cri, b_cfg)
    removed = False
    try:
        [mountpoint] = _shm_mounts(pod_a)
        a1 = await start_container(cri, pod_a, a_cfg, container_config("a1", IDLE))
        a2 = await start_container(cri, pod_a, a_cfg, container_config("a2", IDLE))
        b1 = await start_container(cri, pod_b, b_cfg, container_config("b1", IDLE))
        code, out = await _exec(cri, a1, ["sh", "-c", "echo shared > /dev/shm/marker"])
        assert code == 0, out
        code, out = await _exec(cri, a2, ["cat", "/dev/shm/marker"])
        assert (code, out) == (0, "shared\n")
        code, out = await _exec(cri, b1, ["ls", "-A", "/dev/shm"])
        assert (code, out) == (0, "")
        # The pod's tmpfs: 64 MiB, world-writable with the sticky bit, no exec.
        code, out = await _exec(
            cri, a2, ["sh", "-c", "stat -c %a /dev/shm; df -k /dev/shm | tail -1"]
        )
        mode, df = out.split("\n", 1)
        assert (code, mode) == (0, "1777"), out
        assert df.split()[1] == str(64 * 1024), df
        assert await asyncio.to_thread(Path(mountpoint, "marker").read_text) == "shared\n"
        await remove_pod(cri, pod_a)
        removed = True
        assert _shm_mounts(pod_a) == []
        assert _shm_mounts(pod_b) != []
    finally:
        if not removed:
            await remove_pod(cri, pod_a)
        await remove_pod(cri, pod_b)
    assert _shm_mounts(pod_b) == []


@pytest.mark.root
async def test_host_ipc_pod_uses_the_hosts_dev_shm(cri: CRI, tmp_path: Path) -> None:
    cfg = pod_config("shm-host", tmp_path)
    cfg.linux.security_context.namespace_options.ipc = api_pb2.NODE
    pod = await run_pod(cri, cfg)
    marker = Path("/dev/shm") / f"pcd-test-{pod[:12]}"
    try:
        assert _shm_mounts(pod) == []
        cid = await start_container(cri, pod, cfg, container_config("c", IDLE))
        marker.write_text("from the host\n")
        code, out = await _exec(cri, cid, ["cat", f"/dev/shm/{marker.name}"])
        assert (code, out) == (0, "from the host\n")
    finally:
        marker.unlink(missing_ok=True)
        await remove_pod(cri, pod)


@pytest.mark.root
async def test_restart_reclaims_leaked_shm_and_keeps_live_ones(
    cri: CRI, cri_daemon: Daemon, tmp_path: Path
) -> None:
    cfg = pod_config("shm-restart", tmp_path)
    pod = await run_pod(cri, cfg)
    try:
        # A pod directory no record owns, its tmpfs still mounted: what a crash between
        # RunPodSandbox's mount and its record would leave.
        leaked = cri_daemon.state / "io.containerd.grpc.v1.cri" / "sandboxes" / ("0" * 64)
        leaked.mkdir(parents=True)
        mount_shm(leaked)
        assert _shm_mounts("0" * 64) != []
        cri_daemon.kill9()
        cri_daemon.start()
        await cri.runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest())  # recovered
        assert _shm_mounts("0" * 64) == []
        assert not leaked.exists()
        assert _shm_mounts(pod) != []
    finally:
        await remove_pod(cri, pod)
    assert _shm_mounts(pod) == []
