"""Plugins the tests load into the daemon through ``plugin_modules``.

``broken`` always fails its init, so tests can see a plugin reported with its error while
the daemon keeps serving.
"""

from __future__ import annotations

from pycontainerd.plugin import InitContext, PluginType, Registration


async def _broken(ic: InitContext) -> object:
    raise RuntimeError("this test plugin always fails to initialise")


broken = Registration(type=PluginType.TEST, id="broken", init=_broken)
