"""node.net.tuning pieces on their own: Noise framing over a socket pair, version guard, bad values."""

from __future__ import annotations

import logging
import os
import random

import pytest
import trio
from libp2p.io.exceptions import IncompleteReadError
from libp2p.io.trio import TrioTCPStream
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.security.noise import io as noise_io
from libp2p.stream_muxer.yamux import yamux
from noise.backends.default.ciphers import ChaCha20Cipher
from noise.connection import NoiseConnection
from noise.exceptions import NoiseInvalidMessage

from node.net import tuning
from node.net.tuning import NoiseAuthError, apply_transport_tuning

pytestmark = [pytest.mark.timeout(60)]
STOCK_READ = tuning._ORIG["session_read"]


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


def _raw_pair() -> tuple[RawConnection, RawConnection]:
    sa, sb = trio.socket.socketpair()
    return (RawConnection(TrioTCPStream(trio.SocketStream(sa)), True),
            RawConnection(TrioTCPStream(trio.SocketStream(sb)), False))


def _rw_pair() -> tuple[noise_io.NoiseTransportReadWriter, noise_io.NoiseTransportReadWriter]:
    a, b = _noise_pair()
    ra, rb = _raw_pair()
    return noise_io.NoiseTransportReadWriter(ra, a), noise_io.NoiseTransportReadWriter(rb, b)


def test_tuned_noise_writes_decode_with_stock_reader() -> None:
    """Big writes leave as <= 65535-byte Noise messages, in nonce order, readable by stock py-libp2p."""
    sizes = [1, 65519, 65520, 3 * 65519 + 7, 5 * 1024 * 1024 + 3]
    blobs = [os.urandom(n) for n in sizes]

    async def main() -> None:
        apply_transport_tuning(256 * 1024, 1 << 20)
        tx, rx = _rw_pair()
        got = bytearray()
        async with trio.open_nursery() as nursery:
            async def reader() -> None:
                while len(got) < sum(sizes):
                    got.extend(await rx.read_msg())  # stock: one Noise message per call

            nursery.start_soon(reader)
            for b in blobs:
                await tx.write_msg(b)
        assert bytes(got) == b"".join(blobs)

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
            sender = tuning._sender(tx)
            await sender.send(list(parts), len(want))
            await sender.send([memoryview(p) for p in parts], len(want))
        assert bytes(got) == want + want

    trio.run(main)


def test_tuned_reader_odd_boundaries_and_stock_writer() -> None:
    """Stock-written messages arrive byte-exact through the tuned reader, read in odd sizes."""
    rng = random.Random(5)
    data = rng.randbytes(2 * 1024 * 1024 + 11)
    reads = [1, 11, 12, 65519, 65520, 7, 300000, 1 << 20]

    async def main() -> None:
        tx, rx = _rw_pair()
        receiver = tuning._NoiseReceiver(rx, 4096 * 4)
        out = bytearray()
        async with trio.open_nursery() as nursery:
            async def writer() -> None:
                pos = 0
                while pos < len(data):  # stock write_msg, one message per call of random size
                    step = rng.randint(1, 65519)
                    await tuning._ORIG["noise_write"](tx, data[pos : pos + step])
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
        receiver = tuning._NoiseReceiver(rx, 1 << 16)
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
        receiver = tuning._NoiseReceiver(noise_io.NoiseTransportReadWriter(rb, b), 1 << 16)
        msg = a.encrypt(b"z" * 50)
        await ra.write(len(msg).to_bytes(2, "big") + msg + b"\x00\x40" + b"\x01" * 9)
        await ra.close()
        assert await receiver.read(50) == b"z" * 50
        with pytest.raises(IncompleteReadError) as ei:
            await receiver.read(12)
        assert not ei.value.is_clean_close  # 11 bytes of a message were pending

    trio.run(main)


