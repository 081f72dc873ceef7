"""Validation loss: forward-only EVAL frames through the stages, the tail's mean equals one process's forward.

In process: stage workers chained through wire frames evaluate between steps; the losses equal
`LocalPipeline.evaluate` with the same weights, and training is bit-identical with evaluation on or off.
Over libp2p: EVAL frames are bounded like training frames, unsigned, and refused where no evaluation runs.
A 3-stage swarm records `val_loss` every `--eval-every` steps and still matches the reference losses.
"""

from __future__ import annotations

import dataclasses
from contextlib import AbstractAsyncContextManager
from typing import Any

import numpy as np
import pytest
import torch
import trio

from node.config import RuntimeConfig
from node.errors import PeerLostError, RemoteError, UnexpectedFrameError
from node.net.host import full_addrs
from node.pipeline.runtime import PipelineRuntime
from node.services.hop_receipts import EIP712Receipts
from node.testing.swarm import run_local_swarm
from node.training.worker import StageWorker, window_to_bytes
from node.wire import frames
from node.wire.channel import ActEndpoint, LocalInfo
from protocol.receipts import Domain
from sharding import PRESETS, LocalPipeline, OptimConfig, load_corpus, partition, train_reference
from sharding.data import Corpus
from tests.node.conftest import FSPEC, SPEC_HASH, np_decoder, running_host, tcfg

M, B, EVAL_BATCHES, SEED = 2, 2, 2, 77


def _host(seed: int) -> AbstractAsyncContextManager[Any]:
    return running_host(seed)


def _frame(w: StageWorker, kind: frames.Kind, step: int, mb: int, payload: bytes, window: bytes = b"") -> frames.Frame:
    spec = w.frame_spec(1 << 26)
    raw = frames.encode_frame(kind, spec.spec_hash, 0, step, mb, payload=payload, window=window, codec=spec.codec,
                              dtype=spec.dtype, shape=spec.shape)
    frames.check_data_header(frames.decode_header(raw, 1 << 26), spec)
    return frames.decode_frame(raw, 1 << 26)


def _workers(corpus: Corpus, stages: int, codec: str, preset: str) -> list[StageWorker]:
    return [StageWorker(PRESETS[preset], s, codec=codec, optim=OptimConfig(), num_microbatches=M, microbatch_size=B,
                        corpus=corpus if s.is_first else None, eval_batches=EVAL_BATCHES, eval_seed=SEED)
            for s in partition(PRESETS[preset], stages)]


def _train_step(ws: list[StageWorker], step: int) -> float:
    for mb in range(M):
        window, h = ws[0].head_window(step, mb), None
        for i, w in enumerate(ws):
            out = w.forward(step, mb, window, h)
            if i + 1 < len(ws):
                assert isinstance(out, bytes)
                window, h = ws[i + 1].decode(_frame(ws[i + 1], frames.Kind.ACTIVATION, step, mb, out,
                                                    window_to_bytes(window, w.id_bytes)))
        g: Any = None
        for i in reversed(range(len(ws))):
            payload = ws[i].backward(step, mb, g)
            if payload is not None:
                g = ws[i - 1].decode(_frame(ws[i - 1], frames.Kind.GRADIENT, step, mb, payload))
    loss = [w.step(step) for w in ws][-1]
    assert loss is not None
    return loss


def _evaluate(ws: list[StageWorker], step: int) -> float:
    """What the runtime does: the head reads the val windows, EVAL frames carry them stage to stage."""
    losses = []
    for i in range(EVAL_BATCHES):
        window, h = ws[0].eval_window(i), None
        for k, w in enumerate(ws):
            out = w.forward_eval(window, h)
            if k + 1 < len(ws):
                assert isinstance(out, bytes)
                window, h = ws[k + 1].decode(_frame(ws[k + 1], frames.Kind.EVAL, step, i, out,
                                                    window_to_bytes(window, w.id_bytes)))
            else:
                assert isinstance(out, float)
                losses.append(out)
    return sum(losses) / len(losses)


def _state(ws: list[StageWorker]) -> list[dict[str, torch.Tensor]]:
    out = []
    for w in ws:
        flat = {f"w/{k}": v.clone() for k, v in w.module.state_dict().items()}
        for idx, st in w.optimizer.state_dict()["state"].items():
            flat.update({f"o/{idx}/{k}": torch.as_tensor(v).clone() for k, v in st.items()})
        flat.update({f"g/{n}": p.grad.clone() for n, p in w.module.named_parameters() if p.grad is not None})
        out.append(flat)
    return out


