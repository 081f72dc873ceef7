"""EIP-712 receipts carried by /pmn/act/1.0.0: signed by the sender, countersigned in the ack."""

from __future__ import annotations

import numpy as np
import pytest
import trio

from node.errors import RemoteError
from node.net.host import full_addrs
from node.services.hop_receipts import EIP712Receipts
from node.wire import frames
from node.wire.channel import ActEndpoint, LocalInfo
from protocol.receipts import Domain, StaticKeyRegistry, payload_digest, verify_signed_receipt
from tests.node.conftest import FSPEC, SPEC_HASH, np_decoder, running_host, tcfg

pytestmark = [pytest.mark.network, pytest.mark.timeout(60)]
DOMAIN = Domain(31337, "0x" + "ab" * 20)
PAYLOAD = np.ones(FSPEC.payload_len // 4, dtype=np.float32).tobytes()
WINDOW = b"\x00" * FSPEC.window_len


def _ep(host, ident, stage: int, hook: EIP712Receipts) -> ActEndpoint:
    local = LocalInfo.of(ident, SPEC_HASH, stage, 2)  # its address, bound to its peer id
    return ActEndpoint(host, local=local, frame_spec=FSPEC, cfg=tcfg(), receipts=hook, decoder=np_decoder)


def test_cosigned_receipts_verify() -> None:
    async def main() -> None:
        async with running_host(21) as (h0, i0), running_host(22) as (h1, i1), trio.open_nursery() as nursery:
            r0 = EIP712Receipts(i0.account, DOMAIN, model_id=7, tokens_per_microbatch=16)
            r1 = EIP712Receipts(i1.account, DOMAIN, model_id=7, tokens_per_microbatch=16)
            send, recv = _ep(h0, i0, 0, r0), _ep(h1, i1, 1, r1)
            ch = await send.open(full_addrs(h1)[0])
            nursery.start_soon(ch.run_reader)
            inbound = await recv.incoming.receive()
            await ch.send_data(frames.Kind.ACTIVATION, 3, 1, PAYLOAD, WINDOW)
            await inbound.recv_data(5)
            await inbound.send_data(frames.Kind.GRADIENT, 3, 1, PAYLOAD)
            await ch.recv_data(5)
            await ch.wait_acked()
            await inbound.wait_acked()
            nursery.cancel_scope.cancel()
        registry = StaticKeyRegistry([i0.address, i1.address])
        fwd, bwd = r0.cosigned[0], r1.cosigned[0]
        for signed in (fwd, bwd):
            verify_signed_receipt(signed, DOMAIN, registry)
        assert fwd.receipt.payload_digest == payload_digest(PAYLOAD, WINDOW)
        assert (fwd.receipt.direction, fwd.receipt.stage, fwd.receipt.receiver) == (0, 0, i1.address)
        assert (bwd.receipt.direction, bwd.receipt.stage, bwd.receipt.receiver) == (1, 1, i0.address)
        assert len(r1.received) == 1 and len(r0.received) == 1

    trio.run(main)


def test_forged_sender_signature_rejected() -> None:
    async def main() -> None:
        async with running_host(23) as (h0, i0), running_host(24) as (h1, i1), running_host(25) as (_, i2):
            forger = EIP712Receipts(i2.account, DOMAIN, model_id=7, tokens_per_microbatch=16)  # wrong key
            r1 = EIP712Receipts(i1.account, DOMAIN, model_id=7, tokens_per_microbatch=16)
            send, recv = _ep(h0, i0, 0, forger), _ep(h1, i1, 1, r1)
            ch = await send.open(full_addrs(h1)[0])
            await ch.send_data(frames.Kind.ACTIVATION, 0, 0, PAYLOAD, WINDOW)
            await ch.run_reader()
            assert isinstance(ch.failure, RemoteError) and "receipt" in str(ch.failure)
            assert recv.scores.score(h0.get_id().pretty()) < 0 and r1.received == []

    trio.run(main)
