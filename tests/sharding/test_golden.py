import json

import pytest

from sharding.data import load_corpus
from sharding.regression import GOLDEN_ATOL, GOLDEN_CORPUS, GOLDEN_PATH, GOLDEN_STEPS, run_golden


@pytest.mark.timeout(120)
def test_golden_losses_reproduce():
    stored = json.loads(GOLDEN_PATH.read_text())
    assert stored["corpus_manifest_hash"] == load_corpus(GOLDEN_CORPUS).manifest_hash.hex()
    fresh = run_golden()
    assert fresh["runs"].keys() == stored["runs"].keys()
    for name, run in stored["runs"].items():
        got = fresh["runs"][name]["losses"]
        assert fresh["runs"][name]["config"] == run["config"]
        assert len(got) == len(run["losses"]) == GOLDEN_STEPS
        worst = max(abs(a - b) for a, b in zip(got, run["losses"], strict=True))
        assert worst <= GOLDEN_ATOL, f"{name}: per-step loss moved by {worst:.2e}"
        assert run["losses"][-1] < run["losses"][0] - 1.0  # the golden runs actually learn
