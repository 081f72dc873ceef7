"""Validation loss in replicated mode (`node.pipeline.evaluation`, `/pmn/eval/1.0.0`).

A swarm of real node processes (a head, two middle and two tail replicas, async with PowerSGD once per replica and
step) evaluates after every second step: the leading head records the validation loss of the weights after each
evaluated update, and the last one equals the loss of the replicas' final weights recomputed here. One replica's
evaluation service, served over real libp2p streams, refuses a stranger, malformed frames, a wrong microbatch count
and NaN activations (each counted against the sender) and answers a valid request with the loss of its copy.
"""

from __future__ import annotations

import math
from pathlib import Path

import multiaddr
import pytest
import torch
import trio
from safetensors.torch import load_file

from node.net import msgio
from node.net.access import EVAL, OpenPolicy
from node.net.host import full_addrs, make_host, parse_peer_addr
from node.net.identity import identity_from_secret
from node.net.peerscore import PeerGuardConfig, PeerScores
from node.net.running import run_host
from node.observability.status import node_status
from node.pipeline.evaluation import EVAL_PROTOCOL, EvalService, Evaluation, head_outputs
from node.training.checkpoint import latest_checkpoint
from node.training.worker import StageWorker
from node.wire import frames
from sharding import PRESETS, OptimConfig, load_corpus, partition
from tests.node.replica_swarm import B, M, check_identical_weights, records, run_to_end

STEPS, EVAL_EVERY, EVAL_BATCHES = 4, 2, 2
FRAME_LIMIT = 1 << 20


def _workers(weights: list[dict[str, torch.Tensor]] | None = None) -> list[StageWorker]:
    """The three stages' workers as a node builds them (eval microbatches set), with `weights` if given."""
    cfg = PRESETS["tiny"]
    out = []
    for spec in partition(cfg, 3):
        w = StageWorker(cfg, spec, codec="dense", optim=OptimConfig(), num_microbatches=M, microbatch_size=B,
                        corpus=load_corpus("synthetic") if spec.is_first else None)
        w.eval_batches, w.eval_seed = EVAL_BATCHES, 1234
        if weights is not None:
            w.module.load_state_dict(weights[spec.index])
        out.append(w)
    return out


def _val_loss(workers: list[StageWorker]) -> float:
    """The validation loss through the stages' live weights, activations through the codec as on the wire."""
    head, mid, tail = workers
    losses = []
    for i in range(EVAL_BATCHES):
        window = head.eval_window(i)
        ids = window[:, :-1]
        h: torch.Tensor | None = None
        for w in (head, mid):
            out = w.forward_eval(window, h)
            assert isinstance(out, bytes)
            h = w.codec.decode_activation(out, ids, torch.device("cpu"))
        losses.append(float(tail.forward_eval(window, h)))
    return sum(losses) / len(losses)


@pytest.mark.network
@pytest.mark.timeout(540)
def test_the_leading_head_records_the_validation_loss_of_the_weights_after_each_evaluated_step(tmp_path: Path) -> None:
    flags = ["--replica-averaging", "powersgd", "--powersgd-rank", "2", "--powersgd-bits", "4",
             "--replica-exchange", "step", "--schedule", "async", "--max-staleness", "1",
             "--eval-every", str(EVAL_EVERY), "--eval-batches", str(EVAL_BATCHES)]
    nodes, codes = run_to_end(tmp_path, [0, 1, 1, 2, 2], STEPS, timeout_s=420, common=flags)
    assert codes == [0] * 5
    head, mid_a, mid_b, tail_a, tail_b = nodes
    check_identical_weights([[mid_a, mid_b], [tail_a, tail_b]])
    recs = records(head)
    evals = {int(s): v for r in recs.values() for s, v in r.get("val_losses", [])}
    assert set(evals) == {EVAL_EVERY - 1, STEPS - 1}, evals  # every evaluation came back and was recorded once
    assert all(r["val_loss"] == evals[r["val_step"]] for r in recs.values() if "val_loss" in r)
    assert sum(len(r.get("val_losses", [])) for r in recs.values()) == 2
    assert recs[STEPS - 1].get("val_step") == STEPS - 1  # the last record waited for the last evaluation
    assert "last_eval_error" not in node_status(head.data_dir), node_status(head.data_dir)
    assert all("val_loss" not in r for n in nodes[1:] for r in records(n).values())  # only the head records it
    weights = []
    for n in (head, mid_a, tail_a):
        ckpt = latest_checkpoint(n.data_dir, n.stage)
        assert ckpt is not None
        weights.append(load_file(str(ckpt / "model.safetensors")))
    expected = _val_loss(_workers(weights))
    assert math.isfinite(expected) and evals[STEPS - 1] == pytest.approx(expected, abs=1e-4)


