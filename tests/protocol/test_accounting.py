"""The accounting function: FLOPs per token of the shard times tokens, pure and versioned."""

from __future__ import annotations

import dataclasses

import pytest

from protocol.accounting import ACCOUNTING_VERSION, accounting_function_hash, compute_units
from protocol.errors import AccountingError
from sharding.config import ModelConfig
from sharding.flops import model_flops_per_token, stage_flops_per_token
from sharding.partition import partition

CONFIG = ModelConfig(vocab_size=256, seq_len=32, d_model=32, n_layers=3, n_heads=4)


def test_units_are_stage_flops_times_tokens_and_sum_to_model():
    stages = partition(CONFIG, 3)
    for spec in stages:
        assert compute_units(CONFIG, spec, 100) == 100 * stage_flops_per_token(CONFIG, spec)
        assert compute_units(CONFIG, spec, 0) == 0
    assert sum(compute_units(CONFIG, s, 7) for s in stages) == 7 * model_flops_per_token(CONFIG)


def test_hash_is_stable_and_32_bytes():
    assert ACCOUNTING_VERSION == 1
    h = accounting_function_hash()
    assert len(h) == 32 and h == accounting_function_hash()


@pytest.mark.parametrize("tokens", [-1, 1.5, True, "10"])
def test_bad_tokens_named(tokens):
    with pytest.raises(AccountingError) as err:
        compute_units(CONFIG, partition(CONFIG, 3)[0], tokens)
    assert err.value.field == "tokens"


def test_inconsistent_spec_named():
    spec = dataclasses.replace(partition(CONFIG, 3)[0], block_end=99)
    with pytest.raises(AccountingError) as err:
        compute_units(CONFIG, spec, 10)
    assert err.value.field == "spec"
