"""node.net.transport pieces on their own: the ChaChaPoly cipher state against the `noise` library,
batched Noise sending/receiving over a socket pair against stock py-libp2p, quick locks, bad values,
and no py-libp2p class or module touched by building tuned hosts."""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Iterator

import pytest
import trio
from cryptography.exceptions import InvalidTag
from libp2p.io.exceptions import IncompleteReadError
from libp2p.io.trio import TrioTCPStream
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.security.noise import io as noise_io
from noise.connection import NoiseConnection
from noise.exceptions import NoiseInvalidMessage
from noise.state import CipherState

from node.config import TransportConfig
from node.net.transport.cipher import MAX_NONCE, ChaChaPolyState, NonceExhaustedError
from node.net.transport.locks import QuickLock
from node.net.transport.noise import (
    NOISE_PACKET,
    BatchedNoiseTransport,
    NoiseAuthError,
    WriteStalledError,
    _Receiver,
    _Sender,
)
from node.net.transport.yamux import TunedYamux

pytestmark = [pytest.mark.timeout(60)]


def _noise_pair() -> tuple[NoiseConnection, NoiseConnection]:
    """Two Noise states after an in-memory NN handshake (the transport phase py-libp2p uses)."""
    a = NoiseConnection.from_name(b"Noise_NN_25519_ChaChaPoly_SHA256")
    b = NoiseConnection.from_name(b"Noise_NN_25519_ChaChaPoly_SHA256")
    a.set_as_initiator()
    b.set_as_responder()
    a.start_handshake()
    b.start_handshake()
    b.read_message(a.write_message())
    a.read_message(b.write_message())
    assert a.handshake_finished and b.handshake_finished
    return a, b


_PAIRS: list[socket.socket] = []  # socketpairs made by the running test, closed after it (outside trio)


@pytest.fixture(autouse=True)
def _close_socketpairs() -> Iterator[None]:
    yield
    while _PAIRS:
        _PAIRS.pop().close()


def _raw_pair() -> tuple[RawConnection, RawConnection]:
    pair = socket.socketpair()
    _PAIRS.extend(pair)
    sa, sb = (trio.socket.from_stdlib_socket(s) for s in pair)
    return (RawConnection(TrioTCPStream(trio.SocketStream(sa)), True),
            RawConnection(TrioTCPStream(trio.SocketStream(sb)), False))


def _rw_pair() -> tuple[noise_io.NoiseTransportReadWriter, noise_io.NoiseTransportReadWriter]:
    a, b = _noise_pair()
    ra, rb = _raw_pair()
    return noise_io.NoiseTransportReadWriter(ra, a), noise_io.NoiseTransportReadWriter(rb, b)


def _state(cs: CipherState) -> ChaChaPolyState:
    return ChaChaPolyState(cs.k, cs.n)


def _tx(rw: noise_io.NoiseTransportReadWriter, write_stall_s: float = 30.0) -> _Sender:
    """The batched sender taking over rw's send cipher (rw must not encrypt again)."""
    return _Sender(rw.read_writer.read_write_closer, _state(rw.noise_state.noise_protocol.cipher_state_encrypt),
                   write_stall_s)


def _rx(rw: noise_io.NoiseTransportReadWriter, read_bytes: int) -> _Receiver:
    """The batched receiver taking over rw's receive cipher (rw must not decrypt again)."""
    return _Receiver(rw.read_writer.read_write_closer, _state(rw.noise_state.noise_protocol.cipher_state_decrypt),
                     read_bytes)


async def _read_stock(rx: noise_io.NoiseTransportReadWriter, total: int, got: bytearray) -> None:
    """Read with stock py-libp2p (one Noise message per call) until `total` plaintext bytes arrived."""
    while len(got) < total:
        msg = await rx.read_msg()
        assert len(msg) <= noise_io.MAX_PLAINTEXT_LENGTH
        got.extend(msg)


def test_batched_noise_writes_decode_with_stock_reader() -> None:
    """Big writes leave as <= 65535-byte Noise messages, in nonce order, readable by stock py-libp2p."""
    sizes = [1, 65519, 65520, 3 * 65519 + 7, 5 * 1024 * 1024 + 3]
    blobs = [os.urandom(n) for n in sizes]

    async def main() -> None:
        tx, rx = _rw_pair()
        sender = _tx(tx)
        got = bytearray()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_read_stock, rx, sum(sizes), got)
            for b in blobs:
                await sender.send((b,), len(b))
        assert bytes(got) == b"".join(blobs)

    trio.run(main)


