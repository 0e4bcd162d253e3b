"""Seccomp for CRI containers: which profile a security context asks for, and the default.

kubelet names a profile in ``SecurityProfile`` (``seccomp``) or, from older kubelets, in
the string ``seccomp_profile_path`` (``runtime/default``, ``docker/default``,
``unconfined``, ``localhost/<path>``). ``choose`` turns either into a ``Choice``: none for
a privileged container, ``Unconfined``, ``RuntimeDefault`` or a ``Localhost`` file. Nothing
asked means unconfined, as in containerd 1.6, unless the plugin's ``seccomp_default`` is
on (kubelet's SeccompDefault: RuntimeDefault then).

``default_profile`` builds the runtime's default profile the way containerd's
``contrib/seccomp`` does: every syscall not listed fails with EPERM (runc's errno for
``SCMP_ACT_ERRNO`` without ``errnoRet``); a long list of ordinary syscalls is allowed;
a few groups are allowed only when the process holds the capability that makes them
meaningful (mount, unshare, setns… with CAP_SYS_ADMIN; ptrace tools with CAP_SYS_PTRACE;
reboot with CAP_SYS_BOOT…); and without CAP_SYS_ADMIN, ``clone`` is allowed only without
namespace flags while ``clone3`` answers ENOSYS so that libc falls back to ``clone``.
``personality`` is allowed for the few harmless personas only, and ``socket`` for any
family but AF_VSOCK (as Docker's profile since 23.0; containerd 1.6 allowed it). The
capability set consulted is the process's effective set; in the specs we write the
bounding, permitted and effective sets are the same, and containerd reads the bounding one.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import platform
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pycontainerd.api.cri.runtime.v1 import api_pb2
from pycontainerd.errdefs import FailedPrecondition, InvalidArgument

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = [
    "Choice",
    "choose",
    "default_profile",
    "load_localhost",
    "profile_for",
    "supported",
]

log = logging.getLogger(__name__)

SecurityContext = api_pb2.LinuxContainerSecurityContext | api_pb2.LinuxSandboxSecurityContext

LEGACY_RUNTIME_DEFAULT = "runtime/default"
LEGACY_DOCKER_DEFAULT = "docker/default"
LEGACY_UNCONFINED = "unconfined"
LOCALHOST_PREFIX = "localhost/"

# The syscalls any container may make. Names the host's libseccomp does not know (newer
# or other-architecture calls) are skipped by runc, so one list serves every host.
ALWAYS_ALLOWED: tuple[str, ...] = (
    "accept", "accept4", "access", "adjtimex", "alarm", "bind", "brk", "capget", "capset",
    "chdir", "chmod", "chown", "chown32", "clock_adjtime", "clock_adjtime64",
    "clock_getres", "clock_getres_time64", "clock_gettime", "clock_gettime64",
    "clock_nanosleep", "clock_nanosleep_time64", "close", "close_range", "connect",
    "copy_file_range", "creat", "dup", "dup2", "dup3", "epoll_create", "epoll_create1",
    "epoll_ctl", "epoll_ctl_old", "epoll_pwait", "epoll_pwait2", "epoll_wait",
    "epoll_wait_old", "eventfd", "eventfd2", "execve", "execveat", "exit", "exit_group",
    "faccessat", "faccessat2", "fadvise64", "fadvise64_64", "fallocate", "fanotify_mark",
    "fchdir", "fchmod", "fchmodat", "fchown", "fchown32", "fchownat", "fcntl", "fcntl64",
    "fdatasync", "fgetxattr", "flistxattr", "flock", "fork", "fremovexattr", "fsetxattr",
    "fstat", "fstat64", "fstatat64", "fstatfs", "fstatfs64", "fsync", "ftruncate",
    "ftruncate64", "futex", "futex_time64", "futex_waitv", "futimesat", "getcpu", "getcwd",
    "getdents", "getdents64", "getegid", "getegid32", "geteuid", "geteuid32", "getgid",
    "getgid32", "getgroups", "getgroups32", "getitimer", "getpeername", "getpgid",
    "getpgrp", "getpid", "getppid", "getpriority", "getrandom", "getresgid", "getresgid32",
    "getresuid", "getresuid32", "getrlimit", "get_robust_list", "getrusage", "getsid",
    "getsockname", "getsockopt", "get_thread_area", "gettid", "gettimeofday", "getuid",
    "getuid32", "getxattr", "inotify_add_watch", "inotify_init", "inotify_init1",
    "inotify_rm_watch", "io_cancel", "ioctl", "io_destroy", "io_getevents",
    "io_pgetevents", "io_pgetevents_time64", "ioprio_get", "ioprio_set", "io_setup",
    "io_submit", "io_uring_enter", "io_uring_register", "io_uring_setup", "ipc", "kill",
    "landlock_add_rule", "landlock_create_ruleset", "landlock_restrict_self", "lchown",
    "lchown32", "lgetxattr", "link", "linkat", "listen", "listxattr", "llistxattr",
    "_llseek", "lremovexattr", "lseek", "lsetxattr", "lstat", "lstat64", "madvise",
    "membarrier", "memfd_create", "memfd_secret", "mincore", "mkdir", "mkdirat", "mknod",
    "mknodat", "mlock", "mlock2", "mlockall", "mmap", "mmap2", "mprotect", "mq_getsetattr",
    "mq_notify", "mq_open", "mq_timedreceive", "mq_timedreceive_time64", "mq_timedsend",
    "mq_timedsend_time64", "mq_unlink", "mremap", "msgctl", "msgget", "msgrcv", "msgsnd",
    "msync", "munlock", "munlockall", "munmap", "nanosleep", "newfstatat", "_newselect",
    "open", "openat", "openat2", "pause", "pidfd_open", "pidfd_send_signal", "pipe",
    "pipe2", "pkey_alloc", "pkey_free", "pkey_mprotect", "poll", "ppoll", "ppoll_time64",
    "prctl", "pread64", "preadv", "preadv2", "prlimit64", "process_mrelease", "pselect6",
    "pselect6_time64", "pwrite64", "pwritev", "pwritev2", "read", "readahead", "readlink",
    "readlinkat", "readv", "recv", "recvfrom", "recvmmsg", "recvmmsg_time64", "recvmsg",
    "remap_file_pages", "removexattr", "rename", "renameat", "renameat2",
    "restart_syscall", "rmdir", "rseq", "rt_sigaction", "rt_sigpending", "rt_sigprocmask",
    "rt_sigqueueinfo", "rt_sigreturn", "rt_sigsuspend", "rt_sigtimedwait",
    "rt_sigtimedwait_time64", "rt_tgsigqueueinfo", "sched_getaffinity", "sched_getattr",
    "sched_getparam", "sched_get_priority_max", "sched_get_priority_min",
    "sched_getscheduler", "sched_rr_get_interval", "sched_rr_get_interval_time64",
    "sched_setaffinity", "sched_setattr", "sched_setparam", "sched_setscheduler",
    "sched_yield", "seccomp", "select", "semctl", "semget", "semop", "semtimedop",
    "semtimedop_time64", "send", "sendfile", "sendfile64", "sendmmsg", "sendmsg", "sendto",
    "setfsgid", "setfsgid32", "setfsuid", "setfsuid32", "setgid", "setgid32", "setgroups",
    "setgroups32", "setitimer", "setpgid", "setpriority", "setregid", "setregid32",
    "setresgid", "setresgid32", "setresuid", "setresuid32", "setreuid", "setreuid32",
    "setrlimit", "set_robust_list", "setsid", "setsockopt", "set_thread_area",
    "set_tid_address", "setuid", "setuid32", "setxattr", "shmat", "shmctl", "shmdt",
    "shmget", "shutdown", "sigaltstack", "signalfd", "signalfd4", "sigprocmask",
    "sigreturn", "socketcall", "socketpair", "splice", "stat", "stat64", "statfs",
    "statfs64", "statx", "symlink", "symlinkat", "sync", "sync_file_range", "syncfs",
    "sysinfo", "tee", "tgkill", "time", "timer_create", "timer_delete", "timer_getoverrun",
    "timer_gettime", "timer_gettime64", "timer_settime", "timer_settime64",
    "timerfd_create", "timerfd_gettime", "timerfd_gettime64", "timerfd_settime",
    "timerfd_settime64", "times", "tkill", "truncate", "truncate64", "ugetrlimit", "umask",
    "uname", "unlink", "unlinkat", "utime", "utimensat", "utimensat_time64", "utimes",
    "vfork", "vmsplice", "wait4", "waitid", "waitpid", "write", "writev",
)  # fmt: skip

# Syscalls a capability makes meaningful: allowed only when the process holds it.
BY_CAPABILITY: dict[str, tuple[str, ...]] = {
    "CAP_DAC_READ_SEARCH": ("open_by_handle_at",),
    "CAP_SYS_ADMIN": (
        "bpf", "clone", "clone3", "fanotify_init", "fsconfig", "fsmount", "fsopen", "fspick",
        "lookup_dcookie", "mount", "mount_setattr", "move_mount", "name_to_handle_at",
        "open_tree", "perf_event_open", "quotactl", "quotactl_fd", "setdomainname",
        "sethostname", "setns", "syslog", "umount", "umount2", "unshare",
    ),
    "CAP_SYS_BOOT": ("reboot",),
    "CAP_SYS_CHROOT": ("chroot",),
    "CAP_SYS_MODULE": ("delete_module", "init_module", "finit_module"),
    "CAP_SYS_PACCT": ("acct",),
    "CAP_SYS_PTRACE": (
        "kcmp", "pidfd_getfd", "process_madvise", "process_vm_readv", "process_vm_writev",
        "ptrace",
    ),
    "CAP_SYS_RAWIO": ("iopl", "ioperm"),
    "CAP_SYS_TIME": ("settimeofday", "stime", "clock_settime", "clock_settime64"),
    "CAP_SYS_TTY_CONFIG": ("vhangup",),
    "CAP_SYS_NICE": ("get_mempolicy", "mbind", "set_mempolicy"),
    "CAP_SYSLOG": ("syslog",),
    "CAP_BPF": ("bpf",),
    "CAP_PERFMON": ("perf_event_open",),
}  # fmt: skip

# The seccomp architectures a process on this machine can run as (the native one and the
# compat ones), by ``uname -m``. Unknown machines list none: the native one is implied.
ARCHITECTURES: dict[str, tuple[str, ...]] = {
    "x86_64": ("SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"),
    "aarch64": ("SCMP_ARCH_ARM", "SCMP_ARCH_AARCH64"),
    "mips64": ("SCMP_ARCH_MIPS", "SCMP_ARCH_MIPS64", "SCMP_ARCH_MIPS64N32"),
    "s390x": ("SCMP_ARCH_S390", "SCMP_ARCH_S390X"),
    "riscv64": ("SCMP_ARCH_RISCV64",),
}

# Architecture-specific syscalls every container may make there.
ARCH_ALLOWED: dict[str, tuple[str, ...]] = {
    "x86_64": ("arch_prctl", "modify_ldt"),
    "i686": ("modify_ldt",),
    "aarch64": (
        "arm_fadvise64_64", "arm_sync_file_range", "sync_file_range2", "breakpoint",
        "cacheflush", "set_tls",
    ),
    "armv7l": (
        "arm_fadvise64_64", "arm_sync_file_range", "sync_file_range2", "breakpoint",
        "cacheflush", "set_tls",
    ),
    "ppc64le": ("sync_file_range2", "swapcontext"),
    "s390x": ("s390_pci_mmio_read", "s390_pci_mmio_write", "s390_runtime_instr"),
    "riscv64": ("riscv_flush_icache",),
}  # fmt: skip

# personality(2) values that change nothing security-relevant: PER_LINUX, PER_LINUX32,
# UNAME26, PER_LINUX32|UNAME26, and 0xffffffff (which only queries the persona).
PERSONALITIES = (0x0, 0x0008, 0x20000, 0x20008, 0xFFFFFFFF)

# clone(2) flags that make namespaces; without CAP_SYS_ADMIN a clone must carry none.
CLONE_NAMESPACE_FLAGS = (
    0x00020000  # CLONE_NEWNS
    | 0x04000000  # CLONE_NEWUTS
    | 0x08000000  # CLONE_NEWIPC
    | 0x10000000  # CLONE_NEWUSER
    | 0x20000000  # CLONE_NEWPID
    | 0x40000000  # CLONE_NEWNET
    | 0x02000000  # CLONE_NEWCGROUP
)
AF_VSOCK = 40
# ptrace became safe to allow for everyone once it could no longer bypass seccomp (4.8).
PTRACE_SAFE_KERNEL = (4, 8)


def _rule(names: Iterable[str], action: str = "SCMP_ACT_ALLOW", **extra: Any) -> dict[str, Any]:
    return {"names": list(names), "action": action, **extra}


def _arg(index: int, value: int, op: str, value_two: int = 0) -> dict[str, Any]:
    return {"index": index, "value": value, "valueTwo": value_two, "op": op}


def _kernel() -> tuple[int, int]:
    release = os.uname().release
    parts = release.split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (IndexError, ValueError):
        return (0, 0)


def default_profile(
    capabilities: Iterable[str],
    *,
    machine: str | None = None,
    kernel: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """The runtime's default profile (an OCI ``linux.seccomp`` object) for a process
    holding ``capabilities`` (``CAP_*`` names) on ``machine`` (``uname -m``)."""
    machine = machine or platform.machine()
    kernel = kernel or _kernel()
    caps = set(capabilities)
    rules = [
        _rule(ALWAYS_ALLOWED),
        *(_rule(["personality"], args=[_arg(0, p, "SCMP_CMP_EQ")]) for p in PERSONALITIES),
        _rule(["socket"], args=[_arg(0, AF_VSOCK, "SCMP_CMP_NE")]),
    ]
    if kernel >= PTRACE_SAFE_KERNEL:
        rules.append(_rule(["ptrace"]))
    if machine in ARCH_ALLOWED:
        rules.append(_rule(ARCH_ALLOWED[machine]))
    for cap, names in BY_CAPABILITY.items():
        if cap in caps:
            rules.append(_rule(names))
    if "CAP_SYS_ADMIN" not in caps:
        # On s390 the flags are clone's second argument.
        index = 1 if machine.startswith("s390") else 0
        rules.append(
            _rule(["clone"], args=[_arg(index, CLONE_NAMESPACE_FLAGS, "SCMP_CMP_MASKED_EQ")])
        )
        # ENOSYS, not EPERM: libc then falls back to clone, whose flags can be checked
        # (clone3 passes them in memory, out of seccomp's reach).
        rules.append(_rule(["clone3"], "SCMP_ACT_ERRNO", errnoRet=errno.ENOSYS))
    return {
        "defaultAction": "SCMP_ACT_ERRNO",
        "architectures": list(ARCHITECTURES.get(machine, ())),
        "syscalls": rules,
    }


# ---------------------------------------------------------------------- which profile


@dataclass(frozen=True, slots=True)
class Choice:
    """The seccomp profile a container gets: ``none`` (no filter at all, as for
    privileged or Unconfined), ``runtime_default`` or ``localhost`` (``path``)."""

    kind: Literal["none", "runtime_default", "localhost"]
    path: str = ""

    @property
    def required(self) -> bool:
        return self.kind != "none"


NONE = Choice("none")


def _from_legacy(path: str) -> Choice | None:
    if not path:
        return None
    if path in (LEGACY_RUNTIME_DEFAULT, LEGACY_DOCKER_DEFAULT):
        return Choice("runtime_default")
    if path == LEGACY_UNCONFINED:
        return NONE
    return Choice("localhost", path.removeprefix(LOCALHOST_PREFIX))


def choose(sc: SecurityContext, *, privileged: bool, default_on: bool) -> Choice:
    """The profile ``sc`` asks for; ``default_on``: RuntimeDefault when it asks none.

    Raises InvalidArgument for a ``localhost_ref`` on a non-Localhost profile (as
    containerd does) and FailedPrecondition when a filter is asked of a kernel without
    seccomp.
    """
    if privileged:
        return NONE
    choice: Choice | None
    if sc.HasField("seccomp"):
        sp = sc.seccomp
        if sp.profile_type != api_pb2.SecurityProfile.Localhost and sp.localhost_ref:
            raise InvalidArgument("seccomp: localhost_ref may only be set for a Localhost profile")
        if sp.profile_type == api_pb2.SecurityProfile.Unconfined:
            choice = NONE
        elif sp.profile_type == api_pb2.SecurityProfile.Localhost:
            if not sp.localhost_ref:
                raise InvalidArgument("seccomp: a Localhost profile needs a localhost_ref")
            choice = Choice("localhost", sp.localhost_ref.removeprefix(LOCALHOST_PREFIX))
        else:
            choice = Choice("runtime_default")
    else:
        choice = _from_legacy(sc.seccomp_profile_path)
        if choice is None:
            choice = Choice("runtime_default") if default_on else NONE
            if choice.required and not supported():
                log.warning("seccomp_default is on but the kernel has no seccomp; unconfined")
                return NONE
    if choice.required and not supported():
        raise FailedPrecondition("seccomp profile asked for, but the kernel has no seccomp")
    return choice


@functools.cache
def supported() -> bool:
    """Whether the kernel filters syscalls (it shows a ``Seccomp:`` status line)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return any(line.startswith("Seccomp:") for line in f)
    except OSError:
        return False


def load_localhost(path: str) -> dict[str, Any]:
    """Read a Localhost profile (blocking; run it in a thread)."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"seccomp profile {path!r}: {exc}") from exc
    if not isinstance(doc, dict):
        raise InvalidArgument(f"seccomp profile {path!r} is not a JSON object")
    return doc


def profile_for(
    choice: Choice, spec: dict[str, Any], localhost: dict[str, Any] | None
) -> dict[str, Any] | None:
    """The ``linux.seccomp`` for ``spec`` (its process's capabilities already set)."""
    if choice.kind == "localhost":
        return localhost
    if choice.kind == "runtime_default":
        caps = spec.get("process", {}).get("capabilities", {}).get("effective", [])
        return default_profile(caps)
    return None
