"""The CRI plugin's settings (``[plugins."io.containerd.grpc.v1.cri"]`` in the config).

One frozen dataclass, decoded from TOML by the plugin loader (unknown keys are an error).
Defaults suit a kubelet node; the tests point ``sandbox_image`` at a busybox image with
``sandbox_command`` set, since they have no pause image.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CRIConfig"]


@dataclass(frozen=True, slots=True)
class CRIConfig:
    # The image whose process holds a pod's namespaces, and its command (empty: the
    # image's own Entrypoint/Cmd, as with registry.k8s.io/pause).
    sandbox_image: str = "registry.k8s.io/pause:3.9"
    sandbox_command: tuple[str, ...] = ()
    # Shim used for pods and their containers: our own (zygote-forked, several
    # containers per process; needs nothing but runc) or containerd's runc.v2 binary.
    runtime: str = "io.containerd.pyrunc.v1"
    snapshotter: str = "overlayfs"
    # Registry hosts (``host[:port]``) spoken to over plain HTTP.
    insecure_registries: tuple[str, ...] = ()
    # CNI: where plugins live, where network configs are (empty: our state dir with a
    # default bridge written there), and the default bridge's name and subnet.
    cni_bin_dirs: tuple[str, ...] = ("/usr/lib/cni", "/opt/cni/bin")
    cni_conf_dir: str = ""
    cni_bridge: str = "cni0"
    cni_subnet: str = "10.88.0.0/16"
    cni_network: str = "bridge"
    netns_dir: str = ""  # empty: <plugin state>/netns (reclaim only touches its own)
    # Clamp a requested oom_score_adj to the daemon's own value: without CAP_SYS_RESOURCE
    # runc cannot lower it (containerd's restrict_oom_score_adj).
    restrict_oom_score_adj: bool = True
    # Give containers (and pods) whose security context names no seccomp profile the
    # RuntimeDefault one, like kubelet's SeccompDefault; off: unconfined, as containerd 1.6.
    seccomp_default: bool = False
    # Log lines longer than this are split into partial ("P") records.
    max_container_log_line_size: int = 16384
    # Address of the streaming server (Exec/Attach/PortForward); not served yet.
    stream_server_address: str = "127.0.0.1"
    stream_server_port: str = "0"