@pytest.mark.parametrize(("stages", "codec", "preset"), [(2, "dense", "tiny"), (3, "subspace-fp32", "tiny-subspace")])
def test_eval_equals_one_process_forward_and_leaves_training_unchanged(stages: int, codec: str, preset: str) -> None:
    corpus = load_corpus("synthetic")
    with_eval, without = _workers(corpus, stages, codec, preset), _workers(corpus, stages, codec, preset)
    ref = LocalPipeline(PRESETS[preset], stages, codec, OptimConfig())
    vals, ref_vals, losses, plain = [], [], [], []
    for step in range(3):
        losses.append(_train_step(with_eval, step))
        plain.append(_train_step(without, step))
        ref.train_step(step, corpus, M, B)
        before = _state(with_eval)
        vals.append(_evaluate(with_eval, step))
        after = _state(with_eval)
        assert all(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(before, after, strict=True))
        assert not any(w._stash for w in with_eval)  # nothing stashed for a backward
        ref_vals.append(ref.evaluate(corpus, EVAL_BATCHES, B, seed=SEED))
    assert losses == plain  # bit-identical training with evaluation between the steps
    assert vals == pytest.approx(ref_vals, rel=1e-5)
    assert len(set(vals)) == 3  # the weights changed between evaluations, the batches did not
    assert with_eval[0].eval_window(1).equal(with_eval[0].eval_window(1))


class _NoTrain(Corpus):
    """A corpus whose train split raises: evaluation must never touch it."""

    def split(self, split: str) -> torch.Tensor:
        if split != "val":
            raise AssertionError(f"read the {split!r} split")
        return super().split(split)


def test_node_evaluation_reads_only_the_validation_split() -> None:
    src = load_corpus("synthetic")
    guarded = _NoTrain(**{f.name: getattr(src, f.name) for f in dataclasses.fields(src)})
    w = _workers(guarded, 2, "dense", "tiny")[0]
    with pytest.raises(AssertionError, match="read the 'train' split"):
        w.head_window(0, 0)  # the guard works
    windows = [w.eval_window(i) for i in range(EVAL_BATCHES)]
    assert all(x.equal(src.batch("val", 0, i, B, PRESETS["tiny"].seq_len, SEED)) for i, x in enumerate(windows))
    with pytest.raises(ValueError, match="validation microbatch 2 out of range"):
        w.eval_window(EVAL_BATCHES)


def _eval_spec(batches: int) -> frames.FrameSpec:
    return dataclasses.replace(FSPEC, eval_batches=batches)


