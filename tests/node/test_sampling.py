"""How the tail stage picks a token: greedy by default, else a seeded, reproducible top-k draw."""

from __future__ import annotations

import pytest
import torch

from node.services.inference import InferenceError, Sampling, _sampling, pick_token


def test_greedy_topk1_and_reproducible_draws() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(256, generator=gen)
    best = int(logits.argmax())
    assert pick_token(logits, None, [1, 2]) == best
    assert pick_token(logits, Sampling(0.0, 0, 5), [1, 2]) == best
    assert pick_token(logits, Sampling(1.0, 1, 5), [1, 2]) == best  # top-1 is greedy at any temperature
    draw = Sampling(1.5, 20, 7)
    picks = [pick_token(logits, draw, [1, 2, i]) for i in range(50)]
    assert picks == [pick_token(logits, draw, [1, 2, i]) for i in range(50)]  # same seed and tokens: same draw
    top20 = set(torch.topk(logits, 20).indices.tolist())
    assert set(picks) <= top20 and len(set(picks)) > 1  # only among the top k, and not always the same


@pytest.mark.parametrize("bad", [{"temperature": -1, "top_k": 0, "seed": 0}, {"temperature": 1, "top_k": 999, "seed": 0},
                                 {"temperature": 1, "top_k": 0}, {"temperature": True, "top_k": 0, "seed": 0}, [1]])
def test_bad_sampling_fields_are_refused(bad: object) -> None:
    with pytest.raises(InferenceError, match="sampling"):
        _sampling({"sampling": bad}, 256)
    assert _sampling({}, 256) is None
