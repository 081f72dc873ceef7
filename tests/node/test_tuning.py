"""Transport tuning keeps the byte stream exact (buffered reads, batched Noise writes, big yamux frames)."""

from __future__ import annotations

import hashlib
import os

import pytest
import trio
from libp2p.custom_types import TProtocol

from node.host import full_addrs, parse_peer_addr
from node.tuning import apply_transport_tuning
from tests.node.conftest import running_host

pytestmark = [pytest.mark.network, pytest.mark.timeout(60)]
PROTO = TProtocol("/pmn/test-echo-hash/1.0.0")


def test_odd_sized_writes_arrive_exactly() -> None:
    sizes = [1, 2, 65519, 65520, 65521, 262144, 262145, 3 * 1024 * 1024 + 7, 17]
    blobs = [os.urandom(n) for n in sizes]
    want = hashlib.sha256(b"".join(blobs)).digest()

    async def main() -> None:
        apply_transport_tuning(256 * 1024, 1 << 20)
        async with running_host(41) as (h0, _), running_host(42) as (h1, _):
            got: list[bytes] = []
            done = trio.Event()

            async def handler(stream) -> None:
                h = hashlib.sha256()
                total = 0
                while total < sum(sizes):
                    chunk = await stream.read(1 << 16)
                    if not chunk:
                        break
                    h.update(chunk)
                    total += len(chunk)
                got.append(h.digest())
                await stream.write(b"ok")
                done.set()

            h1.set_stream_handler(PROTO, handler)
            info = parse_peer_addr(full_addrs(h1)[0])
            await h0.connect(info)
            stream = await h0.new_stream(info.peer_id, [PROTO])
            for b in blobs:
                await stream.write(b)
            with trio.fail_after(30):
                await done.wait()
                assert await stream.read(2) == b"ok"
            assert got == [want]

    trio.run(main)


def test_bad_tuning_values_rejected() -> None:
    with pytest.raises(ValueError, match="yamux_frame_bytes"):
        apply_transport_tuning(10, 0)
    with pytest.raises(ValueError, match="tcp_read_bytes"):
        apply_transport_tuning(65536, -1)
