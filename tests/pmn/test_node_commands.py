"""`pmn node status|start` and `pmn infer` argument errors, run as a user would."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.pmn.conftest import assert_clean_error, run_pmn

pytestmark = [pytest.mark.network, pytest.mark.timeout(180)]


def test_operator_and_inference_errors(tmp_path: Path) -> None:
    assert_clean_error(run_pmn("node", "status", "--data-dir", str(tmp_path / "none")), "no node data")
    assert_clean_error(run_pmn("infer", "--model", "1", "hello"), "--bootstrap")
    assert_clean_error(run_pmn("node", "start", "--data-dir", str(tmp_path / "n"), "--stage", "7"), "stage")
