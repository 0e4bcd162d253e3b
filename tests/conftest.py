"""Shared fixtures: the real daemon as a subprocess, and markers that skip with a reason."""

from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING

import pytest

from pycontainerd.namespaces import current_lease, current_namespace
from tests.client.registry_support import registry
from tests.support.daemon import Daemon

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["registry"]  # a fixture for every test folder that needs a registry

TEST_CONFIG = 'version = 2\nplugin_modules = ["tests.support.pcd_test_plugins"]\n'


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("root") and os.geteuid() != 0:
            item.add_marker(pytest.mark.skip(reason="needs root"))
        if item.get_closest_marker("ctr") and shutil.which("ctr") is None:
            item.add_marker(
                pytest.mark.skip(reason="needs containerd's ctr client (apt install containerd)")
            )


@pytest.fixture(autouse=True)
def _isolated_request_context() -> Iterator[None]:
    """Tests that set the request namespace/lease directly must not leak it to others."""
    ns_token = current_namespace.set(None)
    lease_token = current_lease.set(None)
    yield
    current_namespace.reset(ns_token)
    current_lease.reset(lease_token)


@pytest.fixture(scope="session")
def daemon() -> Iterator[Daemon]:
    """One daemon shared by the tests that only add state of their own."""
    d = Daemon(config=TEST_CONFIG).start()
    yield d
    d.cleanup()


@pytest.fixture
def fresh_daemon() -> Iterator[Daemon]:
    """A daemon of the test's own, for restarts and kills."""
    d = Daemon(config=TEST_CONFIG).start()
    yield d
    d.cleanup()
