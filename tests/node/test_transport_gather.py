"""Gathered writes and buffer-taking reads of the tuned transport (node/net/transport) over real hosts.

write_gather sends parts back to back without joining them; read_some hands a yamux stream's
buffer over instead of copying it. Both must keep the byte stream exact (odd part sizes across
yamux frame and Noise message boundaries, several streams at once) and the window flowing.
"""

from __future__ import annotations

import hashlib
import random
import struct

import pytest
import trio
from libp2p.custom_types import TProtocol

from node.config import TransportConfig
from node.net.host import full_addrs, parse_peer_addr
from node.net.transport import io as tio
from node.net.transport.yamux import _slices
from tests.node.conftest import running_host

pytestmark = [pytest.mark.network, pytest.mark.timeout(90)]
PROTO = TProtocol("/pmn/test-gather/1.0.0")


async def _read_some_handler(stream) -> None:
    """Read to EOF with read_some (answer: length + sha256 + whether any buffer was handed over)."""
    h = hashlib.sha256()
    total = 0
    muxed = stream.muxed_stream
    with trio.fail_after(10):  # let bytes queue up in the yamux buffer: the first read then takes it over
        while not muxed.conn.stream_buffers.get(muxed.stream_id):
            await trio.sleep(0.001)
    took_buffer = False
    while True:
        try:
            chunk = await tio.read_some(stream, 1 << 22)
        except Exception:  # EOF surfaces as an exception on yamux streams
            break
        if not chunk:
            break
        took_buffer |= isinstance(chunk, bytearray)
        h.update(chunk)
        total += len(chunk)
    await stream.write(struct.pack("!Q?", total, took_buffer) + h.digest())
    await stream.close()


async def _send_parts(host, info, writes: list[list[bytes]], tuned_reader: bool = True) -> None:
    stream = await host.new_stream(info.peer_id, [PROTO])
    for parts in writes:
        await tio.write_gather(stream, parts)
    await stream.close()
    answer = b""
    while len(answer) < 41:
        answer += await stream.read(41 - len(answer))
    total, took_buffer = struct.unpack("!Q?", answer[:9])
    joined = b"".join(b"".join(p) for p in writes)
    assert total == len(joined)
    assert answer[9:] == hashlib.sha256(joined).digest()
    assert took_buffer is tuned_reader


def test_gathered_writes_and_taken_buffers_are_byte_exact_on_concurrent_streams() -> None:
    rng = random.Random(3)
    sizes = (0, 1, 2, 11, 12, 13, 65507, 65519, 65520, 65531, 262131, 262144, 262145, 1048589)
    odd = [[rng.randbytes(rng.choice(sizes)) for _ in range(rng.randint(1, 5))] for _ in range(40)]
    small = [[rng.randbytes(rng.randint(0, 40)) for _ in range(3)] for _ in range(800)]
    huge = [[rng.randbytes(200), rng.randbytes(5 * 1024 * 1024 + 3), b"", rng.randbytes(7)]]

    async def main() -> None:
        async with running_host(101) as (h0, _), running_host(102) as (h1, _):
            h1.set_stream_handler(PROTO, _read_some_handler)
            info = parse_peer_addr(full_addrs(h1)[0])
            await h0.connect(info)
            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:  # three streams share one connection at once
                    for writes in (odd, small, huge):
                        nursery.start_soon(_send_parts, h0, info, writes)

    trio.run(main)


@pytest.mark.parametrize(("cfg0", "cfg1"), [(TransportConfig(tcp_read_bytes=0), TransportConfig()),
                                          (TransportConfig(), TransportConfig(tcp_read_bytes=0))],
                         ids=["stock-writer", "stock-reader"])
def test_gather_and_read_some_fall_back_on_stock_streams(cfg0, cfg1) -> None:
    """On a stock host's stream write_gather joins and read_some reads the stock way: same bytes."""
    rng = random.Random(5)
    writes = [[rng.randbytes(rng.randint(0, 70000)) for _ in range(3)] for _ in range(30)]

    async def main() -> None:
        async with running_host(103, cfg0) as (h0, _), running_host(104, cfg1) as (h1, _):
            h1.set_stream_handler(PROTO, _read_some_handler)
            info = parse_peer_addr(full_addrs(h1)[0])
            await h0.connect(info)
            with trio.fail_after(60):
                await _send_parts(h0, info, writes, tuned_reader=cfg1.tcp_read_bytes > 0)

    trio.run(main)


def test_write_gather_joins_for_streams_it_cannot_gather_on() -> None:
    class Plain:
        def __init__(self) -> None:
            self.got: list[object] = []

        async def write(self, data: object) -> None:
            self.got.append(data)

    async def main() -> None:
        s = Plain()
        # a plain writer stands in for a stream the muxer cannot gather on: not an INetStream, on purpose
        await tio.write_gather(s, [b"ab", memoryview(b"cd"), b"", bytearray(b"e")])  # type: ignore[arg-type]
        assert s.got == [b"abcde"] and type(s.got[0]) is bytes

    trio.run(main)


def test_slices_cover_any_range_of_the_concatenation() -> None:
    rng = random.Random(9)
    for _ in range(300):
        parts = [rng.randbytes(rng.randint(1, 50)) for _ in range(rng.randint(1, 6))]
        joined = b"".join(parts)
        start = rng.randrange(len(joined))
        stop = rng.randint(start + 1, len(joined))
        out: list[bytes | bytearray | memoryview] = []
        _slices([memoryview(p) for p in parts], start, stop, out)
        assert b"".join(out) == joined[start:stop]
        assert all(len(piece) for piece in out)