def test_a_caller_timeout_never_cuts_a_sealed_write() -> None:
    """A write whose caller's deadline has already passed (a ping or dial timeout expiring at the wrong moment)
    still sends every sealed message: the peer decodes it and the next one. (Before the fix the cancel landed in
    the socket write after sealing, the nonce was spent, and every later message failed authentication.)
    A write that cannot reach the socket within write_stall_s closes the connection with WriteStalledError."""
    first, second = os.urandom(3 * 65519 + 11), os.urandom(100)

    async def main() -> None:
        tx, rx = _rw_pair()
        sender = _tx(tx)
        got = bytearray()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_read_stock, rx, len(first) + len(second), got)
            with trio.CancelScope(deadline=trio.current_time() - 1):  # already expired
                await sender.send((first,), len(first))
            await sender.send((second,), len(second))
        assert bytes(got) == first + second

        # nobody reads: the socket buffer fills and the write stalls past write_stall_s
        tx2, _rx2 = _rw_pair()
        stalled = _tx(tx2, write_stall_s=0.2)
        big = os.urandom(16 * 1024 * 1024)
        with pytest.raises(WriteStalledError, match="write_stall_s=0.2"):
            await stalled.send((big,), len(big))

    trio.run(main)


def test_multi_part_sends_gathered_across_part_boundaries() -> None:
    """Parts of any size (yamux headers between data chunks, tiny and empty parts) leave as their concatenation."""
    rng = random.Random(8)
    sizes = [1, 0, 3, 70000, 12, 65519, 12, 65507, 12, 2, 1, 1, 200000, 5, 65519 * 2 + 1]
    parts = [rng.randbytes(n) for n in sizes]
    want = b"".join(parts)

    async def main() -> None:
        tx, rx = _rw_pair()
        got = bytearray()
        async with trio.open_nursery() as nursery:
            async def reader() -> None:
                while len(got) < 2 * len(want):
                    msg = await rx.read_msg()  # stock reader
                    assert len(msg) <= noise_io.MAX_PLAINTEXT_LENGTH
                    got.extend(msg)

            nursery.start_soon(reader)
            sender = _tx(tx)
            await sender.send(list(parts), len(want))
            await sender.send([memoryview(p) for p in parts], len(want))
        assert bytes(got) == want + want

    trio.run(main)


def test_batched_reader_odd_boundaries_and_stock_writer() -> None:
    """Stock-written messages arrive byte-exact through the tuned reader, read in odd sizes."""
    rng = random.Random(5)
    data = rng.randbytes(2 * 1024 * 1024 + 11)
    reads = [1, 11, 12, 65519, 65520, 7, 300000, 1 << 20]

    async def main() -> None:
        tx, rx = _rw_pair()
        receiver = _rx(rx, 4096 * 4)
        out = bytearray()
        async with trio.open_nursery() as nursery:
            async def writer() -> None:
                pos = 0
                while pos < len(data):  # stock write_msg, one message per call of random size
                    step = rng.randint(1, 65519)
                    await tx.write_msg(data[pos : pos + step])
                    pos += step

            nursery.start_soon(writer)
            i = 0
            while len(out) < len(data):
                want = min(reads[i % len(reads)], len(data) - len(out))
                chunk = await receiver.read(want)
                assert len(chunk) == want
                out += chunk
                i += 1
        assert bytes(out) == data

    trio.run(main)


def test_tampered_noise_message_fails_and_stays_failed() -> None:
    async def main() -> None:
        a, b = _noise_pair()
        ra, rb = _raw_pair()
        rx = noise_io.NoiseTransportReadWriter(rb, b)
        receiver = _rx(rx, 1 << 16)
        good = a.encrypt(b"x" * 100)
        bad = bytearray(a.encrypt(b"y" * 100))
        bad[10] ^= 1
        await ra.write(len(good).to_bytes(2, "big") + good + len(bad).to_bytes(2, "big") + bytes(bad))
        assert await receiver.read(100) == b"x" * 100
        with pytest.raises(NoiseAuthError, match="failed authentication"):
            await receiver.read(1)
        with pytest.raises(NoiseInvalidMessage):  # same base type stock raises; every later read fails too
            await receiver.read(1)

    trio.run(main)


