"""The evaluation protocol of async and replicated runs (`node.pipeline.evaluation`, `/pmn/eval/1.0.0`).

One stage's evaluation service, served over real libp2p streams, refuses a wrong microbatch count, a body of the wrong
size, a cut frame, NaN activations and frames of another step (each counted against the sender, the sixth refusal a
ban), answers an evaluation of weights it no longer keeps by name (not counted), and a valid request with the loss of
its copy. Swarms of node processes evaluate in `tests/node/test_step_exchange.py` (replicated) and
`tests/node/test_schedules.py` (async): the head records the validation loss of the final weights.
"""

from __future__ import annotations

import multiaddr
import pytest
import torch
import trio

from node.net import msgio
from node.net.access import EVAL, OpenPolicy
from node.net.host import full_addrs, make_host, parse_peer_addr
from node.net.identity import identity_from_secret
from node.net.peerscore import PeerGuardConfig, PeerScores
from node.net.running import run_host
from node.pipeline.evaluation import EVAL_PROTOCOL, EvalService, Evaluation, head_outputs
from node.training.worker import StageWorker
from node.wire import frames
from sharding import PRESETS, OptimConfig, load_corpus, partition
from tests.node.replica_swarm import B, M

EVAL_BATCHES = 2
FRAME_LIMIT = 1 << 20


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
