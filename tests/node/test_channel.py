"""`/pmn/act/1.0.0` over real libp2p hosts on 127.0.0.1 (Noise + yamux)."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
import trio

from node.errors import HandshakeError, PeerBannedError, RemoteError
from node.net.host import full_addrs
from node.net.identity import NodeIdentity, bind
from node.services.hop_receipts import EIP712Receipts
from node.wire import frames
from node.wire.channel import ActEndpoint, LocalInfo
from protocol.receipts import Domain
from tests.node.conftest import FSPEC, SPEC_HASH, np_decoder, running_host, tcfg

pytestmark = [pytest.mark.network, pytest.mark.timeout(60)]


def _payload(value: float = 1.0) -> bytes:
    return np.full(FSPEC.payload_len // 4, value, dtype=np.float32).tobytes()


WINDOW = b"\x00" * FSPEC.window_len


def _endpoint(host, ident: NodeIdentity, stage: int, spec_hash: bytes = SPEC_HASH, local: LocalInfo | None = None,
              receipts=None, scores=None, **kw) -> ActEndpoint:
    """An endpoint of `host` claiming `ident`'s address with its binding (or the given `local`); `scores`: a node's
    shared refusal scores (default: the endpoint's own)."""
    local = local or LocalInfo.of(ident, spec_hash, stage, 3)
    spec = FSPEC if spec_hash == SPEC_HASH else frames.FrameSpec(**{**FSPEC.__dict__, "spec_hash": spec_hash})
    return ActEndpoint(host, local=local, frame_spec=spec, cfg=tcfg(**kw), decoder=np_decoder, receipts=receipts,
                       scores=scores)


async def _serve(ep: ActEndpoint, got: list, n: int) -> None:
    ch = await ep.incoming.receive()
    for _ in range(n):
        r = await ch.recv_data(5)
        got.append((ch.peer, r.frame.header.step, r.frame.header.microbatch, float(r.value[0])))


def test_roundtrip_acks_and_credits() -> None:
    async def main() -> None:
        async with running_host(1) as (h1, i1), running_host(2) as (h2, i2), trio.open_nursery() as nursery:
            recv_ep = _endpoint(h1, i1, stage=1, credits=2)
            send_ep = _endpoint(h2, i2, stage=0)
            ch = await send_ep.open(full_addrs(h1)[0])
            nursery.start_soon(ch.run_reader)
            inbound = await recv_ep.incoming.receive()
            # receiver consumes nothing yet: only 2 credits, so the third send blocks
            for mb in range(2):
                await ch.send_data(frames.Kind.ACTIVATION, 7, mb, _payload(mb), WINDOW)
            with trio.move_on_after(0.3) as scope:
                await ch.send_data(frames.Kind.ACTIVATION, 7, 2, _payload(2), WINDOW)
            assert scope.cancelled_caught
            await ch.wait_acked()
            r = await inbound.recv_data(5)
            assert (r.frame.header.step, r.frame.header.microbatch, float(r.value[0])) == (7, 0, 0.0)
            await ch.send_data(frames.Kind.ACTIVATION, 7, 2, _payload(2), WINDOW)  # credit returned
            assert [float((await inbound.recv_data(5)).value[0]) for _ in range(2)] == [1.0, 2.0]
            # gradients flow back on the same stream
            await inbound.send_data(frames.Kind.GRADIENT, 7, 0, _payload(5.0))
            g = await ch.recv_data(5)
            assert g.frame.header.kind == frames.Kind.GRADIENT and float(g.value[0]) == 5.0
            await ch.wait_acked()
            assert ch.stats.frames_out == 3 and inbound.stats.frames_in == 3
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_spec_hash_mismatch_refused_naming_both() -> None:
    other = b"\x22" * 32

    async def main() -> None:
        async with running_host(3) as (h1, i1), running_host(4) as (h2, i2):
            recv_ep = _endpoint(h1, i1, stage=1)
            send_ep = _endpoint(h2, i2, stage=0, spec_hash=other)
            with pytest.raises(RemoteError) as ei:
                await send_ep.open(full_addrs(h1)[0])
            assert other.hex() in str(ei.value) and SPEC_HASH.hex() in str(ei.value)
            assert any(other.hex() in m for m in recv_ep.handshake_failures)

    trio.run(main)


def _hdr(**kw: Any) -> frames.FrameHeader:
    base: dict[str, Any] = dict(kind=frames.Kind.ACTIVATION, spec_hash=SPEC_HASH, stage=0, step=1, microbatch=0, codec=frames.CodecId.DENSE,
                dtype=frames.Dtype.FLOAT32, shape=FSPEC.shape, window_len=FSPEC.window_len,
                payload_len=FSPEC.payload_len)
    base.update(kw)
    return frames.FrameHeader(**base)


def _bad_frames() -> dict[str, tuple[bytes, bool, str]]:
    """name -> (bytes, half-close after writing, expected text in the error)."""
    good_payload = _payload()
    nan = np.full(FSPEC.payload_len // 4, np.nan, dtype=np.float32).tobytes()
    too_big = frames.encode_header(_hdr(payload_len=10 * FSPEC.max_frame_bytes))
    wrong_shape = frames.encode_frame(frames.Kind.ACTIVATION, SPEC_HASH, 0, 1, 0, payload=good_payload, window=WINDOW,
                                 codec=frames.CodecId.DENSE, dtype=frames.Dtype.FLOAT32, shape=(2, 8, 17))
    wrong_dtype = frames.encode_frame(frames.Kind.ACTIVATION, SPEC_HASH, 0, 1, 0, payload=good_payload, window=WINDOW,
                                 codec=frames.CodecId.DENSE, dtype=frames.Dtype.FLOAT16, shape=FSPEC.shape)
    nan_frame = frames.encode_frame(frames.Kind.ACTIVATION, SPEC_HASH, 0, 1, 0, payload=nan, window=WINDOW,
                               codec=frames.CodecId.DENSE, dtype=frames.Dtype.FLOAT32, shape=FSPEC.shape)
    full = frames.encode_frame(frames.Kind.ACTIVATION, SPEC_HASH, 0, 1, 0, payload=good_payload, window=WINDOW,
                          codec=frames.CodecId.DENSE, dtype=frames.Dtype.FLOAT32, shape=FSPEC.shape)
    bad_version = bytearray(full)
    bad_version[4] = 99
    norm_as_total = frames.encode_frame(frames.Kind.NORM, SPEC_HASH, 0, 1, frames.NORM_TOTAL,
                                        payload=frames.encode_norm(1.0))  # a total must come from downstream
    norm_nan = frames.encode_frame(frames.Kind.NORM, SPEC_HASH, 0, 1, frames.NORM_PARTIAL,
                                   payload=frames.encode_norm(float("nan")))
    # the async schedule's partial sums travel upstream: one from the previous stage is refused
    norm_up_from_upstream = frames.encode_frame(frames.Kind.NORM, SPEC_HASH, 0, 1, frames.NORM_UP,
                                                payload=frames.encode_norm(1.0))
    # totals from upstream are fine, but a peer may not leave more than max_pending_norms of them unclaimed
    norm_flood = b"".join(frames.encode_frame(frames.Kind.NORM, SPEC_HASH, 0, step, frames.NORM_DOWN,
                                              payload=frames.encode_norm(1.0)) for step in range(65))
    return {
        "too_large": (too_big, False, "maximum is"),
        "wrong_shape": (wrong_shape, False, "frame shape (2, 8, 17)"),
        "wrong_dtype": (wrong_dtype, False, "dtype float16"),
        "nan": (nan_frame, False, "NaN"),
        "truncated": (full[: frames.HEADER_SIZE + 100], True, "truncated"),
        "unknown_version": (bytes(bad_version), False, "version 99"),
        "norm_wrong_direction": (norm_as_total, False, "norm frame (phase 1) from stage 0"),
        "norm_nan": (norm_nan, False, "not a finite squared norm"),
        "norm_up_wrong_direction": (norm_up_from_upstream, False, "norm frame (phase 2) from stage 0"),
        "norm_flood": (norm_flood, False, "64 norms from peer"),
    }


def test_malformed_frames_rejected_and_good_peer_served() -> None:
    bad = _bad_frames()

    async def main() -> None:
        async with running_host(5) as (h1, i1), running_host(6) as (h2, i2), running_host(7) as (h3, i3), \
                trio.open_nursery() as nursery:
            recv_ep = _endpoint(h1, i1, stage=1, ban_score=-100)
            bad_ep = _endpoint(h2, i2, stage=0)
            good_ep = _endpoint(h3, i3, stage=0)
            addr = full_addrs(h1)[0]
            bad_peer = h2.get_id().pretty()
            for i, (name, (raw, half_close, text)) in enumerate(bad.items()):
                ch = await bad_ep.open(addr)
                inbound = await recv_ep.incoming.receive()
                await ch.write_raw(raw)
                if half_close:
                    await ch.stream.close()
                await ch.run_reader()
                assert isinstance(ch.failure, RemoteError), name
                assert text in str(ch.failure), (name, str(ch.failure))
                assert recv_ep.scores.score(bad_peer) == -(i + 1)
                with pytest.raises(Exception, match=re.escape(text)):
                    await inbound.recv_data(5)
            assert sum(recv_ep.scores.reasons.values()) == len(bad)  # each one counted against the sender
            # the node keeps serving other peers
            got: list = []
            gch = await good_ep.open(addr)
            nursery.start_soon(gch.run_reader)
            await gch.send_data(frames.Kind.ACTIVATION, 1, 0, _payload(3.0), WINDOW)
            await _serve(recv_ep, got, 1)
            await gch.wait_acked()
            assert got == [(h3.get_id().pretty(), 1, 0, 3.0)]
            assert recv_ep.scores.score(h3.get_id().pretty()) == 0
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_banned_peer_refused() -> None:
    async def main() -> None:
        async with running_host(8) as (h1, i1), running_host(9) as (h2, i2):
            recv_ep = _endpoint(h1, i1, stage=1, ban_score=-1)
            bad_ep = _endpoint(h2, i2, stage=0)
            ch = await bad_ep.open(full_addrs(h1)[0])
            await ch.write_raw(b"garbage" * 40)
            await ch.run_reader()
            assert "bad magic" in str(ch.failure)
            assert recv_ep.scores.is_banned(h2.get_id().pretty())
            with pytest.raises((RemoteError, HandshakeError, PeerBannedError), match="banned|closed"):
                await bad_ep.open(full_addrs(h1)[0])

    trio.run(main)


def _forged_binding(claimed: NodeIdentity, peer: NodeIdentity) -> bytes:
    """`claimed`'s node key signing the binding of `peer`'s peer id (a key that is not `peer`'s own)."""
    return bind(NodeIdentity(secret=claimed.secret, key_pair=peer.key_pair, account=claimed.account))


def test_forged_binding_refuses_the_handshake_naming_peer_and_address() -> None:
    """A peer that claims an address its node key did not bind to its peer id is refused, both ways."""

    async def main() -> None:
        async with running_host(10) as (h1, i1), running_host(11) as (h2, i2), running_host(12) as (_, i3), \
                running_host(15) as (h4, i4), trio.open_nursery() as nursery:
            recv_ep = _endpoint(h1, i1, stage=1)
            addr, me = full_addrs(h1)[0], h2.get_id().pretty()
            forged = {
                # another node's address and its real binding (made for that node's peer id)
                "replayed": LocalInfo(SPEC_HASH, 0, 3, i3.address, bind(i3)),
                # our own address, bound by another node key
                "other key": LocalInfo(SPEC_HASH, 0, 3, i2.address, _forged_binding(i3, i2)),
                # another node's address, bound to our peer id by its node key... it never signed that
                "claimed for us": LocalInfo(SPEC_HASH, 0, 3, i3.address, _forged_binding(i2, i2)),
                "missing": LocalInfo(SPEC_HASH, 0, 3, i2.address),
            }
            for n, (name, local) in enumerate(forged.items()):
                with pytest.raises(RemoteError) as ei:
                    await _endpoint(h2, i2, stage=0, local=local).open(addr)
                text = str(ei.value)
                assert f"peer {me} claims address {local.address} without a valid binding" in text, (name, text)
                assert len(recv_ep.handshake_failures) == n + 1 and me in recv_ep.handshake_failures[-1]
            # the opener checks the acceptor the same way: here the acceptor claims another node's address
            _endpoint(h4, i4, stage=1, local=LocalInfo(SPEC_HASH, 1, 3, i3.address, bind(i3)))
            with pytest.raises(HandshakeError, match=f"peer {h4.get_id().pretty()} claims address {i3.address} "
                                                     "without a valid binding"):
                await _endpoint(h2, i2, stage=0).open(full_addrs(h4)[0])
            # the honest binding still opens a working channel
            ch = await _endpoint(h2, i2, stage=0).open(addr)
            nursery.start_soon(ch.run_reader)
            inbound = await recv_ep.incoming.receive()
            assert inbound.remote is not None and inbound.remote.address == i2.address
            assert ch.remote is not None and ch.remote.address == i1.address
            await ch.send_data(frames.Kind.ACTIVATION, 1, 0, _payload(4.0), WINDOW)
            assert float((await inbound.recv_data(5)).value[0]) == 4.0
            await ch.wait_acked()
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_no_address_is_accepted_only_while_receipts_are_off() -> None:
    async def main() -> None:
        async with running_host(13) as (h1, i1), running_host(14) as (h2, i2), running_host(16) as (h3, i3):
            anonymous = LocalInfo(SPEC_HASH, 0, 3, "")  # the benchmarks' form: no address, no binding
            _endpoint(h1, i1, stage=1, local=LocalInfo(SPEC_HASH, 1, 3, ""))
            ch = await _endpoint(h2, i2, stage=0, local=anonymous).open(full_addrs(h1)[0])
            assert ch.remote is not None and ch.remote.address == ""
            await ch.close()
            hook = EIP712Receipts(i3.account, Domain(31337, "0x" + "ab" * 20), model_id=1, tokens_per_microbatch=16)
            _endpoint(h3, i3, stage=1, receipts=hook)
            with pytest.raises(RemoteError, match=f"peer {h2.get_id().pretty()} claims no address"):
                await _endpoint(h2, i2, stage=0, local=anonymous).open(full_addrs(h3)[0])

    trio.run(main)