def test_eof_inside_a_message_is_an_incomplete_read() -> None:
    async def main() -> None:
        a, b = _noise_pair()
        ra, rb = _raw_pair()
        receiver = _rx(noise_io.NoiseTransportReadWriter(rb, b), 1 << 16)
        msg = a.encrypt(b"z" * 50)
        await ra.write(len(msg).to_bytes(2, "big") + msg + b"\x00\x40" + b"\x01" * 9)
        await ra.close()
        assert await receiver.read(50) == b"z" * 50
        with pytest.raises(IncompleteReadError) as ei:
            await receiver.read(12)
        assert not ei.value.is_clean_close  # 11 bytes of a message were pending

    trio.run(main)


class _BytesRaw:
    """A raw connection that always has `data` ready: every read fills the room it is given."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    async def read(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += len(out)
        return out


def test_read_buffer_grows_under_bulk_traffic_and_stays_exact() -> None:
    a, b = _noise_pair()
    plain = random.Random(4).randbytes(3 * 1024 * 1024 + 17)
    wire = b"".join(
        len(c).to_bytes(2, "big") + c
        for c in (a.encrypt(plain[i : i + 65519]) for i in range(0, len(plain), 65519)))
    raw = RawConnection(_BytesRaw(wire), False)  # type: ignore[arg-type]  # any object with read()

    async def main() -> None:
        receiver = _Receiver(raw, _state(b.noise_protocol.cipher_state_decrypt), 2 * 1024 * 1024)
        first_cap = receiver.cap
        out = bytearray()
        while len(out) < len(plain):
            out += await receiver.read(min(100003, len(plain) - len(out)))
        assert bytes(out) == plain
        assert first_cap == 4 * NOISE_PACKET  # small until bulk traffic shows up
        assert receiver.cap == receiver.max_cap == 2 * 1024 * 1024
        with pytest.raises(IncompleteReadError):
            await receiver.read(1)

    trio.run(main)


def test_quick_lock_is_exclusive_and_waits_when_held() -> None:
    async def main() -> None:
        lock = QuickLock(trio.Lock())
        order: list[str] = []
        async with trio.open_nursery() as nursery:
            async def holder() -> None:
                async with lock:
                    order.append("a-in")
                    await trio.sleep(0.05)
                    order.append("a-out")

            async def waiter() -> None:
                await trio.sleep(0.01)
                assert lock.locked()  # delegated to the wrapped trio.Lock
                async with lock:
                    order.append("b-in")

            nursery.start_soon(holder)
            nursery.start_soon(waiter)
        assert order == ["a-in", "a-out", "b-in"] and not lock.locked()

    trio.run(main)


def _cipher_pair() -> tuple[CipherState, ChaChaPolyState, CipherState, ChaChaPolyState]:
    """The `noise` library's send and receive cipher states of a session and ours, from the same keys."""
    a, b = _noise_pair()
    theirs_tx, theirs_rx = a.noise_protocol.cipher_state_encrypt, b.noise_protocol.cipher_state_decrypt
    return theirs_tx, _state(theirs_tx), theirs_rx, _state(theirs_rx)


def test_cipher_state_matches_the_noise_library() -> None:
    """Same ciphertexts as noise's CipherState, message after message, and each opens the other's."""
    theirs_tx, ours_tx, theirs_rx, ours_rx = _cipher_pair()
    rng = random.Random(12)
    for n in (0, 1, 16, 65519, 1000, 3):
        plain = rng.randbytes(n)
        want = theirs_tx.encrypt_with_ad(None, plain)
        out = bytearray(n + 16)
        ours_tx.seal_into(plain, memoryview(out))
        assert bytes(out) == want
        assert ours_rx.open(want) == plain  # our receive state opens the library's messages
    theirs_tx2, ours_tx2, theirs_rx2, _ = _cipher_pair()
    for plain in (b"", b"abc", rng.randbytes(70000)):
        assert ours_tx2.seal(plain) == theirs_tx2.encrypt_with_ad(None, plain)
    assert ours_tx.n == theirs_tx.n == 6 and ours_rx.n == 6


