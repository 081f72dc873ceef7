"""Orderly shutdown: a neighbour that finished its last step and closed does not fail ours."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import trio

from node.errors import PeerLostError
from node.net.host import full_addrs
from node.wire import frames
from node.wire.channel import ActEndpoint, LocalInfo
from tests.node.conftest import FSPEC, SPEC_HASH, np_decoder, running_host, tcfg
from tests.waiting import until

pytestmark = [pytest.mark.network, pytest.mark.timeout(60)]


def _endpoint(host, stage: int) -> ActEndpoint:
    local = LocalInfo(spec_hash=SPEC_HASH, stage=stage, num_stages=3, address="")  # no address: receipts are off
    return ActEndpoint(host, local=local, frame_spec=FSPEC, cfg=tcfg(), decoder=np_decoder)


def test_frames_sent_before_an_orderly_close_stay_readable_without_error() -> None:
    async def main() -> None:
        async with running_host(41) as (h1, _), running_host(42) as (h2, _), trio.open_nursery() as nursery:
            downstream = _endpoint(h1, stage=1)
            mid = await _endpoint(h2, stage=0).open(full_addrs(h1)[0])
            nursery.start_soon(mid.run_reader)
            tail = await downstream.incoming.receive()
            grad = np.full(FSPEC.payload_len // 4, 3.0, dtype=np.float32).tobytes()
            await tail.send_data(frames.Kind.GRADIENT, 9, 1, grad)  # the neighbour's last frame of the run
            await tail.wait_acked()
            await tail.close()  # it finished its last step and leaves
            await until(lambda: mid.failure is not None, 10, "the channel to notice the orderly close")
            assert mid.closed_by_peer
            r = await mid.try_recv()  # the last gradient is still there
            assert r is not None and (r.frame.header.step, float(r.value[0])) == (9, 3.0)
            assert await mid.try_recv() is None  # and the end of the stream is not an error
            with pytest.raises(PeerLostError, match="closed the stream"):  # sending to it is
                await mid.send_data(frames.Kind.ACTIVATION, 10, 0, grad, b"\x00" * FSPEC.window_len)
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_stop_on_signal_cancels_the_body_and_reports_the_signal() -> None:
    from node.daemon import stop_on_signal

    async def main() -> tuple[int, bool, int]:
        reached_end = False
        async with trio.open_nursery() as nursery:
            async with stop_on_signal(nursery) as signalled:
                os.kill(os.getpid(), signal.SIGTERM)
                await trio.sleep_forever()
            reached_end = True
            async with stop_on_signal(nursery) as quiet:  # a body that ends first leaves no watcher behind
                await trio.sleep(0)
        return signalled.code, reached_end, quiet.code

    assert trio.run(main) == (128 + signal.SIGTERM, True, 0)
