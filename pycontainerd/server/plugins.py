"""Loading the plugin graph: init each registration in dependency order, keep failures.

A plugin that raises stays in the set with its error (introspection reports it) and the
plugins that need its type are skipped with an error naming it; the daemon still serves
whatever loaded. ``required_plugins`` turns a failure into a start-up error.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pycontainerd.errdefs import FailedPrecondition, InvalidArgument
from pycontainerd.plugin import (
    InitContext,
    Plugin,
    PluginSet,
    Registration,
    Registry,
    SkipPlugin,
    config_for,
    dependency_failed,
)

if TYPE_CHECKING:
    from pycontainerd.config import Config

log = logging.getLogger(__name__)


def registrations_in(module_name: str) -> list[Registration[Any]]:
    """Every module-level Registration of ``module_name`` (for ``plugin_modules``)."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InvalidArgument(f"cannot import plugin module {module_name!r}: {exc}") from exc
    return [v for v in vars(module).values() if isinstance(v, Registration)]


def build_registry(cfg: Config) -> Registry:
    from pycontainerd.plugins.builtins import BUILTINS

    regs: list[Registration[Any]] = list(BUILTINS)
    for name in cfg.plugin_modules:
        regs.extend(registrations_in(name))
    return Registry.discover(regs)


async def load_plugins(
    registry: Registry, cfg: Config, *, address: str, ttrpc_address: str
) -> PluginSet:
    plugins = PluginSet()
    root, state = Path(cfg.root), Path(cfg.state)
    known = {r.uri for r in registry}
    for uri in (*cfg.disabled_plugins, *cfg.required_plugins):
        if uri not in known:
            log.warning("config names unknown plugin %s", uri)
    for key in cfg.plugins:
        if key not in known:
            raise InvalidArgument(
                f'config has a [plugins."{key}"] table but no such plugin is registered'
            )
    # Every plugin table is decoded before anything starts: a typo is a start-up error
    # naming the key, not a plugin that silently fails.
    configs = {r.uri: config_for(r, cfg.plugins.get(r.uri)) for r in registry}
    for reg in registry:
        if reg.uri in cfg.disabled_plugins:
            log.info("plugin %s disabled by configuration", reg.uri)
            continue
        plugin = Plugin(reg)
        plugins.add(plugin)
        reason = dependency_failed(reg, plugins)
        if reason is not None:
            plugin.error = FailedPrecondition(f"dependency failed: {reason}")
            log.warning("skipping plugin %s: %s", reg.uri, reason)
            continue
        try:
            ic = InitContext(
                registration=reg,
                root=root / reg.uri,
                state=state / reg.uri,
                config=configs[reg.uri],
                plugins=plugins,
                address=address,
                ttrpc_address=ttrpc_address,
            )
            started = time.perf_counter()
            plugin.instance = await reg.init(ic)
            plugin.exports, plugin.platforms = ic.exports, ic.platforms
            log.debug("loaded plugin %s in %.1f ms", reg.uri, (time.perf_counter() - started) * 1e3)
        except SkipPlugin as exc:
            plugin.error = exc
            log.info("skip loading plugin %s: %s", reg.uri, exc)
        except Exception as exc:
            plugin.error = exc
            log.warning(
                "failed to load plugin %s: %s",
                reg.uri,
                exc,
                exc_info=log.isEnabledFor(logging.DEBUG),
            )
    for uri in cfg.required_plugins:
        p = next((p for p in plugins if p.registration.uri == uri), None)
        if p is None or not p.ok:
            why = "not registered or disabled" if p is None else str(p.error)
            raise FailedPrecondition(f"required plugin {uri} failed to load: {why}")
    return plugins


async def close_plugins(plugins: PluginSet) -> None:
    """Close every loaded plugin that has ``close()``, in reverse init order."""
    for p in reversed(list(plugins)):
        close = getattr(p.instance, "close", None)
        if p.ok and close is not None:
            try:
                result = close()
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("closing plugin %s failed", p.registration.uri)