def test_other_libp2p_version_is_not_patched(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    tuning.restore_stock_transport()
    monkeypatch.setattr(tuning, "libp2p_version", lambda: "0.9.0")
    monkeypatch.setattr(tuning._state, "supported", None)
    try:
        with caplog.at_level(logging.WARNING, logger="node.net.tuning"):
            assert apply_transport_tuning(256 * 1024, 1 << 20) is False
        assert "0.9.0" in caplog.text and "0.8.1" in caplog.text and "not patching" in caplog.text
        assert not tuning.tuning_active()
        assert yamux.YamuxStream.write is tuning._ORIG["yamux_write"]
        assert noise_io.NoiseTransportReadWriter.write_msg is tuning._ORIG["noise_write"]
        assert tuning._secure_session.SecureSession.read is STOCK_READ
        assert yamux.MAX_MESSAGE_SIZE == tuning._ORIG["yamux_max_message"]
        assert yamux.Yamux.__init__ is tuning._ORIG["yamux_init"]
        assert yamux.Yamux._read_data_body is tuning._ORIG["yamux_read_data_body"]
        with pytest.raises(ValueError, match="yamux_frame_bytes"):  # values are still checked
            apply_transport_tuning(10, 0)
    finally:
        monkeypatch.undo()
        assert apply_transport_tuning() is True


def test_noise_constants_match_py_libp2p() -> None:
    assert tuning._NOISE_LEN == noise_io.SIZE_NOISE_MESSAGE_LEN
    assert tuning._NOISE_PLAIN == noise_io.MAX_PLAINTEXT_LENGTH
    assert tuning._NOISE_PACKET == noise_io.SIZE_NOISE_MESSAGE_LEN + noise_io.MAX_NOISE_MESSAGE_LEN
    for n in (0, 1, 255, 2**32 + 7, 2**64 - 2):  # the nonce the tuned paths build equals noise's own
        assert ChaCha20Cipher.format_nonce(None, n) == tuning._CHACHA_NONCE_PAD + n.to_bytes(8, "little")
    assert set(tuning._ORIG) >= {"yamux_write", "noise_write", "session_read", "yamux_read_exactly",
                                 "yamux_window_update", "yamux_read_timeout", "yamux_divisor", "yamux_max_message",
                                 "yamux_read_data_body"}


def test_untuned_mode_restores_stock_paths() -> None:
    assert apply_transport_tuning(64 * 1024, 0) is False
    assert yamux.YamuxStream.write is tuning._ORIG["yamux_write"]
    assert noise_io.NoiseTransportReadWriter.write_msg is tuning._ORIG["noise_write"]
    assert yamux.MAX_MESSAGE_SIZE == 64 * 1024
    assert yamux.Yamux._read_data_body is tuning._ORIG["yamux_read_data_body"]
    assert apply_transport_tuning() is True
    assert yamux.YamuxStream.write is tuning._tuned_yamux_write
    assert yamux.Yamux._read_data_body is tuning._tuned_read_data_body


def test_data_body_already_decrypted_is_returned_without_the_stock_timeout_path() -> None:
    class Session:
        def __init__(self, rx: object) -> None:
            self._pmn_rx = rx

    class Conn:
        def __init__(self, rx: object) -> None:
            self.secured_conn = Session(rx)

    async def main() -> None:
        rx = tuning._NoiseReceiver.__new__(tuning._NoiseReceiver)  # only its plaintext queue is used here
        rx.failed, rx.chunks, rx.offset, rx.avail = None, tuning.deque([b"abc", b"defgh"]), 0, 8
        conn = Conn(rx)
        assert await tuning._tuned_read_data_body(conn, 6) == b"abcdef"  # type: ignore[arg-type]
        assert (rx.avail, rx.offset) == (2, 3)
        rx.avail = 2  # more than what is held: the stock path (with its timeout) would run
        original = tuning._ORIG["yamux_read_data_body"]
        calls: list[int] = []

        async def stock(self: object, length: int) -> bytes:
            calls.append(length)
            return b"x" * length

        tuning._ORIG["yamux_read_data_body"] = stock
        try:
            assert await tuning._tuned_read_data_body(conn, 5) == b"xxxxx"  # type: ignore[arg-type]
        finally:
            tuning._ORIG["yamux_read_data_body"] = original
        assert calls == [5]

    trio.run(main)


def test_bad_tuning_values_rejected() -> None:
    with pytest.raises(ValueError, match="yamux_frame_bytes"):
        apply_transport_tuning(10, 0)
    with pytest.raises(ValueError, match="yamux_frame_bytes"):
        apply_transport_tuning(32 * 1024 * 1024, 0)
    with pytest.raises(ValueError, match="tcp_read_bytes"):
        apply_transport_tuning(65536, -1)


class _ChunkReader:
    """Stands in for a tuned Noise session (has `_pmn_rx`) that returns preset chunks."""

    def __init__(self, chunks: list[bytes]) -> None:
        self._pmn_rx = object()
        self.chunks = chunks

    async def read(self, n: int) -> bytes:
        return self.chunks.pop(0)[:n] if self.chunks else b""


def test_yamux_exact_read_passes_through_and_keeps_eof_error() -> None:
    async def main() -> None:
        whole = b"x" * 12
        assert await tuning._tuned_read_exactly(_ChunkReader([whole]), 12) is whole  # no copy
        assert await tuning._tuned_read_exactly(_ChunkReader([b"ab", b"cd", b"e"]), 5) == b"abcde"
        with pytest.raises(IncompleteReadError) as ei:
            await tuning._tuned_read_exactly(_ChunkReader([b"abc"]), 12, retry_count=3)
        assert ei.value.received_bytes == 3 and "expected 12 bytes" in str(ei.value)

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
    rw = noise_io.NoiseTransportReadWriter(RawConnection(_BytesRaw(wire), False), b)  # type: ignore[arg-type]

    async def main() -> None:
        receiver = tuning._NoiseReceiver(rw, 2 * 1024 * 1024)
        first_cap = receiver.cap
        out = bytearray()
        while len(out) < len(plain):
            out += await receiver.read(min(100003, len(plain) - len(out)))
        assert bytes(out) == plain
        assert first_cap == 4 * tuning._NOISE_PACKET  # small until bulk traffic shows up
        assert receiver.cap == receiver.max_cap == 2 * 1024 * 1024
        with pytest.raises(IncompleteReadError):
            await receiver.read(1)

    trio.run(main)


def test_quick_lock_is_exclusive_and_waits_when_held() -> None:
    async def main() -> None:
        lock = tuning._QuickLock(trio.Lock())
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
