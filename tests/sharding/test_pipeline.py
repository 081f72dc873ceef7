import pytest

from sharding.config import PRESETS
from sharding.data import load_corpus
from sharding.pipeline import LocalPipeline
from sharding.stage import build_stage
from sharding.stagespec import StageSpec


@pytest.mark.parametrize("codec", ["dense", "int8", "subspace", "subspace-int8"])
def test_bytes_crossing_boundaries_match_codec_figures(codec):
    cfg = PRESETS["tiny-subspace"]
    pipe = LocalPipeline(cfg, 3, codec)
    window = load_corpus("synthetic").batch("train", 0, 0, 2, cfg.seq_len, 0)
    pipe.forward_backward(window)
    tokens = 2 * cfg.seq_len
    assert pipe.bytes_sent == 2 * 2 * tokens * pipe.codec.bytes_per_token
    assert pipe.id_bytes_sent == 2 * tokens * 2
    assert pipe.wire_bytes_per_token == pipe.codec.bytes_per_token + 2


def test_inconsistent_specs_rejected():
    cfg = PRESETS["tiny"]
    with pytest.raises(ValueError, match="head stage must end"):
        build_stage(cfg, StageSpec(1, 2, 2, 3, False, True))
    with pytest.raises(ValueError, match="non-empty range"):
        build_stage(cfg, StageSpec(0, 2, 0, 9, True, False))
    with pytest.raises(ValueError, match="must start at"):
        LocalPipeline(cfg, [StageSpec(0, 2, 0, 2, True, False), StageSpec(1, 2, 3, 4, False, True)], "dense")
