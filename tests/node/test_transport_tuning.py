"""The tuned transport (node/net/transport) over real libp2p hosts on 127.0.0.1 (TCP + Noise + yamux).

Byte-exact delivery (odd sizes, many small and a few huge writes, concurrent streams), stock and
tuned hosts side by side in one process, interop with a stock py-libp2p peer in another process,
and rejection of oversized or forged frames.
"""

from __future__ import annotations

import functools
import hashlib
import os
import random
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import trio
from libp2p.custom_types import TProtocol
from libp2p.network.stream.exceptions import StreamReset
from libp2p.peer.peerinfo import PeerInfo
from libp2p.security.secure_session import SecureSession
from libp2p.stream_muxer.exceptions import MuxedStreamError
from libp2p.stream_muxer.yamux import yamux
from multiaddr import Multiaddr

from node.config import TransportConfig
from node.errors import RemoteError
from node.net.host import full_addrs, parse_peer_addr
from node.net.transport.locks import QuickLock
from node.net.transport.noise import BatchedNoiseSession
from node.net.transport.yamux import TunedYamux, TunedYamuxStream
from node.wire import frames
from node.wire.channel import ActEndpoint, LocalInfo
from tests.node.conftest import FSPEC, SPEC_HASH, np_decoder, running_host, tcfg
from tests.waiting import until

pytestmark = [pytest.mark.network, pytest.mark.timeout(90)]
HASH_PROTO = TProtocol("/pmn/test-hash/1.0.0")


async def _hash_handler(stream) -> None:
    """Read to EOF, answer length + sha256 of everything read."""
    h = hashlib.sha256()
    total = 0
    while True:
        try:
            chunk = await stream.read(1 << 20)
        except Exception:  # EOF surfaces as an exception on yamux streams
            break
        if not chunk:
            break
        h.update(chunk)
        total += len(chunk)
    await stream.write(struct.pack("!Q", total) + h.digest())
    await stream.close()


