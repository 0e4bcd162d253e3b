"""deploy/config.toml, the configuration the systemd unit installs, is exactly what
``pycontainerd config default`` prints: an option added to a plugin shows up there."""

from __future__ import annotations

from pycontainerd.__main__ import default_config_text
from tests.support.daemon import REPO


def test_deploy_config_is_the_default() -> None:
    shipped = (REPO / "deploy" / "config.toml").read_text()
    assert shipped == default_config_text(), (
        "deploy/config.toml is stale: regenerate it with "
        "`.venv/bin/pycontainerd config default > deploy/config.toml`"
    )
