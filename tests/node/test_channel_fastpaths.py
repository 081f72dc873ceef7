"""Fast paths of `/pmn/act/1.0.0` (node/channel.py) over real libp2p hosts on 127.0.0.1.

Byte-exact frames at odd sizes (many small, a few of several MiB, two channels on one connection
at once), one worker-thread hop per received frame, credits that ride along ACKs without ever
stalling a sender, and the chunked exact reader.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import trio
from blake3 import blake3

from node.config import TransportConfig
from node.errors import ChecksumError, NonFiniteError, RemoteError
from node.net.host import full_addrs
from node.wire import frames
from node.wire.channel import ActChannel, ActEndpoint, LocalInfo, _Reader
from tests.node.conftest import running_host

pytestmark = [pytest.mark.network, pytest.mark.timeout(90)]
SPEC_HASH = b"\x5a" * 32


def _spec(b: int, t: int, d: int, max_frame: int) -> frames.FrameSpec:
    return frames.FrameSpec(spec_hash=SPEC_HASH, codec=frames.CodecId.DENSE, microbatch_size=b, seq_len=t, d_model=d,
                       bytes_per_token=4 * d, id_bytes=2, max_frame_bytes=max_frame)


SMALL = _spec(3, 7, 13, 64 * 1024)  # 1092-byte payload, 48-byte window
HUGE = _spec(2, 509, 1031, 8 * 1024 * 1024)  # 4,198,232-byte payload: spans yamux frames, Noise messages, reads
HASH_THREAD_BYTES = 1 << 20  # bodies this large are hashed in a worker thread here (HUGE ones are, SMALL ones not)


def _cfg(spec: frames.FrameSpec, credits: int) -> TransportConfig:
    return TransportConfig(max_frame_bytes=spec.max_frame_bytes, credits=credits, handshake_timeout_s=10,
                           ack_timeout_s=30, dial_timeout_s=10, hash_thread_bytes=HASH_THREAD_BYTES)


def _endpoint(host, stage: int, spec: frames.FrameSpec, credits: int, decoder=None) -> ActEndpoint:
    local = LocalInfo(spec_hash=SPEC_HASH, stage=stage, num_stages=2, address="")  # no address: receipts are off
    return ActEndpoint(host, local=local, frame_spec=spec, cfg=_cfg(spec, credits), decoder=decoder)


def _finite(fr: frames.Frame) -> np.ndarray:
    arr = np.frombuffer(fr.payload, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise NonFiniteError("payload holds NaN or Inf")
    return arr


def _frames(spec: frames.FrameSpec, n: int, seed: int) -> list[tuple[bytes, bytes]]:
    """n (window, payload) pairs of finite float32 payloads, all different."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        payload = rng.standard_normal(spec.payload_len // 4, dtype=np.float32).tobytes()
        window = rng.integers(0, 65535, spec.window_len // 2, dtype=np.uint16).tobytes()
        out.append((window, payload))
    return out


async def _pump(ch: ActChannel, inbound: ActChannel, sent: list[tuple[bytes, bytes]], step: int) -> None:
    """Send every frame on ch while inbound consumes them; check each arrives byte-exact and in order."""
    async def consume() -> None:
        for mb, (window, payload) in enumerate(sent):
            r = await inbound.recv_data(30)
            assert (r.frame.header.step, r.frame.header.microbatch) == (step, mb)
            assert r.frame.window == window and r.frame.payload == payload
            assert r.frame.header.digest == blake3(window + payload).digest()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(consume)
        for mb, (window, payload) in enumerate(sent):
            await ch.send_data(frames.Kind.ACTIVATION, step, mb, payload, window)
        await ch.wait_acked()


async def _pair(nursery, sender: ActEndpoint, receiver: ActEndpoint, addr: str) -> tuple[ActChannel, ActChannel]:
    ch = await sender.open(addr)
    nursery.start_soon(ch.run_reader)
    return ch, await receiver.incoming.receive()


def test_many_small_and_few_huge_frames_byte_exact_on_concurrent_streams() -> None:
    small_a, small_b = _frames(SMALL, 400, 1), _frames(SMALL, 400, 2)
    huge = _frames(HUGE, 3, 3)

    async def main() -> None:
        async with running_host(71) as (h0, _), running_host(72) as (h1, _), running_host(73) as (h2, _), \
                running_host(74) as (h3, _), trio.open_nursery() as nursery:
            # two channels on one connection (h0 -> h1), with a decoder (one hop: digest + decode)
            s_ep, r_ep = _endpoint(h0, 0, SMALL, 2, _finite), _endpoint(h1, 1, SMALL, 2, _finite)
            a = await _pair(nursery, s_ep, r_ep, full_addrs(h1)[0])
            b = await _pair(nursery, s_ep, r_ep, full_addrs(h1)[0])
            assert a[0].stream.muxed_conn is b[0].stream.muxed_conn
            # multi-MiB frames without a decoder (the digest alone goes off the loop) on another connection
            hs_ep, hr_ep = _endpoint(h2, 0, HUGE, 2), _endpoint(h3, 1, HUGE, 2)
            c = await _pair(nursery, hs_ep, hr_ep, full_addrs(h3)[0])
            assert HUGE.payload_len >= HASH_THREAD_BYTES > SMALL.payload_len
            with trio.fail_after(60):
                async with trio.open_nursery() as inner:
                    inner.start_soon(_pump, *a, small_a, 1)
                    inner.start_soon(_pump, *b, small_b, 2)
                    inner.start_soon(_pump, *c, huge, 3)
            assert a[1].stats.frames_in == b[1].stats.frames_in == 400 and c[1].stats.frames_in == 3
            assert c[1].stats.bytes_in == 3 * (frames.HEADER_SIZE + HUGE.window_len + HUGE.payload_len)
            nursery.cancel_scope.cancel()

    trio.run(main)


@pytest.mark.parametrize("credits", [1, 2, 3])
def test_credits_ride_along_acks_and_never_stall_the_sender(credits: int) -> None:
    sent = _frames(SMALL, 60, credits)
    back = _frames(SMALL, 20, 10 + credits)

    async def main() -> None:
        async with running_host(81) as (h0, _), running_host(82) as (h1, _), trio.open_nursery() as nursery:
            ch, inbound = await _pair(nursery, _endpoint(h0, 0, SMALL, credits), _endpoint(h1, 1, SMALL, credits),
                                      full_addrs(h1)[0])
            writes = 0
            stream_write = inbound.stream.write

            async def counting_write(data) -> None:
                nonlocal writes
                writes += 1
                await stream_write(data)

            inbound.stream.write = counting_write  # type: ignore[method-assign]
            with trio.fail_after(30):
                await _pump(ch, inbound, sent, 1)
            # one ACK per frame; with credit to spare, the credits of consumed frames travel in those
            # writes; with a single credit the peer is blocked after each frame, so it goes out at once
            if credits == 1:
                assert writes == 2 * len(sent)
            else:
                assert len(sent) <= writes < 2 * len(sent)
            # the peer holds exactly its credits again once everything was consumed and acknowledged
            with trio.fail_after(10):
                while ch._credit_out + inbound._credit_due != credits:
                    await trio.sleep(0.01)
            # gradients back on the same stream (credits due to the other side ride along data frames)
            with trio.fail_after(30):
                async with trio.open_nursery() as inner:
                    async def consume() -> None:
                        for mb, (_, payload) in enumerate(back):
                            r = await ch.recv_data(10)
                            assert (r.frame.header.microbatch, r.frame.payload) == (mb, payload)
                    inner.start_soon(consume)
                    for mb, (_, payload) in enumerate(back):
                        await inbound.send_data(frames.Kind.GRADIENT, 1, mb, payload)
                    await inbound.wait_acked()
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_corrupt_body_rejected_in_the_worker_hop_and_node_keeps_serving() -> None:
    window, payload = _frames(HUGE, 1, 5)[0]
    good = _frames(HUGE, 1, 6)

    async def main() -> None:
        async with running_host(91) as (h0, _), running_host(92) as (h1, _), trio.open_nursery() as nursery:
            recv_ep = _endpoint(h1, 1, HUGE, 2, _finite)
            send_ep = _endpoint(h0, 0, HUGE, 2)
            ch, inbound = await _pair(nursery, send_ep, recv_ep, full_addrs(h1)[0])
            raw = bytearray(frames.encode_frame(frames.Kind.ACTIVATION, SPEC_HASH, 0, 1, 0, payload=payload, window=window,
                                           codec=frames.CodecId.DENSE, dtype=frames.Dtype.FLOAT32, shape=HUGE.shape))
            raw[-7] ^= 0x01  # one flipped payload bit: the header still matches the spec, the digest does not
            await ch.write_raw(bytes(raw))
            with pytest.raises(ChecksumError, match="checksum mismatch in activation frame step 1 mb 0"):
                await inbound.recv_data(30)
            with trio.fail_after(30):
                while ch.failure is None:
                    await trio.sleep(0.01)
            assert isinstance(ch.failure, RemoteError) and "checksum mismatch" in str(ch.failure)
            assert recv_ep.scores.score(h0.get_id().pretty()) == -1
            # the node keeps serving: a fresh stream from the same peer delivers a good frame
            ch2, inbound2 = await _pair(nursery, send_ep, recv_ep, full_addrs(h1)[0])
            with trio.fail_after(30):
                await _pump(ch2, inbound2, good, 2)
            nursery.cancel_scope.cancel()

    trio.run(main)


class _ChunkStream:
    """A stand-in stream returning fixed chunks (bytes and bytearray), then EOF."""

    def __init__(self, chunks: list[bytes | bytearray]) -> None:
        self.chunks = list(chunks)

    async def read(self, n: int) -> bytes | bytearray:
        if not self.chunks:
            raise EOFError
        return self.chunks.pop(0)


def test_reader_is_exact_over_odd_mixed_chunks_and_reports_eof_bytes() -> None:
    rng = random.Random(5)
    data = rng.randbytes(300_000)
    cuts = sorted(rng.sample(range(1, len(data)), 40))
    chunks: list[bytes | bytearray] = []
    for i, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, len(data)], strict=True)):
        chunks.append(data[lo:hi] if i % 2 else bytearray(data[lo:hi]))
    sizes = [rng.choice([0, 1, 7, 64, 1000, 65519, 70000]) for _ in range(200)]

    async def main() -> None:
        reader = _Reader(_ChunkStream(chunks))  # type: ignore[arg-type]
        pos = 0
        for i in range(0, len(sizes), 3):
            group = [s for s in sizes[i : i + 3] if pos + s <= len(data)]
            parts = await reader.read_parts(group)
            for s, part in zip(group, parts, strict=True):
                assert type(part) is bytes and part == data[pos : pos + s]
                pos += s
        rest = len(data) - pos
        assert await reader.read_exactly(rest - 10) == data[pos : len(data) - 10]
        with pytest.raises(EOFError) as info:
            await reader.read_exactly(11)
        assert info.value.args == (10,)  # the bytes that did arrive

    trio.run(main)