async def _read_n(stream, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = await stream.read(n - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


async def _send_and_check(host, info, blobs: list[bytes]) -> None:
    stream = await host.new_stream(info.peer_id, [HASH_PROTO])
    for b in blobs:
        await stream.write(b)
    await stream.close()
    answer = await _read_n(stream, 40)
    assert struct.unpack("!Q", answer[:8])[0] == sum(len(b) for b in blobs)
    assert answer[8:] == hashlib.sha256(b"".join(blobs)).digest()


def test_byte_exact_odd_small_huge_concurrent() -> None:
    rng = random.Random(11)
    odd = [rng.randbytes(n) for n in (1, 2, 11, 12, 13, 65519, 65520, 65521, 262131, 262144, 262145, 1048589)]
    small = [rng.randbytes(rng.randint(1, 300)) for _ in range(1500)]
    huge = [os.urandom(n) for n in (5 * 1024 * 1024 + 3, 17 * 1024 * 1024 + 1)]  # the second exceeds the 16 MiB window

    async def main() -> None:
        async with running_host(61) as (h0, _), running_host(62) as (h1, _):
            h1.set_stream_handler(HASH_PROTO, _hash_handler)
            info = parse_peer_addr(full_addrs(h1)[0])
            await h0.connect(info)
            probe = await h0.new_stream(info.peer_id, [HASH_PROTO])  # the tuned objects carry quick locks
            assert isinstance(probe.muxed_stream, TunedYamuxStream)
            assert isinstance(probe.muxed_stream.conn.streams_lock, QuickLock)
            await probe.close()
            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:  # three streams share one connection at once
                    for blobs in (odd, small, huge):
                        nursery.start_soon(_send_and_check, h0, info, blobs)

    trio.run(main)


STOCK_PEER = textwrap.dedent('''
    import hashlib, random, struct, sys
    import multiaddr, trio
    from libp2p import new_host
    from libp2p.crypto.secp256k1 import create_new_key_pair

    BACK = random.Random(7).randbytes(3 * 1024 * 1024 + 5)

    async def handler(stream):
        h, total = hashlib.sha256(), 0
        while True:
            try:
                chunk = await stream.read(1 << 20)
            except Exception:
                break
            if not chunk:
                break
            h.update(chunk)
            total += len(chunk)
        await stream.write(struct.pack("!Q", total) + h.digest())
        for i in range(0, len(BACK), 100003):
            await stream.write(BACK[i:i + 100003])
        await stream.close()

    async def main():
        host = new_host(key_pair=create_new_key_pair(b"\\x07" * 32))
        async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            host.set_stream_handler("/pmn/test-hash/1.0.0", handler)
            print(f"{host.get_addrs()[0]}/p2p/{host.get_id().pretty()}", flush=True)
            await trio.to_thread.run_sync(sys.stdin.read)  # until the test closes stdin

    trio.run(main)
''')


def test_interop_with_stock_py_libp2p_process() -> None:
    """A stock py-libp2p 0.8.1 peer (no tuning, own process) reads our writes and we read its writes."""
    rng = random.Random(3)
    blobs = [rng.randbytes(n) for n in (7, 65521, 2 * 1024 * 1024 + 9, 300, 1048577)]
    back = random.Random(7).randbytes(3 * 1024 * 1024 + 5)
    proc = subprocess.Popen([sys.executable, "-c", STOCK_PEER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": ""})
    try:
        assert proc.stdout is not None
        addr = proc.stdout.readline().strip()
        assert "/p2p/" in addr, f"stock peer did not start: {addr!r}"

        async def main() -> None:
            async with running_host(63) as (h0, _):
                info = parse_peer_addr(addr)
                with trio.fail_after(60):
                    await h0.connect(info)
                    stream = await h0.new_stream(info.peer_id, [HASH_PROTO])
                    for b in blobs:
                        await stream.write(b)
                    await stream.close()
                    answer = await _read_n(stream, 40 + len(back))
                assert struct.unpack("!Q", answer[:8])[0] == sum(len(b) for b in blobs)
                assert answer[8:40] == hashlib.sha256(b"".join(blobs)).digest()
                assert answer[40:] == back

        trio.run(main)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        assert proc.stdout is not None
        proc.stdout.close()


def _accepting_host_handler(accepted: list):
    async def handler(stream) -> None:
        accepted.append(stream)
        await trio.sleep_forever()
    return handler


def test_oversized_yamux_frame_closes_connection() -> None:
    """A DATA frame declaring more than the 16 MiB window is refused before its body is read."""
    async def main() -> None:
        async with running_host(64) as (h0, _), running_host(65) as (h1, _):
            accepted: list = []
            h1.set_stream_handler(HASH_PROTO, _accepting_host_handler(accepted))
            info = parse_peer_addr(full_addrs(h1)[0])
            await h0.connect(info)
            stream = await h0.new_stream(info.peer_id, [HASH_PROTO])
            await stream.write(b"hello")
            await until(lambda: accepted, 10, "stream accepted")
            assert await accepted[0].read(5) == b"hello"
            receiver_mux = accepted[0].muxed_stream.conn
            sender_mux = stream.muxed_stream.conn
            header = struct.pack(yamux.YAMUX_HEADER_FORMAT, 0, yamux.TYPE_DATA, 0,
                                 stream.muxed_stream.stream_id, yamux.MAX_WINDOW_SIZE + 1)
            await sender_mux._write_frame(header)
            await until(receiver_mux.event_shutting_down.is_set, 10, "receiver closed the connection")

    trio.run(main)


def test_forged_noise_message_closes_connection() -> None:
    """Bytes that fail Noise authentication close the connection (stock would read on, desynchronised)."""
    async def main() -> None:
        async with running_host(66) as (h0, _), running_host(67) as (h1, _):
            accepted: list = []
            h1.set_stream_handler(HASH_PROTO, _accepting_host_handler(accepted))
            info = parse_peer_addr(full_addrs(h1)[0])
            await h0.connect(info)
            stream = await h0.new_stream(info.peer_id, [HASH_PROTO])
            await stream.write(b"x" * 70000)
            await until(lambda: accepted, 10, "stream accepted")
            assert await _read_n(accepted[0], 70000) == b"x" * 70000
            receiver_mux = accepted[0].muxed_stream.conn
            raw = stream.muxed_stream.conn.secured_conn.conn.read_writer.read_write_closer
            await raw.write(b"\x00\x40" + os.urandom(64))  # a well-framed Noise message with a bad tag
            await until(receiver_mux.event_shutting_down.is_set, 10, "receiver closed the connection")

    trio.run(main)


def test_writer_waits_for_window_update_then_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer beyond the peer's window waits for its update (no polling) and keeps the stock timeout."""
    cfg = TransportConfig(yamux_frame_bytes=64 * 1024, yamux_window_wait_s=0.5)

    async def main() -> None:
        async with running_host(68, cfg) as (h0, _), running_host(69, cfg) as (h1, _):
            accepted: list = []
            h1.set_stream_handler(HASH_PROTO, _accepting_host_handler(accepted))
            info = parse_peer_addr(full_addrs(h1)[0])
            await h0.connect(info)
            # 1) the reader drains late: the write resumes on the window update and the bytes are exact
            stream = await h0.new_stream(info.peer_id, [HASH_PROTO])
            blob = os.urandom(stream.muxed_stream.send_window + 300 * 1024)  # more than the peer lets us send
            got = bytearray()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream.write, blob)
                await until(lambda: accepted, 10, "stream accepted")
                await until(lambda: stream.muxed_stream.send_window == 0, 10, "sender used its window")
                while len(got) < len(blob):
                    got += await accepted[0].read(1 << 20)
            assert bytes(got) == blob
            # 2) nobody reads: the write gives up after WINDOW_WAIT_S with the stock error (stream reset)
            stream2 = await h0.new_stream(info.peer_id, [HASH_PROTO])
            with pytest.raises(StreamReset) as ei:
                await stream2.write(bytes(stream2.muxed_stream.send_window + 300 * 1024))
            assert isinstance(ei.value.__cause__, MuxedStreamError)
            assert "Timed out waiting for window update after 0.5 seconds" in str(ei.value.__cause__)
            # 3) the reader resets the stream: the blocked writer is released by the reset, not the timeout
            stream3 = await h0.new_stream(info.peer_id, [HASH_PROTO])
            monkeypatch.setattr(type(stream3.muxed_stream.conn), "window_wait_s", 60.0)  # this host's own class
            await until(lambda: len(accepted) == 3, 10, "third stream accepted")
            async with trio.open_nursery() as nursery:
                async def reset_when_blocked() -> None:
                    await until(lambda: stream3.muxed_stream.send_window == 0, 10, "writer blocked")
                    await accepted[2].reset()

                nursery.start_soon(reset_when_blocked)
                with trio.fail_after(10), pytest.raises(StreamReset) as ei:
                    await stream3.write(bytes(stream3.muxed_stream.send_window + 300 * 1024))
            assert "Timed out" not in str(ei.value.__cause__)

    trio.run(main)


def test_oversized_activation_frame_rejected_after_big_frames() -> None:
    """The channel's header check still rejects a too-large frame over the tuned transport."""
    payload = np.ones(FSPEC.payload_len // 4, dtype=np.float32).tobytes()
    window = b"\x00" * FSPEC.window_len
    too_big = frames.encode_header(frames.FrameHeader(
        kind=frames.Kind.ACTIVATION, spec_hash=SPEC_HASH, stage=0, step=1, microbatch=2, codec=frames.CodecId.DENSE,
        dtype=frames.Dtype.FLOAT32, shape=FSPEC.shape, window_len=FSPEC.window_len, payload_len=10 * FSPEC.max_frame_bytes))

    async def main() -> None:
        async with running_host(70) as (h0, _), running_host(71) as (h1, _), trio.open_nursery() as nursery:
            recv_ep = ActEndpoint(h1, local=LocalInfo(SPEC_HASH, 1, 2, ""), frame_spec=FSPEC, cfg=tcfg(),
                                  decoder=np_decoder)
            send_ep = ActEndpoint(h0, local=LocalInfo(SPEC_HASH, 0, 2, ""), frame_spec=FSPEC, cfg=tcfg())
            ch = await send_ep.open(full_addrs(h1)[0])
            nursery.start_soon(ch.run_reader)
            inbound = await recv_ep.incoming.receive()
            for mb in range(2):
                await ch.send_data(frames.Kind.ACTIVATION, 1, mb, payload, window)
                assert (await inbound.recv_data(5)).frame.payload == payload
            await ch.write_raw(too_big)
            with pytest.raises(Exception, match="maximum is"):
                await inbound.recv_data(5)
            await until(lambda: ch.failure is not None, 10, "sender told")
            assert isinstance(ch.failure, RemoteError) and "maximum is" in str(ch.failure)
            nursery.cancel_scope.cancel()

    trio.run(main)


def test_window_updates_batched_and_data_exact() -> None:
    """The receiver grants window in half-window steps (not per read) and the bytes still arrive exact."""
    rng = random.Random(9)
    blobs = [rng.randbytes(rng.randint(1, 40000)) for _ in range(400)]  # ~8 MiB in small writes
    total = sum(len(b) for b in blobs)

    async def main() -> None:
        async with running_host(72) as (h0, _), running_host(73) as (h1, _):
            accepted: list = []
            h1.set_stream_handler(HASH_PROTO, _accepting_host_handler(accepted))
            info = parse_peer_addr(full_addrs(h1)[0])
            await h0.connect(info)
            stream = await h0.new_stream(info.peer_id, [HASH_PROTO])
            await stream.write(blobs[0])
            await until(lambda: accepted, 10, "stream accepted")
            muxed = accepted[0].muxed_stream
            increments: list[int] = []
            send_update = muxed.send_window_update

            async def counting_update(increment: int, skip_lock: bool = False) -> None:
                increments.append(increment)
                await send_update(increment, skip_lock)

            muxed.send_window_update = counting_update
            got = bytearray()
            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    async def write_rest() -> None:
                        for b in blobs[1:]:
                            await stream.write(b)

                    nursery.start_soon(write_rest)
                    reads = 0
                    while len(got) < total:
                        got += await accepted[0].read(50000)
                        reads += 1
            assert bytes(got) == b"".join(blobs)
            half = yamux.DEFAULT_WINDOW_SIZE // 2  # the target only grows from the 256 KiB default
            assert increments and min(increments) >= half
            assert len(increments) <= total // half + 1 < reads

    trio.run(main)


STOCK = TransportConfig(tcp_read_bytes=0)  # py-libp2p's own Noise + yamux


@pytest.mark.parametrize(("cfg0", "cfg1", "tuned"), [
    (STOCK, STOCK, (False, False)),
    (TransportConfig(), TransportConfig(), (True, True)),
    (TransportConfig(), STOCK, (True, False)),
    (STOCK, TransportConfig(yamux_frame_bytes=1024 * 1024), (False, True)),
], ids=["stock-stock", "tuned-tuned", "tuned-stock", "stock-tuned"])
def test_stock_and_tuned_hosts_in_one_process_byte_exact(cfg0, cfg1, tuned) -> None:
    """Stock and tuned hosts share this process: each keeps its own transport, every pairing is byte-exact."""
    rng = random.Random(17)
    blobs = [rng.randbytes(n) for n in (1, 13, 65519, 65521, 262145, 3 * 1024 * 1024 + 7)]
    blobs += [rng.randbytes(rng.randint(1, 500)) for _ in range(200)]

    async def main() -> None:
        async with running_host(74, cfg0) as (h0, _), running_host(75, cfg1) as (h1, _):
            h1.set_stream_handler(HASH_PROTO, _hash_handler)
            info = parse_peer_addr(full_addrs(h1)[0])
            with trio.fail_after(60):
                await h0.connect(info)
                await _send_and_check(h0, info, blobs)
                probe = await h0.new_stream(info.peer_id, [HASH_PROTO])
                for host, want in zip((h0, h1), tuned, strict=True):
                    conn = host.get_network().connections[info.peer_id if host is h0 else h0.get_id()][0]
                    muxed = conn.muxed_conn
                    assert isinstance(muxed, TunedYamux) is want
                    assert isinstance(muxed.secured_conn, BatchedNoiseSession) is want
                    assert isinstance(muxed.secured_conn, SecureSession)  # Noise either way
                assert isinstance(probe.muxed_stream, TunedYamuxStream) is tuned[0]
                await probe.close()

    trio.run(main)


@pytest.mark.parametrize("retries", [0, 2])
def test_a_failed_dial_is_retried_exactly_dial_retries_times(retries: int) -> None:
    """transport.dial_retries sets this host's libp2p retries (py-libp2p's default 3 costs 0.7 s of backoff per dial
    to a dead peer): a listener that accepts and drops every connection sees 1 + dial_retries of them."""
    accepted = 0

    async def main() -> None:
        nonlocal accepted

        async def drop(stream: trio.SocketStream) -> None:
            nonlocal accepted
            accepted += 1
            await stream.aclose()

        async with trio.open_nursery() as n:
            listeners = await n.start(functools.partial(trio.serve_tcp, drop, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            cfg = TransportConfig(dial_retries=retries, dial_retry_delay_s=0.01)
            async with running_host(171, cfg) as (h0, _), running_host(172) as (h1, _):
                peer = parse_peer_addr(full_addrs(h1)[0]).peer_id  # a real peer id, at the dropping listener
            async with running_host(173, cfg) as (h2, _):
                with trio.fail_after(30), pytest.raises(Exception, match="unable to connect|failed"):
                    await h2.connect(PeerInfo(peer, [Multiaddr(f"/ip4/127.0.0.1/tcp/{port}")]))
            n.cancel_scope.cancel()

    trio.run(main)
    assert accepted == 1 + retries


def test_negative_dial_retries_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="transport.dial_retries"):
        TransportConfig(dial_retries=-1).validate()
