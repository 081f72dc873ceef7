"""Local token windows (`FrameSpec.local_windows`): with the spec's dataset on every stage, ACTIVATION frames travel
without their token window over real libp2p streams (Noise + yamux); the receiver reads the window of (step,
microbatch) from its own data, and the header digest, which covers it, refuses a sender whose data differs.
EVAL frames keep their window, and a node that expects windows on the wire refuses a frame without one."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np
import pytest
import trio

from node.errors import RemoteError
from node.net.host import full_addrs
from node.wire import frames
from node.wire.channel import ActEndpoint, LocalInfo
from tests.node.conftest import FSPEC, SPEC_HASH, np_decoder, running_host, tcfg

pytestmark = [pytest.mark.network, pytest.mark.timeout(60)]

LOCAL = dataclasses.replace(FSPEC, local_windows=True, eval_batches=1)


def _window(step: int, mb: int) -> bytes:
    """The (step, mb) window of the test's 'dataset': distinct per microbatch."""
    rng = np.random.default_rng(1000 * step + mb)
    return rng.integers(0, 256, FSPEC.window_len // 2, dtype="<u2").tobytes()


def _payload(value: float) -> bytes:
    return np.full(FSPEC.payload_len // 4, value, dtype=np.float32).tobytes()


def _endpoint(host: Any, ident: Any, stage: int, spec: frames.FrameSpec, source: Any = None) -> ActEndpoint:
    return ActEndpoint(host, local=LocalInfo.of(ident, SPEC_HASH, stage, 3, eval_plan=(1, 1)), frame_spec=spec,
                       cfg=tcfg(), decoder=np_decoder, window_source=source)


def test_activation_frames_travel_without_the_window_and_the_receiver_reads_its_own() -> None:
    async def main() -> None:
        async with running_host(41) as (h1, i1), running_host(42) as (h2, i2), trio.open_nursery() as nursery:
            recv_ep = _endpoint(h1, i1, 1, LOCAL, _window)
            send_ep = _endpoint(h2, i2, 0, LOCAL, _window)
            ch = await send_ep.open(full_addrs(h1)[0])
            nursery.start_soon(ch.run_reader)
            inbound = await recv_ep.incoming.receive()
            await ch.send_data(frames.Kind.ACTIVATION, 3, 1, _payload(1.5), _window(3, 1))
            r = await inbound.recv_data(5)
            # the window was not on the wire, yet the received frame holds the receiver's own copy
            assert r.frame.header.window_len == 0 and r.frame.window == _window(3, 1)
            assert float(r.value[0]) == 1.5
            assert inbound.stats.bytes_in == frames.HEADER_SIZE + FSPEC.payload_len
            # evaluation frames still carry theirs
            await ch.send_data(frames.Kind.EVAL, 0, 0, _payload(2.0), _window(9, 9))
            e = await inbound.recv_data(5)
            assert e.frame.header.window_len == FSPEC.window_len and e.frame.window == _window(9, 9)
            await ch.wait_acked()
            # each endpoint's totals count its channel's bytes (what a replicated node's step record reports)
            assert (recv_ep.totals.bytes_in, recv_ep.totals.bytes_out) == (inbound.stats.bytes_in, inbound.stats.bytes_out)
            assert (send_ep.totals.bytes_in, send_ep.totals.bytes_out) == (ch.stats.bytes_in, ch.stats.bytes_out)
            assert send_ep.totals.bytes_out > 2 * frames.HEADER_SIZE + FSPEC.payload_len
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_a_sender_whose_window_differs_from_the_receivers_data_is_refused() -> None:
    async def main() -> None:
        async with running_host(43) as (h1, i1), running_host(44) as (h2, i2):
            recv_ep = _endpoint(h1, i1, 1, LOCAL, _window)
            send_ep = _endpoint(h2, i2, 0, LOCAL, _window)
            ch = await send_ep.open(full_addrs(h1)[0])
            inbound = await recv_ep.incoming.receive()
            await ch.send_data(frames.Kind.ACTIVATION, 3, 1, _payload(1.0), _window(3, 0))  # another window's data
            await ch.run_reader()
            assert isinstance(ch.failure, RemoteError)
            assert "token window this node reads from the spec's dataset" in str(ch.failure)
            with pytest.raises(Exception, match="checksum mismatch"):
                await inbound.recv_data(5)
            assert recv_ep.scores.score(h2.get_id().pretty()) == -1  # counted against the sender

    trio.run(main)


@pytest.mark.parametrize("sender_local", [True, False])
def test_a_node_pair_that_disagrees_on_local_windows_is_refused_naming_the_fix(sender_local: bool) -> None:
    async def main() -> None:
        async with running_host(45) as (h1, i1), running_host(46) as (h2, i2):
            recv_ep = _endpoint(h1, i1, 1, FSPEC if sender_local else LOCAL, None if sender_local else _window)
            send_ep = _endpoint(h2, i2, 0, LOCAL if sender_local else FSPEC, _window if sender_local else None)
            ch = await send_ep.open(full_addrs(h1)[0])
            inbound = await recv_ep.incoming.receive()
            await ch.send_data(frames.Kind.ACTIVATION, 0, 0, _payload(1.0), _window(0, 0))
            await ch.run_reader()
            assert isinstance(ch.failure, RemoteError)
            assert "[data] section" in str(ch.failure)
            with pytest.raises(Exception, match=re.escape("token window of")):
                await inbound.recv_data(5)

    trio.run(main)


def test_a_stage_worker_reads_the_heads_window_and_refuses_a_microbatch_outside_the_step() -> None:
    from node.errors import UnexpectedFrameError
    from node.training.worker import StageWorker, window_to_bytes
    from sharding import PRESETS, OptimConfig, load_corpus, partition

    cfg = PRESETS["tiny"]
    corpus = load_corpus("synthetic")
    head, tail = (StageWorker(cfg, spec, codec="bf16", optim=OptimConfig(), num_microbatches=2, microbatch_size=2,
                              corpus=corpus, local_windows=True) for spec in partition(cfg, 2))
    assert tail.frame_spec(1 << 20).local_windows
    assert tail.local_window(5, 1) == window_to_bytes(head.head_window(5, 1), head.id_bytes)
    with pytest.raises(UnexpectedFrameError, match="microbatch 2 out of range"):
        tail.local_window(5, 2)
    with pytest.raises(ValueError, match="local_windows needs the spec's dataset"):
        StageWorker(cfg, partition(cfg, 2)[1], codec="bf16", optim=OptimConfig(), num_microbatches=2,
                    microbatch_size=2, local_windows=True)
