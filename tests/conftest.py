"""Suite-wide: a ResourceWarning is a failure, in this process and in every process a test starts.

In this process pyproject's `filterwarnings` turns them into errors. Child processes (node daemons,
`pmn` commands) inherit `PYTHONWARNINGS=always::ResourceWarning`, so a leak there is printed to their
stderr: `run_pmn` checks the stderr it captures, and the fixtures below check every node's
`stderr.log` under the test's tmp_path and, at the end of the session, under the whole base temp dir
(module-scoped swarms write there).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

CHILD_WARNINGS = "always::ResourceWarning"  # what child processes print instead of dropping


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
