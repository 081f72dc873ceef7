"""A Noise security transport whose sessions batch reads and writes (py-libp2p 0.8.1's `/noise`).

The handshake is py-libp2p's own (XX, same payloads). Once it is done, the session's two
ChaChaPoly cipher states move into `ChaChaPolyState`s held by a `BatchedNoiseSession`, which
then does all transport encryption of that connection:

* writes: a write longer than one Noise message is still cut into <= 65519-byte plaintexts, each
  sealed with the next nonce and length-prefixed in order, but straight into one reused wire
  buffer that leaves in one socket write (stock: a copy, an encryption and an awaited socket
  write per 64 KiB message). `write_parts` does the same for several buffers back to back
  without joining them (what the tuned yamux stream hands it: headers and payload slices).
* reads: up to `read_bytes` of ciphertext per socket call straight into a reused buffer, every
  complete message decrypted and queued (stock: a 2-byte read, a body read and a BytesIO per
  message). A message that fails authentication closes the connection (NoiseAuthError, a
  RawConnError, so yamux stops reading instead of reading on from a desynchronised cipher).
* cancellation: once a write is sealed (its nonces spent), the socket write is shielded from the caller's
  cancel scopes. A timeout elsewhere (a ping, a dial, a hole punch) that expired between sealing and sending
  used to drop a sealed message or cut it in half: every later message then failed authentication at the
  peer, and the connection stayed "established" while every new stream on it failed. A write that cannot
  reach the socket within `write_stall_s` closes the connection instead (WriteStalledError).

The bytes on the wire are exactly Noise's: a stock peer cannot tell the difference.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import trio
from cryptography.exceptions import InvalidTag
from libp2p.abc import IRawConnection, ISecureConn
from libp2p.crypto.keys import KeyPair, PrivateKey
from libp2p.io.abc import ReadWriteCloser
from libp2p.io.exceptions import ConnectionClosedError, IncompleteReadError
from libp2p.io.trio import TrioTCPStream
from libp2p.network.connection.exceptions import RawConnError
from libp2p.peer.id import ID
from libp2p.security.noise.io import MAX_PLAINTEXT_LENGTH, SIZE_NOISE_MESSAGE_LEN, NoiseTransportReadWriter
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.security.secure_session import SecureSession
from noise.backends.default.ciphers import ChaCha20Cipher
from noise.exceptions import NoiseInvalidMessage

from node.net.chunks import take_chunks
from node.net.transport.cipher import TAG_BYTES, ChaChaPolyState
from node.net.transport.locks import take

NOISE_LEN = SIZE_NOISE_MESSAGE_LEN  # 2-byte big-endian length prefix before each Noise message
NOISE_PLAIN = MAX_PLAINTEXT_LENGTH  # 65519 plaintext bytes per Noise message at most
NOISE_PACKET = NOISE_LEN + NOISE_PLAIN + TAG_BYTES  # largest length prefix + Noise message
MIN_READ_BYTES = 4 * NOISE_PACKET  # the receive buffer starts this large (256 KiB) and never goes below it

Bytes = bytes | bytearray | memoryview


class NoiseAuthError(RawConnError, NoiseInvalidMessage):
    """A received Noise transport message failed authentication: the connection is unusable."""


class WriteStalledError(ConnectionClosedError):
    """A sealed Noise write could not reach the socket within `write_stall_s`: the connection was closed."""


class _Sender:
    """Send side of one session: seals into a reused wire buffer, one socket write per call."""

    def __init__(self, raw: ReadWriteCloser, cipher: ChaChaPolyState, write_stall_s: float) -> None:
        self.raw = raw
        self.write_stall_s = write_stall_s  # longest a sealed write may take to reach the socket
        tcp = getattr(raw, "stream", None)
        self.tcp = tcp if isinstance(tcp, TrioTCPStream) and isinstance(tcp.stream, trio.SocketStream) else None
        self.cipher = cipher
        self.lock = trio.Lock()  # the buffers are reused: one write at a time
        self.scratch = bytearray(NOISE_PLAIN)  # one Noise message's plaintext gathered across parts
        self.wire = bytearray()  # length-prefixed ciphertexts of one write

    async def send(self, parts: Sequence[Bytes], size: int) -> None:
        """Seal the concatenation of `parts` (`size` bytes) as Noise messages and write them at once."""
        if size == 0:
            return
        wire_size = size + -(-size // NOISE_PLAIN) * (NOISE_LEN + TAG_BYTES)
        await take(self.lock)
        try:
            if len(self.wire) < wire_size:
                self.wire = bytearray(wire_size)
            with memoryview(self.scratch) as scratch, memoryview(self.wire) as wire:
                views = [v for v in (memoryview(p).cast("B") for p in parts) if len(v)]
                idx = off = out = 0  # current part, offset in it, bytes of wire written
                for start in range(0, size, NOISE_PLAIN):
                    n_take = min(NOISE_PLAIN, size - start)
                    view = views[idx]
                    if len(view) - off >= n_take:  # the message lies inside one part: seal from it
                        piece = view[off : off + n_take]
                        off += n_take
                    else:  # it spans parts (a yamux header and the data around it): gather it
                        got = 0
                        while got < n_take:
                            view = views[idx]
                            n = min(len(view) - off, n_take - got)
                            scratch[got : got + n] = view[off : off + n]
                            got += n
                            off += n
                            if off == len(view) and got < n_take:
                                idx, off = idx + 1, 0
                        piece = scratch[:n_take]
                    if off == len(views[idx]) and idx + 1 < len(views):
                        idx, off = idx + 1, 0
                    clen = n_take + TAG_BYTES
                    wire[out : out + NOISE_LEN] = clen.to_bytes(NOISE_LEN, "big")
                    self.cipher.seal_into(piece, wire[out + NOISE_LEN : out + NOISE_LEN + clen])
                    out += NOISE_LEN + clen
                # sealed: from here the bytes must all go out, whatever the caller's timeouts (module doc)
                with trio.CancelScope(shield=True, deadline=trio.current_time() + self.write_stall_s) as scope:
                    await self._write(wire[:out])
            if scope.cancelled_caught:
                await self._close()
                raise WriteStalledError(f"a Noise write of {out} bytes did not reach the socket within "
                                        f"transport.write_stall_s={self.write_stall_s}: connection closed",
                                        transport="tcp")
        finally:
            self.lock.release()

    async def _close(self) -> None:
        """Close the connection under a stalled write (part of a message may be on the wire)."""
        with trio.CancelScope(shield=True):
            await self.raw.close()

    async def _write(self, data: memoryview) -> None:
        """RawConnection.write -> TrioTCPStream.write, with its lock taken without a schedule point."""
        if self.tcp is None:
            await self.raw.write(bytes(data))
            return
        await take(self.tcp.write_lock)
        try:
            await self.tcp.stream.send_all(data)
        except trio.BrokenResourceError as exc:  # as TrioTCPStream.write
            raise ConnectionClosedError(f"TCP connection reset by remote peer: {exc}", transport="tcp") from exc
        except trio.ClosedResourceError:  # closed locally: TrioTCPStream.write returns silently
            return
        finally:
            self.tcp.write_lock.release()


class _Receiver:
    """Receive side of one session: a ciphertext buffer filled by recv_into, plaintexts queued as bytes."""

    def __init__(self, raw: ReadWriteCloser, cipher: ChaChaPolyState, read_bytes: int) -> None:
        self.raw = raw
        tcp = getattr(raw, "stream", None)
        # Plain TCP: read straight from the trio socket into our buffer (TrioTCPStream.read allocates
        # a fresh bytes object per call); any other transport goes through its read().
        self.sock = tcp.stream.socket if isinstance(tcp, TrioTCPStream) and isinstance(tcp.stream, trio.SocketStream) else None
        self.cipher = cipher
        self.failed: NoiseAuthError | None = None  # set once a message fails authentication; every later read raises it
        self.max_cap = max(read_bytes, MIN_READ_BYTES)  # the buffer grows up to this on bulk traffic
        self.cap = MIN_READ_BYTES  # 256 KiB while a connection only carries small messages
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

    async def fill(self, want: int) -> None:
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
        while end - pos >= NOISE_LEN:
            mlen = (buf[pos] << 8) | buf[pos + 1]
            body = pos + NOISE_LEN
            if end - body < mlen:
                break
            try:
                plain = self.cipher.open(view[body : body + mlen])
            except InvalidTag as exc:  # raised by the next fill, after what decrypted before it is read
                self.failed = NoiseAuthError(f"Noise transport message {self.cipher.n} failed authentication")
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

    def _grow(self, cap: int) -> None:
        pending = self.end - self.start
        buf = bytearray(cap)
        buf[:pending] = self.view[self.start : self.end]
        self.buf, self.view, self.cap = buf, memoryview(buf), cap
        self.start, self.end = 0, pending

    def take(self, n: int) -> bytes:
        """The next n decrypted bytes (n <= avail)."""
        out, self.offset = take_chunks(self.chunks, self.offset, n)
        self.avail -= n
        return out

    async def read(self, n: int | None) -> bytes:
        if n is None or n < 0:
            while not self.avail:
                await self.fill(1)
            return self.take(self.avail)
        while self.avail < n:
            try:
                await self.fill(n - self.avail)
            except IncompleteReadError:
                if self.avail:  # as stock: the bytes assembled are returned when the connection ends mid-read
                    return self.take(self.avail)
                raise
        return self.take(n)


class BatchedNoiseSession(SecureSession):
    """A Noise transport session (same interface as py-libp2p's SecureSession) with batched I/O.

    read(n) returns n bytes (fewer only if the connection ends after some arrived), read(None) what
    is decrypted so far (at least one message); EOF raises IncompleteReadError, as stock.
    """

    def __init__(self, session: SecureSession, noise: NoiseTransportReadWriter, read_bytes: int,
                 write_stall_s: float = 30.0) -> None:
        super().__init__(local_peer=session.local_peer, local_private_key=session.local_private_key,
                         remote_peer=session.remote_peer, remote_permanent_pubkey=session.remote_permanent_pubkey,
                         is_initiator=session.is_initiator, conn=noise)
        protocol = noise.noise_state.noise_protocol
        raw = noise.read_writer.read_write_closer
        enc, dec = protocol.cipher_state_encrypt, protocol.cipher_state_decrypt
        # From here on these two states own the session's nonces; noise_state is not used again.
        self._tx = _Sender(raw, ChaChaPolyState(enc.k, enc.n), write_stall_s)
        self._rx = _Receiver(raw, ChaChaPolyState(dec.k, dec.n), read_bytes)

    @staticmethod
    def supports(session: ISecureConn) -> bool:
        """Whether `session` is a finished py-libp2p Noise ChaChaPoly session this class can take over."""
        if not isinstance(session, SecureSession) or not isinstance(session.conn, NoiseTransportReadWriter):
            return False
        if session.low_watermark != session.high_watermark:  # plaintext already buffered (never after a handshake)
            return False
        protocol = session.conn.noise_state.noise_protocol
        states = (getattr(protocol, "cipher_state_encrypt", None), getattr(protocol, "cipher_state_decrypt", None))
        return all(s is not None and s.has_key() and isinstance(s.cipher, ChaCha20Cipher) for s in states)

    async def read(self, n: int | None = None) -> bytes:
        if n == 0:
            return b""
        return await self._rx.read(n)

    async def read_exactly(self, n: int) -> bytes:
        """Exactly n bytes (IncompleteReadError if the connection ends first)."""
        data = await self._rx.read(n)
        if len(data) != n:
            raise IncompleteReadError(
                f"Connection closed during read operation: expected {n} bytes but received {len(data)} bytes",
                expected_bytes=n, received_bytes=len(data))
        return data

    def take_decrypted(self, n: int) -> bytes | None:
        """The next n bytes if they are already decrypted (no wait), else None."""
        rx = self._rx
        if rx.failed is None and rx.avail >= n:
            return rx.take(n)
        return None

    async def write(self, data: bytes) -> None:
        await self._tx.send((data,), len(data))

    async def write_parts(self, parts: Sequence[Bytes], size: int) -> None:
        """write(b"".join(parts)) without the join (`size` = their total length)."""
        await self._tx.send(parts, size)


class BatchedNoiseTransport(NoiseTransport):
    """py-libp2p's Noise transport (`/noise`), handing out BatchedNoiseSessions.

    read_bytes: most ciphertext bytes read from the socket per call (the receive buffer grows to
    this on bulk traffic). write_stall_s: longest a sealed write may take to reach the socket before its
    connection is closed (module doc). A session it cannot take over (not ChaChaPoly) stays stock.
    """

    def __init__(self, libp2p_keypair: KeyPair, noise_privkey: PrivateKey, read_bytes: int,
                 write_stall_s: float = 30.0) -> None:
        super().__init__(libp2p_keypair, noise_privkey)
        if read_bytes < 1:
            raise ValueError(f"read_bytes must be >= 1, got {read_bytes}")
        if write_stall_s <= 0:
            raise ValueError(f"write_stall_s must be > 0, got {write_stall_s}")
        self.read_bytes = read_bytes
        self.write_stall_s = write_stall_s

    def _batched(self, session: ISecureConn) -> ISecureConn:
        if not BatchedNoiseSession.supports(session):
            return session
        assert isinstance(session, SecureSession) and isinstance(session.conn, NoiseTransportReadWriter)
        return BatchedNoiseSession(session, session.conn, self.read_bytes, self.write_stall_s)

    async def secure_inbound(self, conn: IRawConnection) -> ISecureConn:
        return self._batched(await super().secure_inbound(conn))

    async def secure_outbound(self, conn: IRawConnection, peer_id: ID) -> ISecureConn:
        return self._batched(await super().secure_outbound(conn, peer_id))
