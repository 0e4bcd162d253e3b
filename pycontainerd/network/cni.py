"""Running CNI plugins as the CNI specification asks a container runtime to.

A plugin is an executable found by its ``type`` in the plugin directories. The runtime
passes the operation in environment variables (``CNI_COMMAND`` ADD/DEL/CHECK/VERSION,
``CNI_CONTAINERID``, ``CNI_NETNS``, ``CNI_IFNAME``, ``CNI_ARGS``, ``CNI_PATH``) and the
network configuration as JSON on stdin; the plugin answers with a result (ADD) or
nothing (DEL/CHECK) on stdout, or an error object ``{code, msg, details}`` and a non-zero
exit. A configuration *list* chains plugins: ADD runs them in order, each receiving the
previous one's result as ``prevResult``; DEL and CHECK run them in reverse/forward order
with the result of the ADD. Capabilities a plugin declares (``portMappings``…) are filled
from the runtime's arguments into ``runtimeConfig``. Every plugin runs through asyncio's
subprocess API, never a shell.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pycontainerd.errdefs import FailedPrecondition, InvalidArgument, NotFound, PycdError

__all__ = [
    "DEFAULT_BIN_DIRS",
    "CNIRunner",
    "NetworkConfigList",
    "PluginError",
    "RuntimeConf",
    "load_conf_dir",
    "parse_config",
]

log = logging.getLogger(__name__)

DEFAULT_BIN_DIRS: tuple[str, ...] = ("/usr/lib/cni", "/opt/cni/bin")
_SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0")
# Names become iptables comments and host-local directory names: keep them tame.
_NETWORK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_IFNAME = re.compile(r"^[^\s/:]{1,15}$")


class PluginError(PycdError):
    """A CNI plugin failed; ``code`` and ``details`` are the plugin's own error object."""

    def __init__(
        self, plugin: str, command: str, msg: str, code: int = 0, details: str = ""
    ) -> None:
        self.plugin = plugin
        self.command = command
        self.cni_code = code
        self.details = details
        text = f"plugin type={plugin!r} failed ({command.lower()}): {msg}"
        if details:
            text += f" ({details})"
        super().__init__(text)


@dataclass(frozen=True, slots=True)
class NetworkConfigList:
    """A parsed network configuration list (a single ``.conf`` becomes a list of one)."""

    name: str
    cni_version: str
    plugins: tuple[dict[str, Any], ...]
    disable_check: bool = False
    source: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "cniVersion": self.cni_version,
            "name": self.name,
            "disableCheck": self.disable_check,
            "plugins": [copy.deepcopy(p) for p in self.plugins],
        }


@dataclass(frozen=True, slots=True)
class RuntimeConf:
    """What the runtime knows about one attachment: who, where, and capability args."""

    container_id: str
    netns: str
    ifname: str
    args: tuple[tuple[str, str], ...] = ()
    capability_args: dict[str, Any] = field(default_factory=dict)


def parse_config(data: bytes | str, source: str = "") -> NetworkConfigList:
    """Parse a ``.conflist`` (or single-plugin ``.conf``) document; InvalidArgument if bad."""
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise InvalidArgument(f"CNI config {source or '<memory>'}: {exc}") from exc
    if not isinstance(doc, dict):
        raise InvalidArgument(f"CNI config {source or '<memory>'}: not a JSON object")
    version = str(doc.get("cniVersion", ""))
    name = doc.get("name")
    if not isinstance(name, str) or not _NETWORK_NAME.match(name):
        raise InvalidArgument(f"CNI config {source or '<memory>'}: bad network name {name!r}")
    if version not in _SUPPORTED_VERSIONS:
        raise InvalidArgument(
            f"CNI config {source or '<memory>'}: cniVersion {version!r} not one of "
            f"{', '.join(_SUPPORTED_VERSIONS)}"
        )
    if "plugins" in doc:
        plugins = doc["plugins"]
        if not isinstance(plugins, list) or not plugins:
            raise InvalidArgument(f"CNI config {source}: 'plugins' must be a non-empty list")
    else:
        # A single network config: the document itself is the one plugin.
        plugins = [{k: v for k, v in doc.items() if k not in ("cniVersion", "name")}]
    for p in plugins:
        if not isinstance(p, dict) or not isinstance(p.get("type"), str) or not p["type"]:
            raise InvalidArgument(f"CNI config {source}: every plugin needs a 'type'")
        if "/" in p["type"]:
            raise InvalidArgument(f"CNI config {source}: plugin type {p['type']!r} is a path")
    return NetworkConfigList(
        name=name,
        cni_version=version,
        plugins=tuple(plugins),
        disable_check=bool(doc.get("disableCheck", False)),
        source=source,
    )


