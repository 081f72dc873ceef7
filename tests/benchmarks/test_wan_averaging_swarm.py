"""`benchmarks/wan_averaging.py` swarm mode's schedule option: async with replicated stages needs the step exchange,
as the node does (refused before any node starts)."""

from __future__ import annotations

import pytest

from tests.benchmarks.scripts import run_script

pytestmark = pytest.mark.timeout(300)


def test_async_needs_the_step_exchange() -> None:
    proc = run_script("wan_averaging.py", "--schedule", "async", "--steps", "6")
    assert proc.returncode == 2 and "--schedule async with replicated stages needs --exchange step" in proc.stderr
