"""Stage workers wired in-process through wire frames reproduce the single-process losses."""

from __future__ import annotations

import pytest
import torch

from node.training.worker import StageWorker, window_to_bytes
from node.wire import frames
from sharding import PRESETS, OptimConfig, load_corpus, partition, train_reference

pytestmark = pytest.mark.timeout(120)


def _frame(w: StageWorker, kind: frames.Kind, step: int, mb: int, payload: bytes, window: bytes = b"") -> frames.Frame:
    spec = w.frame_spec(1 << 26)
    raw = frames.encode_frame(kind, spec.spec_hash, 0, step, mb, payload=payload, window=window, codec=spec.codec,
                         dtype=spec.dtype, shape=spec.shape)
    return frames.decode_frame(raw, 1 << 26)


def _run(num_stages: int, codec: str, preset: str, steps: int = 3, m: int = 2, b: int = 2) -> list[float]:
    config = PRESETS[preset]
    corpus = load_corpus("synthetic")
    optim = OptimConfig()
    specs = partition(config, num_stages)
    ws = [StageWorker(config, s, codec=codec, optim=optim, num_microbatches=m, microbatch_size=b,
                      corpus=corpus if s.is_first else None) for s in specs]
    losses = []
    for step in range(steps):
        for mb in range(m):
            window = ws[0].head_window(step, mb)
            h = None
            for i, w in enumerate(ws):
                out = w.forward(step, mb, window, h)
                if i + 1 < len(ws):
                    assert isinstance(out, bytes)  # a non-tail stage returns its encoded activation
                    fr = _frame(ws[i + 1], frames.Kind.ACTIVATION, step, mb, out, window_to_bytes(window, w.id_bytes))
                    window, h = ws[i + 1].decode(fr)
            g: torch.Tensor | None = None
            for i in reversed(range(len(ws))):
                payload = ws[i].backward(step, mb, g)
                if payload is not None:
                    grad = ws[i - 1].decode(_frame(ws[i - 1], frames.Kind.GRADIENT, step, mb, payload))
                    assert isinstance(grad, torch.Tensor)  # a GRADIENT frame decodes to one tensor
                    g = grad
        results = [w.step(step) for w in ws]
        loss = results[-1]
        assert loss is not None  # the tail reports the step's loss
        losses.append(loss)
    return losses


@pytest.mark.parametrize(("stages", "codec", "preset"), [(2, "dense", "tiny"), (3, "subspace-fp32", "tiny-subspace")])
def test_workers_match_reference(stages: int, codec: str, preset: str) -> None:
    ref = train_reference(PRESETS[preset], OptimConfig(), 3, 2, 2, load_corpus("synthetic"))
    got = _run(stages, codec, preset)
    assert got == pytest.approx(ref, abs=1e-4)
