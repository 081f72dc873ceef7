"""A ban ends a peer's open streams, not only its new ones (`node.net.gate.ProtocolGate`), over real libp2p hosts.

A long-lived stream (an averaging or delegation link, an inference session) was admitted once; when its peer is
banned meanwhile, by this protocol or any other sharing the scores, the gate cancels the stream's handler and resets
the stream. The handler whose own refusal issued the ban still gets to answer on its stream.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.peerinfo import info_from_p2p_addr
from multiaddr import Multiaddr

from node.config import TransportConfig
from node.errors import PeerRefusedError
from node.net.gate import ProtocolGate, reset_quietly
from node.net.host import full_addrs
from node.net.peerscore import PeerGuardConfig, PeerScores
from node.wire.channel import peer_scores
from tests.node.conftest import running_host

HOLD = TProtocol("/pmn-test/hold/1")
GUARD = PeerGuardConfig(ban_score=-3.0, ban_base_s=60.0, ban_max_s=60.0, max_streams_per_peer=8)


def _serve(gate: ProtocolGate, finished: list[str]) -> Callable[[Any], Awaitable[None]]:
    """A handler that echoes each message as `ok:<msg>` until EOF; `bad` is refused (`refused` while the peer is not
    banned by it, `banned` when that refusal banned it, and the stream is then reset by the handler itself)."""
    async def handler(stream: Any) -> None:
        try:
            async with gate.serve(stream) as peer:
                while data := await stream.read(64):
                    if data != b"bad":
                        await stream.write(b"ok:" + data)
                    elif gate.refuse(peer, "bad"):
                        await stream.write(b"banned")
                        await trio.sleep(0.2)  # (cut off by the ban, this would never run)
                        await reset_quietly(stream)
                        finished.append("answered")
                        return
                    else:
                        await stream.write(b"refused")
        except PeerRefusedError:
            finished.append("refused at the door")
    return handler


async def _ask(stream: Any, msg: bytes) -> bytes:
    await stream.write(msg)
    with trio.fail_after(5):
        return bytes(await stream.read(64))


async def _cut(stream: Any) -> bool:
    """True once the stream is reset or ended by the other side (bounded wait)."""
    with trio.fail_after(5):
        try:
            return await stream.read(64) == b""
        except BaseLibp2pError:
            return True


async def _refused_at_the_door(client: Any, info: Any) -> bool:
    """True when a new stream is reset at the door: during its negotiation, at its first write or its first read."""
    late = None
    try:
        late = await client.new_stream(info.peer_id, [HOLD])
        await late.write(b"hi")
        return await _cut(late)
    except BaseLibp2pError:
        return True
    finally:
        if late is not None:
            await reset_quietly(late)


def _run(body: Callable[[Any, Any, ProtocolGate, ProtocolGate, list[str]], Awaitable[None]]) -> None:
    """`body(client, server_info, gate_hold, gate_other, finished)` on two real hosts; both gates share one scores."""
    async def main() -> None:
        async with running_host(81) as (server, _), running_host(82) as (client, _):
            scores = PeerScores(GUARD)
            gate, other = ProtocolGate(HOLD, cfg=GUARD, scores=scores), ProtocolGate("/other", cfg=GUARD, scores=scores)
            finished: list[str] = []
            server.set_stream_handler(HOLD, _serve(gate, finished))
            info = info_from_p2p_addr(Multiaddr(full_addrs(server)[0]))
            await client.connect(info)
            await body(client, info, gate, other, finished)

    trio.run(main)


def test_a_ban_by_another_protocol_resets_the_peers_open_streams_and_refuses_new_ones() -> None:
    async def body(client: Any, info: Any, gate: ProtocolGate, other: ProtocolGate, finished: list[str]) -> None:
        streams = [await client.new_stream(info.peer_id, [HOLD]) for _ in range(2)]
        for i, s in enumerate(streams):
            assert await _ask(s, b"hi%d" % i) == b"ok:hi%d" % i
        me = client.get_id()
        assert gate.open[me.pretty()] == 2
        banned = [other.refuse(me, "malformed") for _ in range(3)]  # refusals on another protocol ban it
        assert banned == [False, False, True]
        assert [await _cut(s) for s in streams] == [True, True]
        with trio.fail_after(5):
            while me.pretty() in gate.open:
                await trio.sleep(0.01)
        assert gate.refused["banned_while_open"] == 2 and gate.total == 0
        assert await _refused_at_the_door(client, info)
        with trio.fail_after(5):
            while not finished:
                await trio.sleep(0.01)
        assert finished == ["refused at the door"] and gate.refused["banned"] == 1
        for s in streams:
            await reset_quietly(s)

    _run(body)


def test_the_stream_whose_refusal_bans_the_peer_is_answered_and_its_other_streams_are_cut() -> None:
    async def body(client: Any, info: Any, gate: ProtocolGate, other: ProtocolGate, finished: list[str]) -> None:
        quiet = await client.new_stream(info.peer_id, [HOLD])
        assert await _ask(quiet, b"hi") == b"ok:hi"
        loud = await client.new_stream(info.peer_id, [HOLD])
        assert [await _ask(loud, b"bad") for _ in range(3)] == [b"refused", b"refused", b"banned"]
        assert await _cut(quiet)  # the other stream of the banned peer is cut at once
        assert await _cut(loud)  # and the offending one by its handler, after its answer
        with trio.fail_after(5):
            while not finished:
                await trio.sleep(0.01)
        assert finished == ["answered"]
        assert gate.refused["banned_while_open"] == 1 and gate.refused["bad"] == 3 and gate.total == 0
        assert sum(other.refused.values()) == 0
        for s in (quiet, loud):
            await reset_quietly(s)

    _run(body)


def test_frames_rejected_on_the_activation_channel_ban_the_peer_on_every_protocol_of_the_node() -> None:
    """The node's one score table (`peer_scores`, `NodeContext.scores`): bad activation frames from a peer get it
    banned, and the gate of another protocol cuts the stream it holds open there."""
    from tests.node.test_channel import _bad_frames, _endpoint

    async def main() -> None:
        async with running_host(83) as (server, ident), running_host(84) as (client, cident):
            scores = peer_scores(TransportConfig(ban_score=-2.0))
            assert scores.cfg.ban_score == -2.0 and scores.cfg.penalty == TransportConfig().reject_penalty
            gate = ProtocolGate(HOLD, cfg=GUARD, scores=scores)
            finished: list[str] = []
            server.set_stream_handler(HOLD, _serve(gate, finished))
            recv_ep = _endpoint(server, ident, stage=1, scores=scores)  # as the lifecycle passes NodeContext.scores
            assert recv_ep.scores is scores
            bad_ep = _endpoint(client, cident, stage=0)
            addr = full_addrs(server)[0]
            info = info_from_p2p_addr(Multiaddr(addr))
            await client.connect(info)
            held = await client.new_stream(info.peer_id, [HOLD])
            assert await _ask(held, b"hi") == b"ok:hi"
            for raw, half_close, _ in list(_bad_frames().values())[:2]:
                ch = await bad_ep.open(addr)
                await ch.write_raw(raw)
                if half_close:
                    await ch.stream.close()
                await ch.run_reader()  # ends once the server rejected the frame (counted before its ERROR)
            assert scores.is_banned(client.get_id().pretty())
            assert await _cut(held)  # the activation protocol's ban cut the stream on the other protocol
            assert gate.refused["banned_while_open"] == 1
            await reset_quietly(held)

    trio.run(main)
