import dataclasses

import pytest

from sharding.config import PRESETS
from sharding.flops import model_flops_per_token, stage_flops_per_token
from sharding.partition import check_spec, partition
from sharding.stagespec import StageSpec


@pytest.mark.parametrize("name", ["tiny", "tiny-subspace", "bench", "bench-subspace"])
@pytest.mark.parametrize("p", [1, 2, 3, 4])
def test_partition_covers_model(name, p):
    cfg = PRESETS[name]
    specs = partition(cfg, p)
    assert len(specs) == p
    assert specs[0].block_start == 0 and specs[-1].block_end == cfg.n_layers
    assert all(a.block_end == b.block_start for a, b in zip(specs, specs[1:], strict=False))
    assert [s.has_embedding for s in specs] == [True] + [False] * (p - 1)
    assert [s.has_lm_head for s in specs] == [False] * (p - 1) + [True]
    assert specs[0].is_first and specs[-1].is_last
    assert sum(stage_flops_per_token(cfg, s) for s in specs) == model_flops_per_token(cfg)
    # free tail layers all sit on the tail stage
    assert specs[-1].block_start <= cfg.n_layers - cfg.free_tail_layers
    assert partition(cfg, p) == specs  # pure


def test_balanced_by_flops():
    cfg = dataclasses.replace(PRESETS["tiny"], n_layers=8)
    specs = partition(cfg, 4)
    sizes = [s.block_end - s.block_start for s in specs]
    assert sizes == [2, 2, 2, 2]


def test_throughputs_shift_work_to_faster_stage():
    cfg = dataclasses.replace(PRESETS["tiny"], n_layers=8)
    specs = partition(cfg, 2, throughputs=[3.0, 1.0])
    assert specs[0].block_end - specs[0].block_start > specs[1].block_end - specs[1].block_start


@pytest.mark.parametrize(
    ("cfg_changes", "p", "kwargs", "match"),
    [
        ({}, 5, {}, "exceeds n_layers"),
        ({}, 0, {}, "num_stages"),
        ({"subspace_rank": 8, "free_tail_layers": 2}, 4, {}, "free_tail_layers"),
        ({}, 2, {"throughputs": [1.0]}, "one per stage"),
        ({}, 2, {"throughputs": [1.0, -2.0]}, "throughputs"),
    ],
)
def test_bad_requests(cfg_changes, p, kwargs, match):
    cfg = dataclasses.replace(PRESETS["tiny"], **cfg_changes)
    with pytest.raises(ValueError, match=match):
        partition(cfg, p, **kwargs)


def test_boundary_after_free_layer_rejected():
    cfg = dataclasses.replace(PRESETS["tiny"], subspace_rank=8, free_tail_layers=2)
    with pytest.raises(ValueError, match="free tail layer"):
        check_spec(cfg, StageSpec(0, 2, 0, 3, True, False))
