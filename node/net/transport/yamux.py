"""A yamux muxer (`/yamux/1.0.0`) and stream tuned for bulk activation traffic (py-libp2p 0.8.1).

Same frames on the wire as py-libp2p's Yamux (any yamux peer can talk to it); less Python work
per byte:

* DATA frames of `frame_bytes` payload on send (stock: the module's 64 KiB). Receivers accept
  frames up to the 16 MiB window, so peers need no change.
* `write` takes all the send window it can at once, cuts it into frames and hands them to a
  BatchedNoiseSession in one call (one socket write); a writer out of window waits on an event
  set by the window update instead of polling every 10 ms (same limit and error as stock).
* a WINDOW_UPDATE once half the receive window was consumed, as go-yamux does (stock 0.8.1
  sends one after almost every read).
* a DATA body the session already holds decrypted is taken without a timeout scope; others are
  read with the session's exact read under the same timeout as stock, read once per connection.
* the connection's streams lock and write lock are taken without a schedule point when free.
* `grow_receive_window(size)`: a public way to open a stream's receive window at once.
* `take_buffer(n)`: hands a stream's receive buffer over instead of copying it (see read_some).

py-libp2p builds inbound streams with a hard-coded `YamuxStream(...)` inside handle_incoming,
so TunedYamux adopts each stream (stock or inbound) into TunedYamuxStream as it hands it out
(open_stream / accept_stream): the object, its state and its buffers are unchanged, only its
class is ours. Upstream fix: a `stream_class` attribute (or `_new_stream(stream_id, is_initiator)`
method) used by both open_stream and handle_incoming.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ClassVar, cast

import trio
from libp2p.abc import IMuxedStream, ISecureConn
from libp2p.peer.id import ID
from libp2p.stream_muxer.exceptions import MuxedStreamError
from libp2p.stream_muxer.yamux import yamux as _yamux
from libp2p.stream_muxer.yamux.yamux import (
    HEADER_SIZE,
    MAX_WINDOW_SIZE,
    TYPE_DATA,
    YAMUX_HEADER_FORMAT,
    Yamux,
    YamuxStream,
)

from node.net.transport.locks import QuickLock, take
from node.net.transport.noise import BatchedNoiseSession, Bytes

STOCK_FRAME_BYTES = _yamux.MAX_MESSAGE_SIZE  # py-libp2p's DATA frame size (64 KiB), read, never changed
WRITE_BATCH_BYTES = 4 * 1024 * 1024  # most stream bytes one write hands to the session at once
_PACK_HEADER = struct.Struct(YAMUX_HEADER_FORMAT).pack


class Gather(tuple[Bytes, ...]):
    """Buffers a TunedYamuxStream.write sends back to back, as if joined (see node.net.transport.io)."""


def _slices(views: list[memoryview], start: int, stop: int, out: list[Bytes]) -> None:
    """Append to out the pieces of the concatenation of views covering [start, stop)."""
    pos = 0
    for v in views:
        end = pos + len(v)
        if end > start:
            out.append(v[max(start - pos, 0) : min(stop - pos, len(v))])
            if end >= stop:
                return
        pos = end


class TunedYamuxStream(YamuxStream):
    """A YamuxStream of a TunedYamux connection (made by TunedYamuxStream.adopt)."""

    conn: TunedYamux

    @classmethod
    def adopt(cls, stream: YamuxStream) -> TunedYamuxStream:
        """Make a stream of a TunedYamux connection a TunedYamuxStream (same object and state)."""
        if isinstance(stream, TunedYamuxStream):
            return stream
        stream.__class__ = cls
        assert isinstance(stream, TunedYamuxStream)
        stream._window_event = None
        return stream

    _window_event: trio.Event | None  # set while a writer waits for a window update

    # The send window: the same integer stock code reads and writes, plus a wake-up for a writer
    # waiting on it (stock polls every 10 ms). Stored under its stock name in the instance dict.
    @property
    def send_window(self) -> int:
        value: int = self.__dict__["send_window"]
        return value

    @send_window.setter
    def send_window(self, value: int) -> None:
        self.__dict__["send_window"] = value
        event = self.__dict__.get("_window_event")
        if event is not None and value > 0:
            event.set()

    async def _wait_send_window(self) -> None:
        """Wait until the peer opens the send window (MuxedStreamError after window_wait_s, as stock)."""
        wait_s, poll_s = self.conn.window_wait_s, self.conn.window_poll_s
        with trio.move_on_after(wait_s) as scope:
            while self.send_window <= 0 and not self.closed:
                self._window_event = trio.Event()
                try:
                    with trio.move_on_after(poll_s):  # a reset/close sets no event: look again this often
                        await self._window_event.wait()
                finally:
                    self._window_event = None
        if scope.cancelled_caught:
            raise MuxedStreamError(f"Timed out waiting for window update after {wait_s:g} seconds.")

    async def write(self, data: bytes) -> None:
        """Stock write's frames, window accounting and errors; all available window in one session write.

        `data` may be a Gather of buffers, sent back to back without being joined.
        """
        if self.send_closed:
            raise MuxedStreamError("Stream is closed for sending")
        if isinstance(data, Gather):
            views = [v for v in (memoryview(p).cast("B") for p in data) if len(v)]
        else:
            views = [memoryview(data).cast("B")]
        total = sum(len(v) for v in views)
        frame_payload = max(1, self.conn.frame_bytes - HEADER_SIZE)
        sent = 0
        writer_lock = self.rw_lock._writer_lock  # what rw_lock.write_lock() holds
        while sent < total:
            await take(writer_lock)
            try:
                if self.send_closed:
                    raise MuxedStreamError("Stream is closed for sending")
                await take(self.window_lock)
                try:
                    if self.closed:
                        raise MuxedStreamError("Stream is closed")
                    n = min(self.send_window, total - sent, WRITE_BATCH_BYTES)
                    if n > 0:
                        self.send_window -= n
                finally:
                    self.window_lock.release()
            finally:
                writer_lock.release()
            if n <= 0:
                await self._wait_send_window()
                continue
            parts: list[Bytes] = []
            end = sent + n
            for start in range(sent, end, frame_payload):
                stop = min(start + frame_payload, end)
                parts.append(_PACK_HEADER(0, TYPE_DATA, 0, self.stream_id, stop - start))
                if len(views) == 1:
                    parts.append(views[0][start:stop])
                else:
                    _slices(views, start, stop, parts)
            await self.conn.write_parts(parts, n + HEADER_SIZE * -(-n // frame_payload))
            sent = end

    async def _auto_tune_and_send_window_update(self, *, bytes_read: int = 0) -> None:
        """go-yamux hysteresis: a WINDOW_UPDATE only once the reader consumed half the target window.

        Stock's growth (GrowTo + the RTT auto-tune epoch). A sender is never stalled by it: its
        window is at least half the target until the update.
        """
        increment = 0
        await take(self.window_lock)
        try:
            buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
            consumed = self.target_recv_window - (self.recv_window + buffered)
            if consumed > 0 and consumed >= self.target_recv_window // self.conn.update_divisor:
                increment = self._grow_to_delta(buffered) + self._apply_autotune_epoch(buffered)
        finally:
            self.window_lock.release()
        if increment > 0:
            await self.send_window_update(increment, skip_lock=True)

    async def grow_receive_window(self, size: int) -> None:
        """Let the peer send up to `size` unread bytes at once (no-op if the window is already that large)."""
        if not 0 < size <= MAX_WINDOW_SIZE:
            raise ValueError(f"receive window must be within [1, {MAX_WINDOW_SIZE}], got {size}")
        if size <= self.target_recv_window:
            return
        await take(self.window_lock)
        try:
            grow = size - self.recv_window
            self.target_recv_window = size
            self.recv_window = size
        finally:
            self.window_lock.release()
        if grow > 0:
            await self.send_window_update(grow)

    async def take_buffer(self, n: int) -> bytearray | None:
        """The stream's whole receive buffer, handed over (not copied), if it holds 1..n bytes.

        An empty buffer is waited for the way read_stream waits (the stream's event, set when data,
        a close or a reset arrives). Returns None where stock read must decide (closed, reset,
        shutting down, more than n bytes buffered): the caller then reads the stock way. Same bytes,
        window accounting and window update as stock read_stream; one copy of every byte less.
        """
        conn = self.conn
        sid = self.stream_id
        buf = conn.stream_buffers.get(sid)
        for _ in range(2):  # an event already set by data taken earlier wakes at once: wait once more
            if buf or buf is None or self.closed or self.recv_closed or self.reset_received:
                break
            event = conn.stream_events.get(sid)
            if event is None:
                break
            await event.wait()
            conn.stream_events[sid] = trio.Event()  # as read_stream does after its wait
            buf = conn.stream_buffers.get(sid)
        if (buf and len(buf) <= n and not self.closed and not self.reset_received and sid in conn.streams
                and not conn.event_shutting_down.is_set()):
            conn.stream_buffers[sid] = bytearray()
            await self._auto_tune_and_send_window_update(bytes_read=len(buf))
            return buf
        return None


class TunedYamux(Yamux):
    """py-libp2p's Yamux with the per-frame work cut (module docstring). Use `TunedYamux.configured(...)`."""

    frame_bytes: ClassVar[int] = 256 * 1024  # payload + header bytes of each DATA frame sent
    window_wait_s: ClassVar[float] = 5.0  # a writer out of send window gives up after this long (stock: 5 s)
    window_poll_s: ClassVar[float] = 0.01  # a blocked writer checks for a closed stream this often

    @classmethod
    def configured(cls, frame_bytes: int, window_wait_s: float = 5.0) -> type[TunedYamux]:
        """A TunedYamux subclass with these settings, for one host's muxer_opt."""
        if not 1024 <= frame_bytes <= MAX_WINDOW_SIZE:
            raise ValueError(f"yamux frame_bytes must be within [1024, {MAX_WINDOW_SIZE}], got {frame_bytes}")
        if window_wait_s <= 0:
            raise ValueError(f"window_wait_s must be > 0, got {window_wait_s}")
        attrs: dict[str, Any] = {"frame_bytes": frame_bytes, "window_wait_s": window_wait_s}
        return type(f"{cls.__name__}_{frame_bytes}", (cls,), attrs)

    def __init__(self, secured_conn: ISecureConn, peer_id: ID, is_initiator: bool | None = None,
                 on_close: Callable[[], Awaitable[Any]] | None = None) -> None:
        super().__init__(secured_conn, peer_id, is_initiator, on_close)
        # taken for every received frame and every stream read / every frame written
        self.streams_lock = cast(trio.Lock, QuickLock(self.streams_lock))
        self._write_lock = cast(trio.Lock, QuickLock(self._write_lock))
        # stock reads these from the environment for every frame / every read; read once here
        self.update_divisor = _yamux._yamux_batch_threshold_divisor()
        self.data_timeout_s = _yamux._yamux_data_read_timeout()
        self._session = secured_conn if isinstance(secured_conn, BatchedNoiseSession) else None

    async def write_parts(self, parts: Sequence[Bytes], size: int) -> None:
        """_write_frame(b"".join(parts)) without the join where the session allows it."""
        async with self._write_lock:
            if self._session is not None:
                await self._session.write_parts(parts, size)
            else:
                await self.secured_conn.write(b"".join(parts))

    async def open_stream(self) -> TunedYamuxStream:
        return TunedYamuxStream.adopt(await super().open_stream())

    async def accept_stream(self) -> IMuxedStream:
        stream = await super().accept_stream()
        return TunedYamuxStream.adopt(stream) if isinstance(stream, YamuxStream) else stream

    async def _read_data_body(self, length: int) -> bytes:
        """A DATA body: taken at once if the session already decrypted it, else read under stock's timeout."""
        session = self._session
        if session is None:
            return await super()._read_data_body(length)
        body = session.take_decrypted(length)
        if body is not None:
            return body
        with trio.fail_after(self.data_timeout_s):
            return await session.read_exactly(length)
