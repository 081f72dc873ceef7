import json
from typing import Any

import pytest

from sharding.data import load_corpus
from sharding.regression import (
    CROSS_CPU_ATOL,
    GOLDEN_ATOL,
    GOLDEN_CORPUS,
    GOLDEN_PATH,
    GOLDEN_STEPS,
    cpu_record_key,
    expected_runs,
    run_golden,
)


def _worst(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


@pytest.mark.timeout(120)
def test_golden_losses_reproduce():
    stored = json.loads(GOLDEN_PATH.read_text())
    assert stored["corpus_manifest_hash"] == load_corpus(GOLDEN_CORPUS).manifest_hash.hex()
    expected = expected_runs(stored, cpu_record_key())
    fresh = run_golden()
    assert fresh["runs"].keys() == expected.keys() == stored["runs"].keys()
    for name, run in expected.items():
        got = fresh["runs"][name]["losses"]
        assert fresh["runs"][name]["config"] == run["config"] == stored["runs"][name]["config"]
        assert len(got) == len(run["losses"]) == GOLDEN_STEPS
        worst = _worst(got, run["losses"])
        assert worst <= GOLDEN_ATOL, f"{name}: per-step loss moved by {worst:.2e} ({cpu_record_key()} kernels)"
        assert run["losses"][-1] < run["losses"][0] - 1.0  # the golden runs actually learn


def test_kernel_family_records_stay_near_the_base():
    stored = json.loads(GOLDEN_PATH.read_text())
    for capability, record in stored.get("cpu_records", {}).items():
        assert record["runs"].keys() == stored["runs"].keys()
        for name, run in record["runs"].items():
            worst = _worst(run["losses"], stored["runs"][name]["losses"])
            assert worst <= CROSS_CPU_ATOL, f"{capability} record of {name} is {worst:.2e} from the base"


def test_a_machine_uses_its_family_record_when_one_is_stored():
    base = {"m": {"losses": [1.0]}}
    family = {"m": {"losses": [2.0]}}
    stored: dict[str, Any] = {"runs": base, "cpu_records": {"AVX512": {"runs": family}}}
    assert expected_runs(stored, "AVX512") is family
    assert expected_runs(stored, "AVX2") is base
    assert expected_runs(stored, "AVX512-AMD") is family  # no record of its own: its kernel family's
    amd = {"m": {"losses": [3.0]}}
    stored["cpu_records"]["AVX2-AMD"] = {"runs": amd}
    assert expected_runs(stored, "AVX2-AMD") is amd