def load_conf_dir(directory: str | os.PathLike[str]) -> dict[str, NetworkConfigList]:
    """Every valid config in ``directory`` by network name (blocking).

    Files are read in name order (``.conflist``, ``.conf``, ``.json``) and the first file
    that defines a name wins, as libcni's loader does; invalid files are logged and skipped.
    """
    d = Path(directory)
    out: dict[str, NetworkConfigList] = {}
    try:
        names = sorted(os.listdir(d))
    except FileNotFoundError:
        return out
    for fname in names:
        if not fname.endswith((".conflist", ".conf", ".json")):
            continue
        path = d / fname
        try:
            conf = parse_config(path.read_bytes(), source=str(path))
        except (OSError, InvalidArgument) as exc:
            log.warning("skipping CNI config %s: %s", path, exc)
            continue
        out.setdefault(conf.name, conf)
    return out


def _version_ge(a: str, b: str) -> bool:
    def key(v: str) -> tuple[int, ...]:
        return tuple(int(x) for x in v.split("."))

    return key(a) >= key(b)


class CNIRunner:
    """Finds plugins in ``bin_dirs`` and runs single plugins or whole lists."""

    def __init__(self, bin_dirs: tuple[str, ...] | list[str] = DEFAULT_BIN_DIRS) -> None:
        self.bin_dirs = tuple(str(d) for d in bin_dirs)

    def find(self, plugin_type: str) -> Path:
        """Path of plugin ``plugin_type``; NotFound when no directory has it (blocking stat)."""
        for d in self.bin_dirs:
            p = Path(d) / plugin_type
            if p.is_file() and os.access(p, os.X_OK):
                return p
        raise NotFound(f"CNI plugin {plugin_type!r} in {':'.join(self.bin_dirs)}")

    def _env(self, command: str, rt: RuntimeConf | None) -> dict[str, str]:
        env = dict(os.environ)
        # Plugins run iptables, ip and friends through PATH: make sure the sbin dirs are in.
        path = env.get("PATH", "")
        for extra in ("/usr/sbin", "/sbin", "/usr/bin", "/bin"):
            if extra not in path.split(":"):
                path = f"{path}:{extra}" if path else extra
        env["PATH"] = path
        env["CNI_COMMAND"] = command
        env["CNI_PATH"] = ":".join(self.bin_dirs)
        for k in ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS"):
            env.pop(k, None)
        if rt is not None:
            env["CNI_CONTAINERID"] = rt.container_id
            env["CNI_NETNS"] = rt.netns
            env["CNI_IFNAME"] = rt.ifname
            if rt.args:
                env["CNI_ARGS"] = ";".join(f"{k}={v}" for k, v in rt.args)
        return env

    async def exec_plugin(
        self,
        plugin_type: str,
        command: str,
        stdin: dict[str, Any],
        rt: RuntimeConf | None,
    ) -> dict[str, Any] | None:
        """Run one plugin; the decoded stdout for ADD/VERSION, None for DEL/CHECK.

        Raises PluginError with the plugin's error object when it exits non-zero.
        """
        path = await asyncio.to_thread(self.find, plugin_type)
        proc = await asyncio.create_subprocess_exec(
            str(path),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self._env(command, rt),
            close_fds=True,
        )
        out, err = await proc.communicate(json.dumps(stdin).encode())
        if err:
            log.debug("CNI %s %s stderr: %s", plugin_type, command, err.decode(errors="replace"))
        if proc.returncode != 0:
            msg, code, details = _decode_error(out, err, proc.returncode)
            raise PluginError(plugin_type, command, msg, code, details)
        if command in ("DEL", "CHECK") or not out.strip():
            return None
        try:
            doc = json.loads(out)
        except ValueError as exc:
            raise PluginError(plugin_type, command, f"unparseable output: {exc}") from exc
        if not isinstance(doc, dict):
            raise PluginError(plugin_type, command, "output is not a JSON object")
        return doc

    async def version(self, plugin_type: str) -> list[str]:
        """The spec versions the plugin supports (the VERSION command)."""
        doc = await self.exec_plugin(plugin_type, "VERSION", {"cniVersion": "1.0.0"}, None)
        versions = (doc or {}).get("supportedVersions", [])
        return [str(v) for v in versions]

    @staticmethod
    def _plugin_stdin(
        conf: NetworkConfigList,
        plugin: dict[str, Any],
        rt: RuntimeConf,
        prev_result: dict[str, Any] | None,
    ) -> dict[str, Any]:
        stdin = copy.deepcopy(plugin)
        stdin["name"] = conf.name
        stdin["cniVersion"] = conf.cni_version
        if prev_result is not None:
            stdin["prevResult"] = prev_result
        # Only the capabilities this plugin declares, and only when the runtime has them.
        caps = plugin.get("capabilities") or {}
        runtime_config = {
            key: value
            for key, value in rt.capability_args.items()
            if isinstance(caps, dict) and caps.get(key)
        }
        if runtime_config:
            stdin["runtimeConfig"] = runtime_config
        return stdin

    @staticmethod
    def _check_rt(conf: NetworkConfigList, rt: RuntimeConf) -> None:
        if not rt.container_id or any(c.isspace() or c == "/" for c in rt.container_id):
            raise InvalidArgument(f"container id {rt.container_id!r} unusable for CNI")
        if not _IFNAME.match(rt.ifname) or rt.ifname in (".", ".."):
            raise InvalidArgument(f"interface name {rt.ifname!r}")
        del conf

    async def add_list(self, conf: NetworkConfigList, rt: RuntimeConf) -> dict[str, Any]:
        """ADD every plugin in order, chaining results; the last plugin's result."""
        self._check_rt(conf, rt)
        result: dict[str, Any] | None = None
        for plugin in conf.plugins:
            stdin = self._plugin_stdin(conf, plugin, rt, result)
            out = await self.exec_plugin(plugin["type"], "ADD", stdin, rt)
            if out is None:
                raise PluginError(plugin["type"], "ADD", "returned no result")
            result = out
        assert result is not None  # a list has at least one plugin
        return result

    async def del_list(
        self,
        conf: NetworkConfigList,
        rt: RuntimeConf,
        prev_result: dict[str, Any] | None,
    ) -> None:
        """DEL every plugin in reverse order with the ADD result (0.4.0+ only).

        Unlike ADD, a failing plugin does not stop the others: each still gets its chance
        to release what it holds; the first error is raised at the end.
        """
        self._check_rt(conf, rt)
        prev = prev_result if _version_ge(conf.cni_version, "0.4.0") else None
        first: PycdError | None = None
        for plugin in reversed(conf.plugins):
            stdin = self._plugin_stdin(conf, plugin, rt, prev)
            try:
                await self.exec_plugin(plugin["type"], "DEL", stdin, rt)
            except PycdError as exc:
                log.warning("%s", exc)
                first = first or exc
        if first is not None:
            raise first

    async def check_list(
        self, conf: NetworkConfigList, rt: RuntimeConf, prev_result: dict[str, Any]
    ) -> None:
        """CHECK every plugin in order; FailedPrecondition when the config forbids it."""
        if not _version_ge(conf.cni_version, "0.4.0"):
            raise FailedPrecondition(f"CNI version {conf.cni_version} has no CHECK")
        if conf.disable_check:
            return
        self._check_rt(conf, rt)
        for plugin in conf.plugins:
            stdin = self._plugin_stdin(conf, plugin, rt, prev_result)
            await self.exec_plugin(plugin["type"], "CHECK", stdin, rt)


def _decode_error(out: bytes, err: bytes, rc: int | None) -> tuple[str, int, str]:
    """The plugin's error object from stdout, else its stderr, else the exit status."""
    try:
        doc = json.loads(out)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and ("msg" in doc or "code" in doc):
        code = doc.get("code", 0)
        return (
            str(doc.get("msg", "")),
            code if isinstance(code, int) else 0,
            str(doc.get("details", "")),
        )
    text = (err or out).decode(errors="replace").strip()
    return (text or f"exit status {rc}", 0, "")
