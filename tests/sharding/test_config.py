import dataclasses

import pytest

from sharding.config import PRESETS, ModelConfig


def test_presets_are_valid_and_bench_is_wide():
    for cfg in PRESETS.values():
        assert cfg.validate() is cfg
    assert PRESETS["bench"].d_model >= 512
    assert PRESETS["tiny"].d_model == 64


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"d_model": 60, "n_heads": 8}, "d_model"),
        ({"subspace_rank": 65}, "subspace_rank"),
        ({"subspace_rank": 0}, "subspace_rank"),
        ({"n_layers": 0}, "n_layers"),
        ({"free_tail_layers": 1}, "free_tail_layers"),
        ({"subspace_rank": 8, "free_tail_layers": 4}, "free_tail_layers"),
        ({"vocab_size": 2**32 + 1}, "vocab_size"),
        ({"seed": -1}, "seed"),
        ({"init_std": 0.0}, "init_std"),
        ({"d_model": 12, "n_heads": 4}, "head size"),
    ],
)
def test_invalid_config_names_the_field(changes, field):
    cfg = dataclasses.replace(PRESETS["tiny"], **changes)
    with pytest.raises(ValueError, match=field):
        cfg.validate()


def test_dict_round_trip_and_hash():
    cfg = PRESETS["tiny-subspace"]
    again = ModelConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert again.spec_hash() == cfg.spec_hash()
    assert len(cfg.spec_hash()) == 32
    assert b" " not in cfg.canonical_json()
    assert dataclasses.replace(cfg, seed=1).spec_hash() != cfg.spec_hash()
    with pytest.raises(ValueError, match="unknown field"):
        ModelConfig.from_dict({**cfg.to_dict(), "colour": 1})
