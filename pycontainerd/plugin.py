"""The plugin system: registrations, their dependency order, and the context each init gets.

Every service of the daemon is a plugin. A module defines one module-level
``Registration``; built-ins are listed in ``pycontainerd.plugins.builtins`` and third-party
plugins register through the ``pycontainerd.plugins`` entry-point group. ``Registry``
merges both and orders them by ``requires`` (a cycle is an error). ``load_plugins`` inits
them in that order; a plugin that raises is kept with its error (Introspection shows it)
and everything requiring its type is skipped, while the daemon goes on serving. A plugin
that raises ``SkipPlugin`` is recorded as skipped, like containerd's ``ErrSkipPlugin``.
"""

from __future__ import annotations

import builtins
import enum
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Generic, TypeVar

from pycontainerd.errdefs import FailedPrecondition, InvalidArgument, NotFound

__all__ = [
    "InitContext",
    "Plugin",
    "PluginSet",
    "PluginType",
    "Registration",
    "Registry",
    "SkipPlugin",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
U = TypeVar("U")


class PluginType(enum.StrEnum):
    """containerd's plugin type names, shown verbatim by ``ctr plugins ls``."""

    INTERNAL = "io.containerd.internal.v1"
    EVENT = "io.containerd.event.v1"
    CONTENT = "io.containerd.content.v1"
    METADATA = "io.containerd.metadata.v1"
    SNAPSHOTTER = "io.containerd.snapshotter.v1"
    DIFFER = "io.containerd.differ.v1"
    GC = "io.containerd.gc.v1"
    LEASE = "io.containerd.lease.v1"
    RUNTIME_V2 = "io.containerd.runtime.v2"
    SERVICE = "io.containerd.service.v1"
    GRPC = "io.containerd.grpc.v1"
    TTRPC = "io.containerd.ttrpc.v1"
    MONITOR = "io.containerd.monitor.v1"
    TEST = "io.pycontainerd.test.v1"


class SkipPlugin(Exception):
    """Raised by an init to say the plugin does not apply here (e.g. no overlayfs)."""

    def __str__(self) -> str:
        msg = super().__str__()
        return f"skip plugin: {msg}" if msg else "skip plugin"


@dataclass(frozen=True, slots=True)
class Registration(Generic[T]):
    """What a plugin module declares: its type, id, what it needs, and how to build it."""

    type: PluginType | str
    id: str
    init: Callable[[InitContext], Awaitable[T]]
    requires: tuple[PluginType | str, ...] = ()
    config: builtins.type[Any] | None = None
    capabilities: tuple[str, ...] = ()

    @property
    def uri(self) -> str:
        return f"{self.type}.{self.id}"


@dataclass(slots=True)
class Plugin:
    """A registration after its init ran: the instance, or the error that stopped it."""

    registration: Registration[Any]
    instance: Any = None
    error: BaseException | None = None
    exports: dict[str, str] = field(default_factory=dict)
    platforms: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None


class PluginSet:
    """Initialized plugins, in init order, looked up by type and id."""

    def __init__(self) -> None:
        self._ordered: list[Plugin] = []
        self._by_uri: dict[str, Plugin] = {}

    def add(self, plugin: Plugin) -> None:
        uri = plugin.registration.uri
        if uri in self._by_uri:
            raise InvalidArgument(f"plugin {uri!r} registered twice")
        self._ordered.append(plugin)
        self._by_uri[uri] = plugin

    def __iter__(self) -> Any:
        return iter(list(self._ordered))

    def __len__(self) -> int:
        return len(self._ordered)

    def get(self, type_: PluginType | str, id_: str) -> Plugin | None:
        return self._by_uri.get(f"{type_}.{id_}")

    def of_type(self, type_: PluginType | str) -> list[Plugin]:
        return [p for p in self._ordered if p.registration.type == type_]


@dataclass(slots=True)
class InitContext:
    """What a plugin's init receives: its directories, config and access to earlier plugins."""

    registration: Registration[Any]
    root: Path
    state: Path
    config: Any
    plugins: PluginSet
    address: str = ""
    ttrpc_address: str = ""
    exports: dict[str, str] = field(default_factory=dict)
    platforms: list[str] = field(default_factory=list)
    properties: dict[str, Any] = field(default_factory=dict)

    def get(self, type_: PluginType | str, kind: type[U]) -> U:
        """The first initialized plugin of ``type_``; FailedPrecondition if none is usable."""
        for p in self.plugins.of_type(type_):
            if p.ok:
                return _checked(p, kind)
        raise FailedPrecondition(f"no plugin of type {type_} loaded")

    def get_by_id(self, type_: PluginType | str, id_: str, kind: type[U]) -> U:
        p = self.plugins.get(type_, id_)
        if p is None:
            raise NotFound(f"plugin {type_}.{id_}")
        if p.error is not None:
            raise FailedPrecondition(f"plugin {type_}.{id_} failed to load: {p.error}")
        return _checked(p, kind)

    def get_all(self, type_: PluginType | str, kind: type[U]) -> dict[str, U]:
        """Every usable plugin of ``type_`` by id (e.g. all snapshotters)."""
        return {p.registration.id: _checked(p, kind) for p in self.plugins.of_type(type_) if p.ok}


def _checked(p: Plugin, kind: type[U]) -> U:
    inst = p.instance
    if kind is not object and not isinstance(inst, kind):
        raise FailedPrecondition(
            f"plugin {p.registration.uri} is {type(inst).__name__}, not {kind.__name__}"
        )
    return inst  # type: ignore[no-any-return]


class Registry:
    """An immutable, dependency-ordered collection of registrations."""

    def __init__(self, registrations: Iterable[Registration[Any]]) -> None:
        regs = list(registrations)
        seen: set[str] = set()
        for r in regs:
            if r.uri in seen:
                raise InvalidArgument(f"plugin {r.uri!r} registered twice")
            seen.add(r.uri)
        self._ordered = tuple(_graph(regs))

    @classmethod
    def discover(
        cls, builtins: Iterable[Registration[Any]], group: str = "pycontainerd.plugins"
    ) -> Registry:
        """Built-ins plus every registration published in the entry-point ``group``."""
        regs = list(builtins)
        for ep in entry_points(group=group):
            obj = ep.load()
            items = obj if isinstance(obj, list | tuple) else [obj]
            for item in items:
                if not isinstance(item, Registration):
                    raise InvalidArgument(f"entry point {ep.name!r} is not a Registration")
                regs.append(item)
        return cls(regs)

    def __iter__(self) -> Any:
        return iter(self._ordered)

    def __len__(self) -> int:
        return len(self._ordered)


def _graph(regs: list[Registration[Any]]) -> list[Registration[Any]]:
    """Order registrations so each comes after every plugin of the types it requires.

    Registration order is kept where dependencies allow (a stable topological sort);
    a requirement on the plugin's own type refers to other plugins of that type.
    """
    by_type: dict[str, list[Registration[Any]]] = {}
    for r in regs:
        by_type.setdefault(str(r.type), []).append(r)
    ordered: list[Registration[Any]] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done

    def deps(r: Registration[Any]) -> list[Registration[Any]]:
        out: list[Registration[Any]] = []
        for t in r.requires:
            if str(t) == "*":
                out.extend(x for x in regs if x is not r)
            else:
                out.extend(x for x in by_type.get(str(t), []) if x is not r)
        return out

    for start in regs:
        if state.get(start.uri) == 2:
            continue
        stack: list[tuple[Registration[Any], Iterator[Registration[Any]]]] = [
            (start, iter(deps(start)))
        ]
        state[start.uri] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                stack.pop()
                state[node.uri] = 2
                ordered.append(node)
                continue
            st = state.get(nxt.uri)
            if st == 1:
                cycle = [n.uri for n, _ in stack] + [nxt.uri]
                raise InvalidArgument("plugin dependency cycle: " + " -> ".join(cycle))
            if st is None:
                state[nxt.uri] = 1
                stack.append((nxt, iter(deps(nxt))))
    return ordered


def dependency_failed(reg: Registration[Any], plugins: PluginSet) -> str | None:
    """Why ``reg`` cannot init: a required type with no usable plugin, or None."""
    for t in reg.requires:
        if str(t) == "*":
            continue
        candidates = [p for p in plugins.of_type(t) if p.registration is not reg]
        if not candidates:
            return f"no plugin of required type {t}"
        if not any(p.ok for p in candidates):
            errs = "; ".join(f"{p.registration.uri}: {p.error}" for p in candidates)
            return f"required type {t} failed: {errs}"
    return None


def config_for(reg: Registration[Any], raw: Mapping[str, Any] | None) -> Any:
    """Decode the ``[plugins."<uri>"]`` table into the registration's config dataclass."""
    from pycontainerd.config import decode_dataclass

    if reg.config is None:
        if raw:
            raise InvalidArgument(f'plugin "{reg.uri}" takes no configuration')
        return None
    return decode_dataclass(reg.config, raw or {}, f'plugins."{reg.uri}"')