def test_a_replicas_evaluation_service_refuses_bad_input_and_answers_with_its_copys_loss() -> None:
    # a two-stage model: the tail's service takes the head's frames as the stage before it
    cfg2 = PRESETS["tiny"]
    specs = partition(cfg2, 2)
    tail = StageWorker(cfg2, specs[1], codec="dense", optim=OptimConfig(), num_microbatches=M, microbatch_size=B)
    tail.eval_batches, tail.eval_seed = EVAL_BATCHES, 1234
    head = StageWorker(cfg2, specs[0], codec="dense", optim=OptimConfig(), num_microbatches=M, microbatch_size=B,
                       corpus=load_corpus("synthetic"))
    head.eval_batches, head.eval_seed = EVAL_BATCHES, 1234
    head_ev, tail_ev = Evaluation(head, 2, 1, 2), Evaluation(tail, 2, 1, 2)

    async def main() -> None:
        listen = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
        server, client = make_host(identity_from_secret(b"\x21" * 32)), make_host(identity_from_secret(b"\x22" * 32))
        async with run_host(server, listen), run_host(client, listen):
            # a peer is banned after 6 refusals here (the node's default is 5), so that each refusal can be shown
            scores = PeerScores(PeerGuardConfig(ban_score=-6.0))
            service = EvalService(server, lambda: tail_ev, lambda s: [], 10.0, FRAME_LIMIT, policy=OpenPolicy(EVAL),
                                  scores=scores)
            await client.connect(parse_peer_addr(full_addrs(server)[0]))
            await tail_ev.keep_weights(4)  # the tail applied step 4: its copy is what an evaluation of 4 uses
            await head_ev.keep_weights(4)
            good = head_ev.encode(4, head_outputs(head, head_ev.snapshots.copies[4]), FRAME_LIMIT)

            async def ask(header: dict, body: bytes) -> dict:
                stream = await client.new_stream(server.get_id(), [EVAL_PROTOCOL])
                await msgio.write_message(stream, header, body)
                reply, _ = await msgio.read_message(stream, 4096, RuntimeError)
                await stream.close()
                return reply

            req = {"type": "eval", "step": 4, "batches": EVAL_BATCHES}
            reply = await ask({**req, "batches": 3}, good)
            assert reply["type"] == "error" and "3 microbatches; this model evaluates 2" in reply["message"], reply
            reply = await ask(req, good[:-7])  # a body that is not the frames' exact size: refused unread
            assert reply["type"] == "error" and f"body of {len(good) - 7} bytes" in reply["message"], reply
            h1 = frames.decode_header(good[:frames.HEADER_SIZE], FRAME_LIMIT)  # a frame's payload cut and padded
            cut = good[:frames.HEADER_SIZE + h1.body_len - 7] + b"\0" * 7 + good[frames.HEADER_SIZE + h1.body_len:]
            reply = await ask(req, cut)
            assert reply["type"] == "error" and "checksum mismatch" in reply["message"], reply
            # NaN in an activation: the payload is rebuilt with a NaN and its digest recomputed, so only the codec's
            # (or our) finiteness check can catch it
            h0 = frames.decode_header(good[:frames.HEADER_SIZE], FRAME_LIMIT)
            body0 = good[frames.HEADER_SIZE:frames.HEADER_SIZE + h0.body_len]
            window, payload = body0[:h0.window_len], bytearray(body0[h0.window_len:])
            payload[0:4] = bytes.fromhex("0000c07f")  # a float32 NaN
            spec = head.frame_spec(FRAME_LIMIT)
            bad = frames.encode_frame(frames.Kind.EVAL, spec.spec_hash, 0, 4, 0, payload=bytes(payload), window=window,
                                      codec=spec.codec, dtype=spec.dtype, shape=spec.shape, id_dtype=spec.id_dtype)
            reply = await ask(req, bad + good[frames.HEADER_SIZE + h0.body_len:])
            assert reply["type"] == "error" and ("NaN" in reply["message"] or "finite" in reply["message"]), reply
            reply = await ask({**req, "step": 6}, good)  # frames that name another step than the request
            assert reply["type"] == "error" and "expected the eval frame of stage 0 step 6" in reply["message"], reply
            assert service.gate.refused["malformed"] == 5
            # an evaluation of a step this replica applied and did not keep (it would wait for a later one)
            reply = await ask({**req, "step": 2}, head_ev.encode(2, head_outputs(head, head_ev.snapshots.copies[4]),
                                                                 FRAME_LIMIT))
            assert reply["type"] == "error" and "keeps no weights of step 2 to evaluate (kept: [4])" in \
                reply["message"], reply
            assert service.gate.refused["malformed"] == 5  # weights we lack are not the sender's fault
            reply = await ask(req, good)
            assert reply["type"] == "result" and reply["stage"] == 1, reply
            assert reply["val_loss"] == pytest.approx(_val_loss2(head, tail), abs=1e-6)
            assert service.served == 1
            reply = await ask({**req, "type": "evaluate"}, good)  # a sixth malformed request: banned
            assert reply["type"] == "error" and "unknown request type" in reply["message"], reply
            assert scores.is_banned(client.get_id().pretty())

    trio.run(main)


def _val_loss2(head: StageWorker, tail: StageWorker) -> float:
    losses = []
    for i in range(EVAL_BATCHES):
        window = head.eval_window(i)
        out = head.forward_eval(window, None)
        assert isinstance(out, bytes)
        losses.append(float(tail.forward_eval(window, tail.codec.decode_activation(out, window[:, :-1], torch.device("cpu")))))
    return sum(losses) / len(losses)
