"""Daemon configuration: TOML in containerd's shape, decoded into frozen dataclasses.

Top level::

    version = 2
    root = "/var/lib/pycontainerd"
    state = "/run/pycontainerd"
    disabled_plugins = []
    required_plugins = []
    plugin_modules = []      # extra Python modules holding Registrations
    [grpc]   address, tcp_address, uid, gid, max_recv_message_size, max_send_message_size
    [ttrpc]  address (default: <grpc address>.ttrpc)
    [debug]  level, format
    [plugins."<type>.<id>"]  one table per plugin, decoded by its Registration.config

Unknown keys are an error naming the key; so is a value of the wrong type.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from pycontainerd.errdefs import InvalidArgument

T = TypeVar("T")

DEFAULT_ROOT = "/var/lib/pycontainerd"
DEFAULT_STATE = "/run/pycontainerd"
DEFAULT_ADDRESS = "/run/pycontainerd/pycontainerd.sock"
MAX_MESSAGE_SIZE = 16 << 20


@dataclasses.dataclass(frozen=True, slots=True)
class GRPCConfig:
    address: str = DEFAULT_ADDRESS
    tcp_address: str = ""
    tcp_tls_cert: str = ""
    tcp_tls_key: str = ""
    tcp_tls_ca: str = ""
    uid: int = 0
    gid: int = 0
    max_recv_message_size: int = MAX_MESSAGE_SIZE
    max_send_message_size: int = MAX_MESSAGE_SIZE


@dataclasses.dataclass(frozen=True, slots=True)
class TTRPCConfig:
    address: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class DebugConfig:
    level: str = "info"
    format: str = "text"


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    version: int = 2
    root: str = DEFAULT_ROOT
    state: str = DEFAULT_STATE
    disabled_plugins: tuple[str, ...] = ()
    required_plugins: tuple[str, ...] = ()
    # Python modules whose module-level Registrations are loaded beside the built-ins.
    plugin_modules: tuple[str, ...] = ()
    grpc: GRPCConfig = GRPCConfig()
    ttrpc: TTRPCConfig = TTRPCConfig()
    debug: DebugConfig = DebugConfig()
    plugins: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

    @property
    def ttrpc_address(self) -> str:
        return self.ttrpc.address or self.grpc.address + ".ttrpc"


class ConfigError(InvalidArgument):
    """A configuration file that cannot be read or does not fit the schema."""


def load(path: str | Path | None) -> Config:
    """Read a TOML config file (None: all defaults)."""
    if path is None:
        return Config()
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(p)!r}: {exc.strerror}") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid TOML: {exc}") from exc
    return parse(data, source=str(p))


def parse(data: Mapping[str, Any], source: str = "config") -> Config:
    try:
        cfg = decode_dataclass(Config, data, "")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc.message}") from None
    if cfg.version != 2:
        raise ConfigError(f"{source}: unsupported config version {cfg.version} (want 2)")
    return cfg


def decode_dataclass(cls: type[T], raw: Mapping[str, Any], where: str) -> T:
    """Build dataclass ``cls`` from a TOML table; unknown keys and wrong types are errors."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where or 'top level'} must be a table")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        name = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigError(f"unknown config key {name!r}")
        kwargs[key] = _coerce(hints[key], value, name)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, name: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return decode_dataclass(hint, value, name)
    if origin in (typing.Union, types.UnionType):
        for a in args:
            if a is type(None) and value is None:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, name)
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"config key {name!r} must be a list")
        return tuple(_coerce(args[0], v, f"{name}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping, typing.Mapping) or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {name!r} must be a table")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(vt, v, f"{name}.{k}") for k, v in value.items()}
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {name!r} must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {name!r} must be an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"config key {name!r} must be a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {name!r} must be a string")
        return value
    raise ConfigError(f"config key {name!r} has an unsupported type")


def to_toml(value: Mapping[str, Any]) -> str:
    """Render a config mapping as TOML (enough for ``config default``)."""
    lines: list[str] = []
    tables: list[tuple[list[str], Mapping[str, Any]]] = []
    _emit(lines, tables, [], value)
    while tables:
        path, table = tables.pop(0)
        lines.append("")
        lines.append("[" + ".".join(_key(p) for p in path) + "]")
        _emit(lines, tables, path, table)
    return "\n".join(lines).lstrip("\n") + "\n"


def _emit(
    lines: list[str],
    tables: list[tuple[list[str], Mapping[str, Any]]],
    path: list[str],
    table: Mapping[str, Any],
) -> None:
    for k, v in table.items():
        if isinstance(v, Mapping):
            tables.append(([*path, k], v))
        else:
            lines.append(f"{_key(k)} = {_val(v)}")


def _key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else '"' + k + '"'


def _val(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_val(x) for x in v) + "]"
    raise TypeError(f"cannot render {type(v).__name__} as TOML")


def as_mapping(obj: Any) -> dict[str, Any]:
    """A dataclass instance as a plain mapping (tuples as lists), for rendering."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            v = as_mapping(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out