def _payload(value: float = 1.0) -> bytes:
    return np.full(FSPEC.payload_len // 4, value, dtype=np.float32).tobytes()


WINDOW = b"\x00" * FSPEC.window_len


def _eval_frame(mb: int, signature: bytes = b"", stage: int = 0) -> bytes:
    return frames.encode_frame(frames.Kind.EVAL, SPEC_HASH, stage, 4, mb, payload=_payload(), window=WINDOW,
                               signature=signature, codec=frames.CodecId.DENSE, dtype=frames.Dtype.FLOAT32,
                               shape=FSPEC.shape)


def test_eval_headers_are_checked_like_activations() -> None:
    spec = _eval_spec(2)
    ok = frames.decode_header(_eval_frame(1), spec.max_frame_bytes)
    frames.check_data_header(ok, spec)
    for raw, batches, text in [
        (_eval_frame(0), 0, "runs no evaluation"),
        (_eval_frame(2), 2, "validation microbatch 2; evaluations have 2"),
        (_eval_frame(0, signature=b"\x01" * 65), 2, "carries a 65-byte signature"),
    ]:
        with pytest.raises(frames.UnexpectedFrameError, match=text):
            frames.check_data_header(frames.decode_header(raw, spec.max_frame_bytes), _eval_spec(batches))
    no_window = frames.encode_frame(frames.Kind.EVAL, SPEC_HASH, 0, 4, 0, payload=_payload(), codec=frames.CodecId.DENSE,
                                    dtype=frames.Dtype.FLOAT32, shape=FSPEC.shape)
    with pytest.raises(frames.ShapeMismatchError, match="token window of 0 bytes"):
        frames.check_data_header(frames.decode_header(no_window, spec.max_frame_bytes), spec)
    huge = frames.encode_header(frames.FrameHeader(kind=frames.Kind.EVAL, spec_hash=SPEC_HASH, stage=0, step=4,
                                                   microbatch=0, payload_len=10 * spec.max_frame_bytes))
    with pytest.raises(frames.FrameTooLargeError, match="maximum is"):
        frames.decode_header(huge, spec.max_frame_bytes)


def _endpoint(host, ident, stage: int, batches: int, receipts=None, every: int = 5, **kw) -> ActEndpoint:
    local = LocalInfo.of(ident, SPEC_HASH, stage, 3, (every, batches) if batches else (0, 0))
    return ActEndpoint(host, local=local, frame_spec=_eval_spec(batches), cfg=tcfg(**kw), decoder=np_decoder,
                       receipts=receipts)


@pytest.mark.network
@pytest.mark.timeout(60)
def test_hostile_eval_frames_are_refused_and_counted_and_good_ones_are_not_receipted() -> None:
    domain = Domain(31337, "0x" + "ab" * 20)

    async def main() -> None:
        async with _host(41) as (h1, i1), _host(42) as (h2, i2), _host(43) as (h3, i3), \
                trio.open_nursery() as nursery:
            hook_recv = EIP712Receipts(i1.account, domain, model_id=1, tokens_per_microbatch=16)
            recv_ep = _endpoint(h1, i1, 1, 2, receipts=hook_recv, ban_score=-100, credits=2)
            addr = full_addrs(h1)[0]
            # an evaluating receiver: a good EVAL frame is acked without a receipt, a training frame with one
            hook_send = EIP712Receipts(i2.account, domain, model_id=1, tokens_per_microbatch=16)
            good = await _endpoint(h2, i2, 0, 2, receipts=hook_send).open(addr)
            nursery.start_soon(good.run_reader)
            inbound = await recv_ep.incoming.receive()
            await good.send_data(frames.Kind.EVAL, 4, 1, _payload(2.0), WINDOW)
            await good.send_data(frames.Kind.ACTIVATION, 5, 0, _payload(3.0), WINDOW)
            got = [await inbound.recv_data(5) for _ in range(2)]
            await good.wait_acked()
            assert [(r.frame.header.kind, float(r.value[0])) for r in got] == [(frames.Kind.EVAL, 2.0),
                                                                               (frames.Kind.ACTIVATION, 3.0)]
            assert [r.receipt.step for r in hook_recv.received] == [5]
            assert [r.receipt.step for r in hook_send.cosigned] == [5]
            # a hostile sender: beyond the evaluation's microbatches, signed, beyond its credits
            bad_ep = _endpoint(h3, i3, 0, 2)
            bad_peer = h3.get_id().pretty()
            cases = [(0, _eval_frame(2), "validation microbatch 2"),
                     (0, _eval_frame(0, signature=b"\x01" * 65), "65-byte signature"),
                     (2, _eval_frame(0), "beyond its 2 credits")]  # two eval frames in credit, a third beyond
            for i, (sent, raw, text) in enumerate(cases):
                ch = await bad_ep.open(addr)
                await recv_ep.incoming.receive()  # never consumed: no credit comes back
                for mb in range(sent):
                    await ch.send_data(frames.Kind.EVAL, 4, mb, _payload(), WINDOW)
                await ch.write_raw(raw)
                await ch.run_reader()
                assert isinstance(ch.failure, RemoteError) and text in str(ch.failure), (text, ch.failure)
                assert recv_ep.scores.score(bad_peer) == -(i + 1)
            nursery.cancel_scope.cancel()

    trio.run(main)


@pytest.mark.network
@pytest.mark.timeout(60)
def test_eval_frames_refused_where_no_evaluation_runs_and_plans_must_match() -> None:
    async def main() -> None:
        async with _host(44) as (h1, i1), _host(45) as (h2, i2), _host(46) as (h3, i3):
            plain = _endpoint(h1, i1, 1, 0)
            addr = full_addrs(h1)[0]
            ch = await _endpoint(h2, i2, 0, 0).open(addr)
            await plain.incoming.receive()
            await ch.write_raw(_eval_frame(0))
            await ch.run_reader()
            assert isinstance(ch.failure, RemoteError) and "runs no evaluation" in str(ch.failure)
            assert plain.scores.score(h2.get_id().pretty()) == -1
            with pytest.raises(RemoteError, match="evaluation mismatch: peer evaluates every 5 steps on 2"):
                await _endpoint(h3, i3, 0, 2).open(addr)
            assert any("evaluation mismatch" in m for m in plain.handshake_failures)

    trio.run(main)


@pytest.mark.network
@pytest.mark.timeout(60)
def test_runtime_evaluates_what_upstream_sends_and_refuses_frames_out_of_place() -> None:
    corpus = load_corpus("synthetic")
    head, tail = _workers(corpus, 2, "dense", "tiny")
    want = LocalPipeline(PRESETS["tiny"], 2, "dense", OptimConfig()).evaluate(corpus, EVAL_BATCHES, B, seed=SEED)
    big = 1 << 26

    async def send_eval(ch: Any, index: int) -> None:
        window = head.eval_window(index)
        out = head.forward_eval(window, None)
        assert isinstance(out, bytes)
        await ch.send_data(frames.Kind.EVAL, 0, index, out, window_to_bytes(window, head.id_bytes))

    async def main() -> None:
        async with _host(47) as (h1, i1), _host(48) as (h2, i2), trio.open_nursery() as nursery:
            plan = (1, EVAL_BATCHES)
            spec = tail.frame_spec(big)
            recv_ep = ActEndpoint(h1, local=LocalInfo.of(i1, spec.spec_hash, 1, 2, plan), frame_spec=spec,
                                  cfg=tcfg(max_frame_bytes=big, ban_score=-100), decoder=tail.decode)
            send_ep = ActEndpoint(h2, local=LocalInfo.of(i2, spec.spec_hash, 0, 2, plan),
                                  frame_spec=head.frame_spec(big), cfg=tcfg(max_frame_bytes=big))
            ch = await send_ep.open(full_addrs(h1)[0])
            nursery.start_soon(ch.run_reader)
            inbound = await recv_ep.incoming.receive()
            peer = h2.get_id().pretty()
            rt = PipelineRuntime(tail, RuntimeConfig(frame_timeout_s=10), upstream=inbound)
            for i in range(EVAL_BATCHES):
                await send_eval(ch, i)
            assert await rt.run_eval(0) == pytest.approx(want, rel=1e-5)  # the initial weights, as one process
            await send_eval(ch, 0)  # while step 0 trains
            with pytest.raises(UnexpectedFrameError, match="expected ACTIVATION frames from stage 0, got EVAL"):
                await rt.run_step(0)
            assert recv_ep.scores.score(peer) == -1
            window = head.head_window(0, 0)
            out = head.forward(0, 0, window, None)
            assert isinstance(out, bytes)
            await ch.send_data(frames.Kind.ACTIVATION, 0, 0, out, window_to_bytes(window, head.id_bytes))
            with pytest.raises(UnexpectedFrameError, match="expected validation microbatch 0 from stage 0, got "
                                                           "ACTIVATION for step 0"):
                await rt.run_eval(0)  # a training frame while evaluating
            assert recv_ep.scores.score(peer) == -2
            quiet = PipelineRuntime(tail, RuntimeConfig(frame_timeout_s=0.5), upstream=inbound)
            with pytest.raises(PeerLostError, match="no validation microbatch .* within frame_timeout_s=0.5"):
                await quiet.run_eval(1)  # nothing comes: the wait is bounded
            for r in (rt, quiet):
                r.detach()
            assert not tail._stash and all(p.grad is None for p in tail.module.parameters())
            nursery.cancel_scope.cancel()

    trio.run(main)


@pytest.mark.network
@pytest.mark.timeout(300)
def test_three_stage_swarm_records_val_loss_of_the_validation_split(tmp_path) -> None:
    steps, every = 4, 2
    res = run_local_swarm(3, steps, tmp_path, microbatches=M, microbatch_size=B, corpus="synthetic", threads=[1, 1, 1],
                          timeout_s=240, extra_args=["--eval-every", str(every), "--eval-batches", str(EVAL_BATCHES),
                                                     "--runtime-eval-seed", str(SEED), "--no-dht"])
    corpus = load_corpus("synthetic")
    assert res.losses == pytest.approx(train_reference(PRESETS["tiny"], OptimConfig(), steps, M, B, corpus), abs=1e-4)
    tail = {r["step"]: r for r in res.steps[2]}
    assert [s for s in sorted(tail) if "val_loss" in tail[s]] == [1, 3]
    assert not any("val_loss" in r for s in (0, 1) for r in res.steps[s])  # only the tail knows it
    ref = LocalPipeline(PRESETS["tiny"], 3, "dense", OptimConfig())
    want = {}
    for step in range(steps):
        ref.train_step(step, corpus, M, B)
        want[step] = ref.evaluate(corpus, EVAL_BATCHES, B, seed=SEED)
    assert [tail[s]["val_loss"] for s in (1, 3)] == pytest.approx([want[1], want[3]], abs=1e-4)
