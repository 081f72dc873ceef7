"""The pipeline schedules: 1f1b and gpipe equal the single-process run; async equals the delayed-gradient
reference; a gradient staler than the bound is rejected, counted against its sender, and the run goes on."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from node.config import RuntimeConfig
from node.errors import UnexpectedFrameError
from node.net.peerscore import PeerGuardConfig, PeerScores
from node.pipeline.asyncrun import AsyncPipelineRuntime
from node.pipeline.asyncworker import STALE, AsyncStageWorker
from node.testing.swarm import run_local_swarm
from node.training.worker import StageWorker
from node.wire import frames
from sharding import PRESETS, OptimConfig, load_corpus, partition, train_reference
from sharding.delayed import train_delayed
from tests.node.eval_check import checkpoint_val_loss

M, B = 2, 2
SLOW_START = ["--discovery-discovery-timeout-s", "180"]


def _swarm(tmp_path, schedule: str, staleness: int, steps: int, extra: list[str] | None = None):
    return run_local_swarm(3, steps, tmp_path, microbatches=M, microbatch_size=B, corpus="synthetic",
                           threads=[1, 1, 1], timeout_s=300,
                           extra_args=["--schedule", schedule, "--max-staleness", str(staleness), *SLOW_START,
                                       *(extra or [])])


@pytest.mark.network
@pytest.mark.timeout(360)
def test_1f1b_equals_the_single_process_run_with_bounded_activations(tmp_path) -> None:
    res = _swarm(tmp_path, "1f1b", 0, 3)
    assert res.losses == pytest.approx(train_reference(PRESETS["tiny"], OptimConfig(), 3, M, B,
                                                       load_corpus("synthetic")), abs=1e-4)
    for stage, records in res.steps.items():
        assert all(r["peak_in_flight"] <= 3 - stage for r in records), (stage, records)
        assert all(0 < r["busy_s"] <= r["seconds"] for r in records)


@pytest.mark.network
@pytest.mark.timeout(360)
@pytest.mark.parametrize(("optimizer", "lookahead"), [("adamw", 1.0), ("muon", 2.0)])
def test_async_equals_the_delayed_gradient_reference(tmp_path, optimizer: str, lookahead: float) -> None:
    optim = OptimConfig(optimizer=optimizer)
    # evaluated after steps 1 and 3 on /pmn/eval (node.pipeline.evaluation): training is the same with it
    res = _swarm(tmp_path, "async", 1, 4, ["--recipe-optimizer", optimizer, "--async-lookahead", str(lookahead),
                                           "--eval-every", "2", "--eval-batches", "2"])
    want = train_delayed(PRESETS["tiny"], optim, 4, M, B, load_corpus("synthetic"), 1, lookahead=lookahead)
    assert res.losses == pytest.approx(want, abs=1e-4)
    # the head recorded both evaluations, the last one in the run's last record; it is the validation loss of the
    # stages' final weights
    head = {int(r["step"]): r for r in res.steps[0]}
    evals = {int(s): v for r in head.values() for s, v in r.get("val_losses", [])}
    assert set(evals) == {1, 3} and head[3]["val_step"] == 3, head
    assert evals[3] == pytest.approx(checkpoint_val_loss([tmp_path / f"node{k}" for k in range(3)], optim, B, 2),
                                     abs=1e-4)
    assert res.losses != pytest.approx(train_reference(PRESETS["tiny"], optim, 4, M, B,
                                                       load_corpus("synthetic")), abs=1e-4)
    if lookahead != 1.0:  # the spec's look-ahead, not the default, corrected the delay
        assert res.losses != pytest.approx(train_delayed(PRESETS["tiny"], optim, 4, M, B, load_corpus("synthetic"),
                                                         1), abs=1e-4)
    for records in res.steps.values():
        assert [r["step"] for r in records] == [0, 1, 2, 3]
        assert all(r["stale_rejected"] == 0 and r["max_staleness"] == 1 for r in records)


@pytest.mark.network
@pytest.mark.timeout(360)
def test_async_with_global_norm_clipping_equals_the_clipped_delayed_reference(tmp_path) -> None:
    # the norms travel up and down between steps without a flush; every stage clips update k by step k's norm
    clip = OptimConfig(lr=0.01, grad_clip=0.01)
    res = _swarm(tmp_path, "async", 1, 5, ["--lr", "0.01", "--recipe-grad-clip", "0.01"])
    corpus = load_corpus("synthetic")
    want = train_delayed(PRESETS["tiny"], clip, 5, M, B, corpus, 1)
    assert res.losses == pytest.approx(want, abs=1e-4)
    unclipped = train_delayed(PRESETS["tiny"], OptimConfig(lr=0.01), 5, M, B, corpus, 1)
    assert abs(unclipped[-1] - res.losses[-1]) > 1e-3  # the clip is active (AdamW is nearly scale-free: small)
    for records in res.steps.values():
        assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
        assert all(r["stale_rejected"] == 0 for r in records)


def _head(staleness: int) -> AsyncStageWorker:
    spec = partition(PRESETS["tiny"], 2)[0]
    worker = StageWorker(PRESETS["tiny"], spec, codec="dense", optim=OptimConfig(), num_microbatches=M,
                         microbatch_size=B, corpus=load_corpus("synthetic"))
    return AsyncStageWorker.wrap(worker, staleness)


def _grad_frame(step: int, mb: int) -> frames.Frame:
    h = frames.FrameHeader(kind=frames.Kind.GRADIENT, spec_hash=b"\0" * 32, stage=1, step=step, microbatch=mb)
    return frames.Frame(header=h, payload=b"\0" * 16)


class _Recorder:
    def __init__(self) -> None:
        self.states: dict[int, dict[str, torch.Tensor]] = {}
        self.frames: list[tuple[int, int]] = []

    def on_frame(self, fr: frames.Frame) -> None:
        self.frames.append((fr.header.step, fr.header.microbatch))

    def on_before_update(self, step: int, module: torch.nn.Module) -> None:
        self.states[step] = {k: v.clone() for k, v in module.state_dict().items()}


def test_stale_gradients_decode_to_stale_and_are_counted_against_the_sender() -> None:
    w = _head(1)
    rec = _Recorder()
    w.observers.append(rec)
    initial = {k: v.clone() for k, v in w.module.state_dict().items()}
    for step in (0, 1):  # step 1 runs on the initial weights too (staleness 1), before update 0
        for mb in range(M):
            w.forward(step, mb, w.head_window(step, mb), None)
    assert not w.ready(2)
    with pytest.raises(UnexpectedFrameError, match="ahead of the last update"):
        w.forward(2, 0, w.head_window(2, 0), None)
    grad = torch.ones(B, PRESETS["tiny"].seq_len, PRESETS["tiny"].d_model)
    for mb in range(M):
        w.backward(0, mb, grad)
    w.step(0)
    assert w.ready(2) and w.next_step == 1
    # the audit recorder got the weights step 0's hops used (the stashed initial copy)
    assert all(torch.equal(rec.states[0][k], v) for k, v in initial.items())
    # a gradient for the applied step, or a duplicate of a finished backward: STALE, recorded, not an error
    assert w.decode(_grad_frame(0, 1)) is STALE
    assert rec.frames == [(0, 1)]
    with pytest.raises(UnexpectedFrameError, match="never sent"):
        w.decode(_grad_frame(7, 0))
    # the runtime counts it against the sender, then bans a sender that keeps doing it
    guard = PeerGuardConfig(penalty=1.0, ban_score=-2.0)
    ch = SimpleNamespace(scores=PeerScores(guard, clock=lambda: 0.0), peer="peerX", remote_stage=1)
    rt = AsyncPipelineRuntime(w, RuntimeConfig(), None, None)
    rt._reject(ch, _grad_frame(0, 1).header)  # type: ignore[arg-type]
    assert rt.stale_rejected == 1 and ch.scores.score("peerX") == -1.0
    assert ch.scores.reasons == {"stale-gradient": 1}
    with pytest.raises(UnexpectedFrameError, match="banned"):
        rt._reject(ch, _grad_frame(0, 0).header)  # type: ignore[arg-type]
