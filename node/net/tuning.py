"""Process-wide py-libp2p transport tuning for bulk activation traffic (py-libp2p 0.8.1 only).

py-libp2p spends its time on per-frame Python work, not on encryption (see shared/FACTS.md): every
yamux frame costs several awaits, locks and copies, every 64 KiB Noise message two exact reads and
a socket call. The patches below keep the wire format byte-for-byte what Noise + yamux specify
(any Noise/yamux peer can talk to a tuned one) and change only how much Python work each byte
costs. Each patch names what it replaces and why. They are installed only on the exact py-libp2p
version they were written against; any other version keeps stock behaviour (logged once).

* yamux DATA frames of `yamux_frame_bytes` payload on send (stock: 64 KiB). Receivers accept
  frames up to the 16 MiB window, so peers need no change.
* `YamuxStream.write`: takes all the send window it can at once, cuts it into frames and hands
  them to the connection in one write; waits for a window update on an event instead of
  polling every 10 ms (same 5 s limit and error as stock).
* `NoiseTransportReadWriter.write_msg` (and the tuned yamux write): a write larger than one
  Noise message is still cut into <= 65519-byte plaintexts, each encrypted with the next nonce
  and length-prefixed in order, but straight into one reused per-connection buffer that leaves
  in one socket write (stock: a copy, an encryption and an awaited socket write per message).
* `SecureSession.read` (Noise sessions only): reads up to `tcp_read_bytes` of ciphertext per
  socket call straight into a reused buffer, decrypts every complete Noise message in it and
  serves reads from the plaintexts (stock: one 2-byte read, one body read and one BytesIO per
  message). A message that fails authentication closes the connection.
* `write_gather(stream, parts)` (not a patch; used by the activation channel): a tuned yamux
  write of several buffers back to back, cut into frames and Noise messages without joining
  them first. `read_some(stream, n)`: a bulk read that takes over a yamux stream's buffer
  instead of copying it (same bytes, same window accounting).
* `Yamux._read_data_body`: a DATA body the tuned Noise session already holds decrypted is
  returned without stock's per-frame timeout scope (bodies still to arrive keep the timeout).
* `YamuxStream._auto_tune_and_send_window_update`: a WINDOW_UPDATE once half the window was
  consumed, as go-yamux does (stock 0.8.1: after almost every read).
* yamux's `read_exactly`: passes a tuned session's exact-length result through (stock copies
  every frame body twice more).
* locks on the tuned paths, yamux's `streams_lock` and NetStream's `_state_lock` are taken
  without a schedule point when free (stock `async with` yields to the scheduler at each of
  them: about 10 scheduler turns per small message).
* glibc heap thresholds (not a py-libp2p patch): megabyte buffers are reused from the heap
  instead of fresh page-faulting mmaps.

Measured effect: benchmarks/transport.py.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform
import struct
from collections import deque
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from libp2p.io import utils as _io_utils
from libp2p.io.exceptions import ConnectionClosedError, IncompleteReadError
from libp2p.io.trio import TrioTCPStream
from libp2p.network.connection.exceptions import RawConnError
from libp2p.network.stream import net_stream as _net_stream
from libp2p.network.stream.net_stream import StreamState
from libp2p.security import secure_session as _secure_session
from libp2p.security.noise import io as _noise_io
from libp2p.stream_muxer.exceptions import MuxedStreamError
from libp2p.stream_muxer.yamux import yamux as _yamux
from noise.constants import MAX_NONCE
from noise.exceptions import NoiseInvalidMessage, NoiseMaxNonceError

from node.net.chunks import take_chunks

log = logging.getLogger(__name__)

SUPPORTED_LIBP2P = "0.8.1"  # the only py-libp2p version whose internals these patches were written against
WRITE_BATCH_BYTES = 4 * 1024 * 1024  # most stream bytes one tuned yamux write hands to the socket at once
HEAP_MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc: allocations below this come from the heap, not fresh mmaps
HEAP_TRIM_THRESHOLD = 128 * 1024 * 1024  # glibc: free heap kept before returning memory to the kernel
WINDOW_WAIT_S = 5.0  # stock YamuxStream.write gives up after 5 s without a window update; kept as is
WINDOW_POLL_S = 0.01  # a blocked writer wakes on the window update at once, and checks for a closed stream this often
_NOISE_LEN = 2  # libp2p Noise: 2-byte big-endian length prefix before each message
_NOISE_TAG = 16  # Poly1305 tag bytes added to each Noise message
_NOISE_PLAIN = 65535 - _NOISE_TAG  # 65519 plaintext bytes per Noise message at most
_NOISE_PACKET = _NOISE_LEN + 65535  # largest length prefix + Noise message
_OPEN = StreamState.OPEN
_CHACHA_NONCE_PAD = b"\x00" * 4  # Noise ChaChaPoly nonce: 4 zero bytes, then the 64-bit counter little-endian


def _capture_originals() -> dict[str, Any]:
    """The stock objects the patches replace ({} if this py-libp2p lacks one: then nothing is patched)."""
    try:
        return {
            "yamux_max_message": _yamux.MAX_MESSAGE_SIZE,
            "yamux_write": _yamux.YamuxStream.write,
            "noise_write": _noise_io.NoiseTransportReadWriter.write_msg,
            "session_read": _secure_session.SecureSession.read,
            "yamux_read_exactly": _yamux.read_exactly,
            "yamux_window_update": _yamux.YamuxStream._auto_tune_and_send_window_update,
            "yamux_read_timeout": _yamux._yamux_data_read_timeout,
            "yamux_read_data_body": _yamux.Yamux._read_data_body,
            "yamux_divisor": _yamux._yamux_batch_threshold_divisor,
            "yamux_init": _yamux.Yamux.__init__,
            "net_stream_init": _net_stream.NetStream.__init__,
        }
    except AttributeError:
        return {}


_ORIG = _capture_originals()


@dataclass
class _State:
    """What apply_transport_tuning last installed."""

    tuned: bool = False  # True while the tuned read/write paths are installed
    read_bytes: int = 0  # ciphertext bytes asked of the socket per read on tuned Noise sessions
    supported: bool | None = None  # result of the version check (None = not checked yet)
    malloc_tuned: bool = False  # mallopt already applied in this process
    update_divisor: int = 2  # a WINDOW_UPDATE goes out once consumed bytes reach target // this (PY_YAMUX_BATCH_THRESHOLD_DIV)


_state = _State()


class NoiseAuthError(RawConnError, NoiseInvalidMessage):
    """A received Noise transport message failed authentication: the connection is unusable.

    Stock py-libp2p raises NoiseInvalidMessage, which yamux logs before reading on from a stream
    that can no longer decrypt; as a RawConnError it makes yamux close the connection instead.
    """


def libp2p_version() -> str:
    """Installed py-libp2p version ("" if unknown)."""
    try:
        return metadata.version("libp2p")
    except metadata.PackageNotFoundError:
        return ""


def tuning_supported() -> bool:
    """True when the installed py-libp2p is the version the patches were written for (logged once if not)."""
    if _state.supported is None:
        found = libp2p_version()
        _state.supported = found == SUPPORTED_LIBP2P and bool(_ORIG)
        if not _state.supported:
            log.warning("py-libp2p %s installed, transport tuning is written for %s only: "
                        "not patching, using py-libp2p's stock transport", found or "(unknown)", SUPPORTED_LIBP2P)
    return _state.supported


def tuning_active() -> bool:
    """True while the tuned transport paths are installed."""
    return _state.tuned


# -- locks without a schedule point when free -------------------------------------------------------
# `async with trio.Lock()` yields to the scheduler even when the lock is free; a stock small
# yamux write passes five such locks (about 10 scheduler turns per message). The tuned paths
# take a free lock synchronously and only wait when it is held. Every write still reaches the
# socket's send, which is a checkpoint, so cancellation works as before.


async def _lock(lock: trio.Lock | trio.Semaphore) -> None:
    try:
        lock.acquire_nowait()
    except trio.WouldBlock:
        await lock.acquire()


class QuickLock:
    """A trio.Lock whose `async with` takes it without a schedule point when it is free."""

    __slots__ = ("_lock",)

    def __init__(self, lock: trio.Lock) -> None:
        self._lock = lock

    async def __aenter__(self) -> None:
        await _lock(self._lock)

    async def __aexit__(self, *exc_info: object) -> None:
        self._lock.release()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lock, name)


_QuickLock = QuickLock  # the name the patched constructors and tests use


# Yamux.streams_lock (taken for every received frame and every stream read) and
# NetStream._state_lock (taken for every stream read and write) become _QuickLock on objects
# created while the tuning is active. Replaces nothing else in those constructors.
_QUICK_LOCKS = {"yamux": ("streams_lock",), "net_stream": ("_state_lock",)}


def _quick_lock_init(original: Any, attrs: tuple[str, ...]) -> Any:
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if _state.tuned:
            for attr in attrs:
                lock = getattr(self, attr, None)
                if isinstance(lock, trio.Lock):
                    setattr(self, attr, _QuickLock(lock))

    __init__.__pmn_original__ = original  # type: ignore[attr-defined]
    return __init__


# -- yamux send window: woken by the update instead of a 10 ms poll ---------------------------------
# Replaces the plain `send_window` attribute of YamuxStream with a property that stores the same
# integer and wakes a tuned writer waiting for a window update. Stock code reads and writes it
# exactly as before; it exists because a stock writer notices an update only at its next 10 ms poll.


def _get_send_window(self: _yamux.YamuxStream) -> int:
    d = self.__dict__
    return d["_pmn_send_window"] if "_pmn_send_window" in d else d["send_window"]


def _set_send_window(self: _yamux.YamuxStream, value: int) -> None:
    d = self.__dict__
    d["_pmn_send_window"] = value
    event = d.get("_pmn_window_event")
    if event is not None and value > 0:
        event.set()


async def _wait_send_window(stream: _yamux.YamuxStream) -> None:
    """Wait until the peer opens the send window (MuxedStreamError after WINDOW_WAIT_S, as stock)."""
    event = trio.Event()
    stream.__dict__["_pmn_window_event"] = event
    try:
        with trio.move_on_after(WINDOW_WAIT_S) as scope:
            while stream.send_window <= 0 and not stream.closed:
                with trio.move_on_after(WINDOW_POLL_S):  # a reset/close sets no event: look again this often
                    await event.wait()
                event = trio.Event()
                stream.__dict__["_pmn_window_event"] = event
    finally:
        stream.__dict__.pop("_pmn_window_event", None)
    if scope.cancelled_caught:
        raise MuxedStreamError(f"Timed out waiting for window update after {WINDOW_WAIT_S:g} seconds.")


# -- yamux write: all available window in one connection write --------------------------------------
# Replaces YamuxStream.write. Stock takes one frame per loop turn (two locks, a slice copy, a
# header+chunk concatenation, one Noise write and one socket send per 64 KiB). Same frames, same
# order, same window accounting; the frames of one turn go out in a single connection write.


class Gather(tuple):  # type: ignore[type-arg]
    """Buffers a tuned yamux write sends back to back, as if joined (see write_gather)."""


async def write_gather(stream: Any, parts: Any) -> None:
    """stream.write(b"".join(parts)), without the join on a tuned yamux stream (one write, no copy).

    `stream` is a NetStream (or anything with write()); parts are bytes-like. Only a tuned yamux
    write understands a Gather, so every other stream gets the joined bytes.
    """
    muxed = getattr(stream, "muxed_stream", stream)
    if _state.tuned and isinstance(muxed, _yamux.YamuxStream) and _yamux.YamuxStream.write is _tuned_yamux_write:
        await stream.write(Gather(parts))
    else:
        await stream.write(b"".join(parts))


async def read_some(stream: Any, n: int) -> bytes | bytearray:
    """stream.read(n) for bulk readers: at most n bytes, at least one (EOF/reset raise as stream.read does).

    On a tuned, open yamux stream whose buffer holds data and at most n bytes, the buffer object
    itself is handed over (a bytearray the caller now owns) instead of a bytes copy of it, and a
    fresh buffer takes its place: the same bytes, window accounting and window update as stock
    read_stream, one copy of every received byte less. An empty buffer is waited for the way
    read_stream waits (the stream's event, set by the muxer when data, a close or a reset
    arrives), then handed over the same way. Anything else goes through stream.read(n).
    """
    muxed = getattr(stream, "muxed_stream", None)
    if _state.tuned and isinstance(muxed, _yamux.YamuxStream) and getattr(stream, "_state", None) is _OPEN:
        conn = muxed.conn
        sid = muxed.stream_id
        buf = conn.stream_buffers.get(sid)
        for _ in range(2):  # an event already set by data taken earlier wakes at once: wait once more
            if buf or buf is None or muxed.closed or muxed.recv_closed or muxed.reset_received:
                break
            event = conn.stream_events.get(sid)
            if event is None:
                break
            await event.wait()
            conn.stream_events[sid] = trio.Event()  # as read_stream does after its wait
            buf = conn.stream_buffers.get(sid)
        if (buf and len(buf) <= n and not muxed.closed and not muxed.reset_received and sid in conn.streams
                and not conn.event_shutting_down.is_set()):
            conn.stream_buffers[sid] = bytearray()
            await muxed._auto_tune_and_send_window_update(bytes_read=len(buf))
            return buf
    data: bytes = await stream.read(n)
    return data


def _slices(views: list[memoryview], start: int, stop: int, out: list[bytes | memoryview]) -> None:
    """Append to out the pieces of the concatenation of views covering [start, stop)."""
    pos = 0
    for v in views:
        end = pos + len(v)
        if end > start:
            out.append(v[max(start - pos, 0) : min(stop - pos, len(v))])
            if end >= stop:
                return
        pos = end


async def _tuned_yamux_write(self: _yamux.YamuxStream, data: bytes) -> None:
    if self.send_closed:
        raise MuxedStreamError("Stream is closed for sending")
    if isinstance(data, Gather):
        views = [v for v in (memoryview(p).cast("B") for p in data) if len(v)]
    else:
        views = [memoryview(data).cast("B")]
    total = sum(len(v) for v in views)
    frame_payload = max(1, _yamux.MAX_MESSAGE_SIZE - _yamux.HEADER_SIZE)
    pack = struct.Struct(_yamux.YAMUX_HEADER_FORMAT).pack
    sent = 0
    writer_lock = self.rw_lock._writer_lock  # what rw_lock.write_lock() holds
    while sent < total:
        await _lock(writer_lock)
        try:
            if self.send_closed:
                raise MuxedStreamError("Stream is closed for sending")
            await _lock(self.window_lock)
            try:
                if self.closed:
                    raise MuxedStreamError("Stream is closed")
                take = min(self.send_window, total - sent, WRITE_BATCH_BYTES)
                if take > 0:
                    self.send_window -= take
            finally:
                self.window_lock.release()
        finally:
            writer_lock.release()
        if take <= 0:
            await _wait_send_window(self)
            continue
        parts: list[bytes | memoryview] = []
        end = sent + take
        for start in range(sent, end, frame_payload):
            stop = min(start + frame_payload, end)
            parts.append(pack(0, _yamux.TYPE_DATA, 0, self.stream_id, stop - start))
            if len(views) == 1:
                parts.append(views[0][start:stop])
            else:
                _slices(views, start, stop, parts)
        session = self.conn.secured_conn
        noise = getattr(session, "conn", None)
        if isinstance(session, _secure_session.SecureSession) and isinstance(noise, _noise_io.NoiseTransportReadWriter):
            await _lock(self.conn._write_lock)  # what Yamux._write_frame holds around a connection write
            try:
                await _sender(noise).send(parts, take + _yamux.HEADER_SIZE * -(-take // frame_payload))
            finally:
                self.conn._write_lock.release()
        else:
            await self.conn._write_frame(b"".join(parts))
        sent = end


# -- Noise write: one socket write per stream write, into reused buffers -----------------------------
# Replaces NoiseTransportReadWriter.write_msg for writes longer than one Noise message (and is
# what the tuned yamux write calls). Stock encrypts a bytes copy of each 65519-byte slice into a
# fresh object, prefixes it by concatenation and awaits one socket write per Noise message. Here
# the messages are encrypted in order with the same nonces (encrypt_into a per-connection wire
# buffer when the cipher offers it) and leave in one socket write. Same bytes on the wire.


class _NoiseSender:
    """Reusable wire buffer of one Noise session's send side."""

    def __init__(self, conn: _noise_io.NoiseTransportReadWriter) -> None:
        self.raw = conn.read_writer.read_write_closer
        tcp = getattr(self.raw, "stream", None)
        self.tcp = tcp if isinstance(tcp, TrioTCPStream) and isinstance(tcp.stream, trio.SocketStream) else None
        self.state = conn.noise_state.noise_protocol.cipher_state_encrypt
        aead = getattr(getattr(self.state, "cipher", None), "cipher", None)
        self.encrypt_into = aead.encrypt_into if isinstance(aead, ChaCha20Poly1305) else None
        self.lock = trio.Lock()  # the buffers are reused: one write at a time
        self.scratch = bytearray(_NOISE_PLAIN)  # one Noise message's plaintext gathered across parts
        self.wire = bytearray()  # length-prefixed ciphertexts of one write

    def _seal(self, piece: memoryview, out: memoryview) -> None:
        """CipherState.encrypt_with_ad(None, piece) written into `out` (len(piece) + 16 bytes)."""
        state = self.state
        if self.encrypt_into is None:
            out[:] = state.encrypt_with_ad(None, piece)
            return
        n = state.n
        if n == MAX_NONCE:
            raise NoiseMaxNonceError("Nonce has depleted!")
        self.encrypt_into(_CHACHA_NONCE_PAD + n.to_bytes(8, "little"), piece, None, out)
        state.n = n + 1

    async def send(self, parts: list[bytes | memoryview], size: int) -> None:
        """Encrypt the concatenation of `parts` (`size` bytes) as Noise messages and write them at once."""
        wire_size = size + -(-size // _NOISE_PLAIN) * (_NOISE_LEN + _NOISE_TAG)
        await _lock(self.lock)
        try:
            if len(self.wire) < wire_size:
                self.wire = bytearray(wire_size)
            with memoryview(self.scratch) as scratch, memoryview(self.wire) as wire:
                views = [v for v in (memoryview(p).cast("B") for p in parts) if len(v)]
                idx = off = out = 0  # current part, offset in it, bytes of wire written
                for start in range(0, size, _NOISE_PLAIN):
                    take = min(_NOISE_PLAIN, size - start)
                    view = views[idx]
                    if len(view) - off >= take:  # the message lies inside one part: encrypt from it
                        piece = view[off : off + take]
                        off += take
                    else:  # it spans parts (a yamux header and the data around it): gather it
                        got = 0
                        while got < take:
                            view = views[idx]
                            n = min(len(view) - off, take - got)
                            scratch[got : got + n] = view[off : off + n]
                            got += n
                            off += n
                            if off == len(view) and got < take:
                                idx, off = idx + 1, 0
                        piece = scratch[:take]
                    if off == len(views[idx]) and idx + 1 < len(views):
                        idx, off = idx + 1, 0
                    clen = take + _NOISE_TAG
                    wire[out : out + _NOISE_LEN] = clen.to_bytes(_NOISE_LEN, "big")
                    self._seal(piece, wire[out + _NOISE_LEN : out + _NOISE_LEN + clen])
                    out += _NOISE_LEN + clen
                await self._write(wire[:out])
        finally:
            self.lock.release()

    async def _write(self, data: memoryview) -> None:
        """RawConnection.write -> TrioTCPStream.write, with its lock taken without a schedule point."""
        if self.tcp is None:
            await self.raw.write(data)  # type: ignore[arg-type]  # any bytes-like reaches the transport
            return
        await _lock(self.tcp.write_lock)
        try:
            await self.tcp.stream.send_all(data)
        except trio.BrokenResourceError as exc:  # as TrioTCPStream.write
            raise ConnectionClosedError(f"TCP connection reset by remote peer: {exc}", transport="tcp") from exc
        except trio.ClosedResourceError:  # closed locally: TrioTCPStream.write returns silently
            return
        finally:
            self.tcp.write_lock.release()


def _sender(conn: _noise_io.NoiseTransportReadWriter) -> _NoiseSender:
    tx: _NoiseSender | None = conn.__dict__.get("_pmn_tx")
    if tx is None:
        tx = conn._pmn_tx = _NoiseSender(conn)  # type: ignore[attr-defined]
    return tx


async def _tuned_noise_write(self: _noise_io.NoiseTransportReadWriter, msg: bytes, prefix_encoded: bool = False) -> None:
    if len(msg) <= _NOISE_PLAIN or prefix_encoded:
        await _ORIG["noise_write"](self, bytes(msg), prefix_encoded)
        return
    await _sender(self).send([msg], len(msg))


# -- Noise read: batched socket reads, decrypt every complete message at once -----------------------
# Replaces SecureSession.read on Noise sessions. Stock reads each Noise message with two exact
# reads (2-byte length, then the body; each one or more socket calls and awaits) and stores its
# plaintext in a fresh BytesIO. Same semantics: read(n) returns n bytes (fewer only if the
# connection ends after some arrived), read(None) returns what is decrypted so far (at least one
# message), EOF raises IncompleteReadError. One deliberate change: a message that fails
# authentication raises NoiseAuthError (a NoiseInvalidMessage and a RawConnError), so yamux
# closes the connection instead of reading on from a desynchronised cipher.


class _NoiseReceiver:
    """Receive side of one Noise session: a fixed ciphertext buffer filled by recv_into, and the
    decrypted messages kept as a queue of bytes (a read joins what it needs: one copy)."""

    def __init__(self, conn: _noise_io.NoiseTransportReadWriter, read_bytes: int) -> None:
        self.raw = conn.read_writer.read_write_closer
        tcp = getattr(self.raw, "stream", None)
        # Plain TCP: read straight from the trio socket into our buffer (stock TrioTCPStream.read
        # allocates a fresh bytes object per call); any other transport goes through its read().
        self.sock = tcp.stream.socket if isinstance(tcp, TrioTCPStream) and isinstance(tcp.stream, trio.SocketStream) else None
        self.state = conn.noise_state.noise_protocol.cipher_state_decrypt
        self.decrypt = self.state.decrypt_with_ad
        aead = getattr(getattr(self.state, "cipher", None), "cipher", None)
        # ChaChaPoly straight from `cryptography` (as the sender's encrypt_into): same nonce, same
        # check, without noise's three Python wrapper calls per message
        self.aead_decrypt = aead.decrypt if isinstance(aead, ChaCha20Poly1305) and self.state.has_key() else None
        self.failed: NoiseAuthError | None = None  # set once a message fails authentication; every later read raises it
        self.max_cap = max(read_bytes, 4 * _NOISE_PACKET)  # the buffer grows up to this on bulk traffic
        self.cap = min(self.max_cap, 4 * _NOISE_PACKET)  # 256 KiB while a connection only carries small messages
        self.buf = bytearray(self.cap)  # ciphertext; [start, end) not yet decrypted
        self.view = memoryview(self.buf)
        self.start = 0
        self.end = 0
        self.chunks: deque[bytes | bytearray] = deque()  # decrypted plaintexts, oldest first
        self.offset = 0  # bytes of chunks[0] already returned
        self.avail = 0  # plaintext bytes held in chunks

    async def _recv(self) -> int:
        room = self.view[self.end :]
        if self.sock is not None:
            try:
                return await self.sock.recv_into(room)
            except trio.ClosedResourceError:  # closed locally: EOF, as TrioTCPStream.read reports it
                return 0
            except OSError as exc:
                raise ConnectionClosedError(f"TCP connection reset by remote peer: {exc}", transport="tcp") from exc
        data = await self.raw.read(len(room))
        room[: len(data)] = data
        return len(data)

    async def _fill(self, want: int) -> None:
        """Read once and decrypt every complete Noise message (IncompleteReadError on EOF)."""
        if self.failed is not None:
            raise self.failed
        room = self.cap - self.end
        got = await self._recv()
        if not got:
            pending = self.end - self.start + self.avail
            raise IncompleteReadError(
                f"Connection closed during read operation: expected {want} bytes but received {pending} bytes",
                expected_bytes=want, received_bytes=pending)
        buf, view, end = self.buf, self.view, self.end + got
        pos = self.start
        while end - pos >= _NOISE_LEN:
            mlen = (buf[pos] << 8) | buf[pos + 1]
            body = pos + _NOISE_LEN
            if end - body < mlen:
                break
            try:
                plain = self._open(view[body : body + mlen])
            except InvalidTag as exc:  # raised by the next _fill, after what decrypted before it is read
                self.failed = NoiseAuthError(f"Noise transport message {self.state.n} failed authentication")
                self.failed.__cause__ = exc
                break
            self.chunks.append(plain)
            self.avail += len(plain)
            pos = body + mlen
        if pos == end:
            self.start = self.end = 0
        elif self.cap - end < self.cap // 4:  # keep room for big reads: move the partial message to the front
            rest = bytes(view[pos:end])
            self.buf[: len(rest)] = rest
            self.start, self.end = 0, len(rest)
        else:
            self.start, self.end = pos, end
        if got == room and self.cap < self.max_cap:  # the socket had more than we could take: grow
            self._grow(min(2 * self.cap, self.max_cap))

    def _open(self, message: memoryview) -> bytes:
        """CipherState.decrypt_with_ad(None, message): the plaintext, nonce advanced (InvalidTag if forged)."""
        state = self.state
        if self.aead_decrypt is None:
            plain: bytes = self.decrypt(None, message)
            return plain
        n = state.n
        if n == MAX_NONCE:
            raise NoiseMaxNonceError("Nonce has depleted!")
        plain = self.aead_decrypt(_CHACHA_NONCE_PAD + n.to_bytes(8, "little"), message, None)
        state.n = n + 1
        return plain

    def _grow(self, cap: int) -> None:
        pending = self.end - self.start
        buf = bytearray(cap)
        buf[:pending] = self.view[self.start : self.end]
        self.buf, self.view, self.cap = buf, memoryview(buf), cap
        self.start, self.end = 0, pending

    def _take(self, n: int) -> bytes:
        out, self.offset = take_chunks(self.chunks, self.offset, n)
        self.avail -= n
        return out

    async def read(self, n: int | None) -> bytes:
        if n is None or n < 0:
            while not self.avail:
                await self._fill(1)
            return self._take(self.avail)
        while self.avail < n:
            try:
                await self._fill(n - self.avail)
            except IncompleteReadError:
                if self.avail:  # stock returns the bytes it assembled when the connection ends mid-read
                    return self._take(self.avail)
                raise
        return self._take(n)


async def _tuned_session_read(self: _secure_session.SecureSession, n: int | None = None) -> bytes:
    if n == 0:
        return b""
    rx: _NoiseReceiver | None = self.__dict__.get("_pmn_rx")
    if rx is None:
        conn = self.conn
        noise = isinstance(conn, _noise_io.NoiseTransportReadWriter)
        if not (_state.tuned and noise) or self.low_watermark != self.high_watermark:
            return await _ORIG["session_read"](self, n)
        assert isinstance(conn, _noise_io.NoiseTransportReadWriter)
        rx = self._pmn_rx = _NoiseReceiver(conn, _state.read_bytes)  # type: ignore[attr-defined]
    return await rx.read(n)


# -- yamux exact reads: no copies when the session already returns exactly n bytes ------------------
# Replaces the `read_exactly` name inside the yamux module (what handle_incoming uses for every
# frame header and body). Stock copies every result into a bytearray and then into bytes again,
# two extra copies of each received byte; a tuned Noise session returns exactly n bytes in one
# call (fewer only at EOF), so that result is passed through. Anything else takes the stock loop.


async def _tuned_read_exactly(reader: Any, n: int, retry_count: int = _io_utils.DEFAULT_RETRY_READ_COUNT) -> bytes:
    if "_pmn_rx" not in getattr(reader, "__dict__", {}):
        return await _ORIG["yamux_read_exactly"](reader, n, retry_count)
    first = await reader.read(n)
    if len(first) == n:
        return first
    buffer = bytearray(first)
    for _ in range(retry_count):
        if len(buffer) >= n:
            return bytes(buffer)
        buffer.extend(await reader.read(n - len(buffer)))
    raise IncompleteReadError(
        f"Connection closed during read operation: expected {n} bytes but received {len(buffer)} bytes",
        expected_bytes=n, received_bytes=len(buffer))


# -- yamux DATA bodies already decrypted: no timeout scope ---------------------------------------------
# Replaces Yamux._read_data_body. Stock wraps every DATA body read in trio.fail_after (a cancel
# scope and a deadline registration per frame) so a peer cannot stall it; a tuned session that
# already holds the whole body decrypted returns it without waiting, so the scope is skipped then.
# Anything else (bytes still to arrive, another session type) takes the stock path with its timeout.


async def _tuned_read_data_body(self: _yamux.Yamux, length: int) -> bytes:
    rx: _NoiseReceiver | None = getattr(self.secured_conn, "__dict__", {}).get("_pmn_rx")
    if rx is not None and rx.failed is None and rx.avail >= length:
        return rx._take(length)
    data: bytes = await _ORIG["yamux_read_data_body"](self, length)
    return data


# -- yamux receive window: go-yamux hysteresis -------------------------------------------------------
# Replaces YamuxStream._auto_tune_and_send_window_update. Stock 0.8.1 sends a WINDOW_UPDATE after
# almost every read (its "partial slack" / release-on-read branches), so each small control
# frame a channel reads costs the peer another frame to parse, and every bulk read another
# write. go-yamux sends an update only once the bytes the reader consumed reach half the target
# window; this does the same, with stock's window growth (GrowTo + the RTT auto-tune epoch).
# A sender is never stalled by it: its window is at least half the target until the update.


async def _tuned_window_update(self: _yamux.YamuxStream, *, bytes_read: int = 0) -> None:
    increment = 0
    await _lock(self.window_lock)
    try:
        buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
        consumed = self.target_recv_window - (self.recv_window + buffered)
        if consumed > 0 and consumed >= self.target_recv_window // _state.update_divisor:
            increment = self._grow_to_delta(buffered) + self._apply_autotune_epoch(buffered)
    finally:
        self.window_lock.release()
    if increment > 0:
        await self.send_window_update(increment, skip_lock=True)


# -- glibc heap: keep megabyte buffers warm ---------------------------------------------------------
# Not a py-libp2p patch. Every layer (yamux buffers, stream reads, frame joins) allocates and frees
# megabyte-sized bytes objects. glibc serves those with fresh mmaps (or trims the heap right after
# they are freed), so each one costs a page fault per 4 KiB: about as much CPU as the Noise
# encryption itself. Raising the mmap threshold and trim threshold keeps that memory in the heap
# for reuse; the process may hold up to HEAP_TRIM_THRESHOLD of free heap.


def _tune_malloc() -> None:
    if _state.malloc_tuned or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3  # from <malloc.h>
    ok = libc.mallopt(m_mmap_threshold, HEAP_MMAP_THRESHOLD) == 1
    ok = libc.mallopt(m_trim_threshold, HEAP_TRIM_THRESHOLD) == 1 and ok
    if not ok:
        log.warning("mallopt refused the heap thresholds; large transport buffers will page-fault")
    _state.malloc_tuned = True


_installed_property = False


def _install_window_property() -> None:
    """The send-window property and the quick-lock constructors: installed once, inert while untuned."""
    global _installed_property
    if not _installed_property:
        if not isinstance(_yamux.YamuxStream.__dict__.get("send_window"), property):
            _yamux.YamuxStream.send_window = property(_get_send_window, _set_send_window)  # type: ignore[assignment]
        _yamux.Yamux.__init__ = _quick_lock_init(_ORIG["yamux_init"], _QUICK_LOCKS["yamux"])  # type: ignore[method-assign]
        _net_stream.NetStream.__init__ = _quick_lock_init(  # type: ignore[method-assign]
            _ORIG["net_stream_init"], _QUICK_LOCKS["net_stream"])
        _installed_property = True


def apply_transport_tuning(yamux_frame_bytes: int = 256 * 1024, tcp_read_bytes: int = 1 << 20) -> bool:
    """Install the tuning in this process (idempotent); returns whether the tuned paths are active.

    tcp_read_bytes=0 restores py-libp2p's stock reads and writes (yamux frames stay at
    yamux_frame_bytes). On a py-libp2p other than SUPPORTED_LIBP2P nothing is patched (values
    are still validated) and False is returned. Sessions keep the read path they started with.
    """
    if not 1024 <= yamux_frame_bytes <= _yamux.MAX_WINDOW_SIZE:
        raise ValueError(f"yamux_frame_bytes must be within [1024, {_yamux.MAX_WINDOW_SIZE}], got {yamux_frame_bytes}")
    if tcp_read_bytes < 0:
        raise ValueError(f"tcp_read_bytes must be >= 0, got {tcp_read_bytes}")
    if not tuning_supported():
        return False
    _yamux.MAX_MESSAGE_SIZE = yamux_frame_bytes
    _install_window_property()
    tuned = tcp_read_bytes > 0
    if tuned:
        _tune_malloc()
    _state.tuned, _state.read_bytes = tuned, tcp_read_bytes
    _yamux.YamuxStream.write = _tuned_yamux_write if tuned else _ORIG["yamux_write"]  # type: ignore[method-assign]
    _state.update_divisor = _ORIG["yamux_divisor"]()
    _yamux.YamuxStream._auto_tune_and_send_window_update = (  # type: ignore[method-assign]
        _tuned_window_update if tuned else _ORIG["yamux_window_update"])
    # Stock reads PY_YAMUX_DATA_READ_TIMEOUT from the environment for every frame; read it once here.
    timeout_s = _ORIG["yamux_read_timeout"]()
    _yamux._yamux_data_read_timeout = (lambda: timeout_s) if tuned else _ORIG["yamux_read_timeout"]
    _yamux.Yamux._read_data_body = _tuned_read_data_body if tuned else _ORIG["yamux_read_data_body"]  # type: ignore[method-assign]
    noise_write = _tuned_noise_write if tuned else _ORIG["noise_write"]
    _noise_io.NoiseTransportReadWriter.write_msg = noise_write  # type: ignore[method-assign,assignment]
    # Installed in both modes: they dispatch to stock for sessions that began untuned.
    _secure_session.SecureSession.read = _tuned_session_read  # type: ignore[method-assign]
    _yamux.read_exactly = _tuned_read_exactly
    return tuned


def restore_stock_transport() -> None:
    """Put back every stock py-libp2p method and constant.

    The send-window property stays (it stores the same integer; streams made while it was
    installed need it), and objects made while tuned keep their quick locks.
    """
    _yamux.Yamux.__init__ = _ORIG["yamux_init"]  # type: ignore[method-assign]
    _net_stream.NetStream.__init__ = _ORIG["net_stream_init"]  # type: ignore[method-assign]
    global _installed_property
    _installed_property = False  # the next apply installs the quick-lock constructors again
    _yamux.MAX_MESSAGE_SIZE = _ORIG["yamux_max_message"]
    _yamux.YamuxStream.write = _ORIG["yamux_write"]  # type: ignore[method-assign]
    _noise_io.NoiseTransportReadWriter.write_msg = _ORIG["noise_write"]  # type: ignore[method-assign]
    _secure_session.SecureSession.read = _ORIG["session_read"]  # type: ignore[method-assign]
    _yamux.read_exactly = _ORIG["yamux_read_exactly"]
    _yamux.YamuxStream._auto_tune_and_send_window_update = _ORIG["yamux_window_update"]  # type: ignore[method-assign]
    _yamux._yamux_data_read_timeout = _ORIG["yamux_read_timeout"]
    _yamux.Yamux._read_data_body = _ORIG["yamux_read_data_body"]  # type: ignore[method-assign]
    _state.tuned, _state.read_bytes = False, 0
