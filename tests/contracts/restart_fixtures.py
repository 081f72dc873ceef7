"""Fixtures of a real anvil that a test may stop and restart on the same port with its state kept, and the
deployed protocol on it; registered for every test by the root conftest (`pytest_plugins`). A module may
define its own `chain` fixture, which wins there."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from contracts.chain import disconnect
from tests.contracts.anvil_support import RestartableAnvil, restartable_anvil
from tests.contracts.conftest import Env, make_env


@pytest.fixture
def anvil(tmp_path: Path) -> Iterator[RestartableAnvil]:
    """anvil keeping its state under tmp_path/anvil across `stop()` / `start()`."""
    with restartable_anvil(tmp_path / "anvil") as a:
        yield a


@pytest.fixture
def chain(anvil: RestartableAnvil) -> Iterator[Env]:
    """The protocol deployed on `anvil`, with funded test accounts."""
    env = make_env(anvil.url)
    try:
        yield env
    finally:
        disconnect(env.pc.w3)