def test_cipher_state_forged_message_leaves_nonce_and_max_nonce_stops() -> None:
    theirs_tx, _, _, ours_rx = _cipher_pair()
    good = theirs_tx.encrypt_with_ad(None, b"hello")
    forged = bytearray(good)
    forged[0] ^= 1
    with pytest.raises(InvalidTag):
        ours_rx.open(bytes(forged))
    assert ours_rx.n == 0  # not advanced: the genuine message still opens
    assert ours_rx.open(good) == b"hello"
    key = bytes(range(32))
    last = ChaChaPolyState(key, MAX_NONCE - 1)
    reference = CipherState(_noise_pair()[0].noise_protocol)
    reference.initialize_key(key)
    reference.set_nonce(MAX_NONCE - 1)
    assert last.seal(b"x") == reference.encrypt_with_ad(None, b"x")  # the last usable nonce is usable
    with pytest.raises(NonceExhaustedError):
        last.seal(b"y")
    with pytest.raises(NonceExhaustedError):
        last.seal_into(b"y", memoryview(bytearray(17)))
    with pytest.raises(ValueError):
        ChaChaPolyState(b"short")
    with pytest.raises(ValueError):
        ChaChaPolyState(key, MAX_NONCE + 1)


def test_bad_tuning_values_rejected() -> None:
    with pytest.raises(ValueError, match="frame_bytes"):
        TunedYamux.configured(10)
    with pytest.raises(ValueError, match="frame_bytes"):
        TunedYamux.configured(32 * 1024 * 1024)
    with pytest.raises(ValueError, match="window_wait_s"):
        TunedYamux.configured(65536, window_wait_s=0)
    with pytest.raises(ValueError, match="tcp_read_bytes"):
        TransportConfig(tcp_read_bytes=-1).validate()
    with pytest.raises(ValueError, match="yamux_window_wait_s"):
        TransportConfig(yamux_window_wait_s=0).validate()
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.crypto.x25519 import create_new_key_pair as x25519
    with pytest.raises(ValueError, match="read_bytes"):
        BatchedNoiseTransport(create_new_key_pair(b"\x01" * 32), x25519().private_key, 0)


def test_tuned_hosts_change_no_py_libp2p_class_or_module() -> None:
    """Building and running tuned hosts leaves every py-libp2p class and module it could touch as it was."""
    import libp2p.io.utils
    import libp2p.network.stream.net_stream
    import libp2p.security.noise.io
    import libp2p.security.secure_session
    import libp2p.stream_muxer.muxer_multistream
    import libp2p.stream_muxer.yamux.yamux as yamux_mod
    from libp2p.network.stream.net_stream import NetStream
    from libp2p.security.noise.transport import Transport
    from libp2p.stream_muxer.muxer_multistream import MuxerMultistream

    from node.net.host import full_addrs, parse_peer_addr
    from tests.node.conftest import running_host

    watched = [yamux_mod, yamux_mod.Yamux, yamux_mod.YamuxStream, libp2p.network.stream.net_stream, NetStream,
               libp2p.security.secure_session, libp2p.security.secure_session.SecureSession,
               libp2p.security.noise.io, libp2p.security.noise.io.NoiseTransportReadWriter, Transport,
               libp2p.stream_muxer.muxer_multistream, MuxerMultistream, libp2p.io.utils]
    before = [dict(vars(obj)) for obj in watched]

    async def main() -> None:
        async with running_host(81) as (h0, _), running_host(82) as (h1, _):
            h1.set_stream_handler("/pmn/test-echo/1.0.0", _echo)
            info = parse_peer_addr(full_addrs(h1)[0])
            await h0.connect(info)
            stream = await h0.new_stream(info.peer_id, ["/pmn/test-echo/1.0.0"])
            await stream.write(b"ping" * 100000)
            got = bytearray()
            while len(got) < 400000:
                got += await stream.read(400000 - len(got))
            assert got == b"ping" * 100000
            await stream.close()

    trio.run(main)
    after = [dict(vars(obj)) for obj in watched]
    for obj, was, now in zip(watched, before, after, strict=True):
        assert was == now, f"{obj!r} changed"


async def _echo(stream) -> None:
    got = bytearray()
    while len(got) < 400000:
        got += await stream.read(400000 - len(got))
    await stream.write(bytes(got))
