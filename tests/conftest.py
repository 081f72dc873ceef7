"""Suite-wide: a ResourceWarning is a failure, in this process and in every process a test starts;
and every test starts from the same global random state, whatever ran before it.

In this process pyproject's `filterwarnings` turns them into errors. Child processes (node daemons,
`pmn` commands) inherit `PYTHONWARNINGS=always::ResourceWarning`, so a leak there is printed to their
stderr: `run_pmn` checks the stderr it captures, and the fixtures below check every node's
`stderr.log` under the test's tmp_path and, at the end of the session, under the whole base temp dir
(module-scoped swarms write there).
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# fixtures of an anvil a test may stop and restart (`anvil`, `chain`: tests/contracts/restart_fixtures.py)
pytest_plugins = ["tests.contracts.restart_fixtures"]

CHILD_WARNINGS = "always::ResourceWarning"  # what child processes print instead of dropping
GLOBAL_SEED = 0  # the global RNGs (random, numpy, torch) are seeded with this before every test


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_saved_env] = os.environ.get("PYTHONWARNINGS")
    os.environ["PYTHONWARNINGS"] = ",".join(w for w in (os.environ.get("PYTHONWARNINGS"), CHILD_WARNINGS) if w)


def pytest_unconfigure(config: pytest.Config) -> None:
    saved = config.stash.get(_saved_env, None)
    if saved is None:
        os.environ.pop("PYTHONWARNINGS", None)
    else:
        os.environ["PYTHONWARNINGS"] = saved


_saved_env = pytest.StashKey[str | None]()


def leaked_in_logs(root: Path) -> list[str]:
    """'path: line' for every line naming a ResourceWarning in a node's stderr.log under `root`."""
    found = []
    for log in sorted(root.rglob("stderr.log")):
        for line in log.read_text(errors="replace").splitlines():
            if "ResourceWarning" in line:
                found.append(f"{log}: {line.strip()}")
    return found


@pytest.fixture(autouse=True)
def _child_logs_without_resource_warnings(request: pytest.FixtureRequest) -> Iterator[None]:
    root = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    if root is not None and (leaks := leaked_in_logs(root)):
        pytest.fail("a child process leaked resources:\n" + "\n".join(leaks[:20]), pytrace=False)


@pytest.fixture(autouse=True, scope="session")
def _session_child_logs_without_resource_warnings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    yield
    if leaks := leaked_in_logs(tmp_path_factory.getbasetemp()):
        pytest.fail("a child process leaked resources:\n" + "\n".join(leaks[:20]), pytrace=False)


@pytest.fixture(autouse=True)
def _same_global_state_for_every_test() -> Iterator[None]:
    """Seed the global RNGs before the test and restore torch's thread count after it.

    Tests draw from their own seeded generators; this keeps the rest (a model's initial weights drawn
    by torch's global generator, say) independent of which tests ran before, and keeps a test that
    pins torch to one thread (as node daemons run in-process do) from slowing down the next ones.
    """
    random.seed(GLOBAL_SEED)
    np = sys.modules.get("numpy")
    if np is not None:
        np.random.seed(GLOBAL_SEED)
    torch = sys.modules.get("torch")
    threads = None
    if torch is not None:
        torch.manual_seed(GLOBAL_SEED)
        threads = torch.get_num_threads()
    yield
    torch = sys.modules.get("torch")
    if torch is not None and threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
