"""Process-wide py-libp2p transport tuning for bulk activation traffic.

py-libp2p spends its time on per-frame Python work, not on encryption (see shared/FACTS.md).
Two knobs cut the number of frames and syscalls without changing anything on the wire:

* yamux DATA frames of `yamux_frame_bytes` (default 256 KiB instead of 64 KiB) on send;
  receivers accept frames up to the 16 MiB window, so peers need no change;
* buffered TCP reads: the Noise reader asks for a 2-byte length, then the body, each one a
  `recv` syscall and several trio checkpoints; reading up to `tcp_read_bytes` at once and
  serving later reads from that buffer gives the same bytes with far fewer syscalls;
* batched Noise writes: a write larger than one Noise message is still cut into <= 65535-byte
  length-prefixed encrypted messages in order, but they go to the socket in one write instead of
  one write (lock, checkpoint, syscall) each. Same bytes on the wire.
"""

from __future__ import annotations

import trio
from libp2p.io import trio as _io_trio
from libp2p.io.exceptions import ConnectionClosedError
from libp2p.security.noise import io as _noise_io
from libp2p.stream_muxer.yamux import yamux as _yamux

_original_read = _io_trio.TrioTCPStream.read
_original_noise_write = _noise_io.NoiseTransportReadWriter.write_msg
_state = {"tcp_read_bytes": 0}


async def _buffered_read(self: _io_trio.TrioTCPStream, n: int | None = None) -> bytes:
    """TrioTCPStream.read with a per-connection read-ahead buffer (same semantics: up to n bytes)."""
    if n is not None and n == 0:
        return b""
    buf: bytearray | None = getattr(self, "_pmn_buf", None)
    if buf:
        take = len(buf) if n is None else min(n, len(buf))
        out = bytes(buf[:take])
        del buf[:take]
        return out
    async with self.read_lock:
        want = max(n or 0, _state["tcp_read_bytes"])
        try:
            data = await self.stream.receive_some(want)
        except trio.BrokenResourceError as error:
            raise ConnectionClosedError(f"TCP connection reset by remote peer: {error}", transport="tcp") from error
        except trio.ClosedResourceError:
            return b""
    if n is None or len(data) <= n:
        return bytes(data)
    self._pmn_buf = bytearray(data[n:])  # type: ignore[attr-defined]
    return bytes(data[:n])


async def _batched_noise_write(self: _noise_io.NoiseTransportReadWriter, msg: bytes, prefix_encoded: bool = False) -> None:
    """NoiseTransportReadWriter.write_msg that sends all Noise messages of one write at once."""
    limit = _noise_io.MAX_PLAINTEXT_LENGTH
    if len(msg) <= limit or prefix_encoded:
        await _original_noise_write(self, msg, prefix_encoded)
        return
    view = memoryview(msg)
    parts = []
    for start in range(0, len(msg), limit):
        enc = self.encrypt(bytes(view[start : start + limit]))
        parts.append(len(enc).to_bytes(_noise_io.SIZE_NOISE_MESSAGE_LEN, "big"))
        parts.append(enc)
    await self.read_writer.read_write_closer.write(b"".join(parts))


def apply_transport_tuning(yamux_frame_bytes: int = 256 * 1024, tcp_read_bytes: int = 1 << 20) -> None:
    """Install the tuning in this process (idempotent). tcp_read_bytes=0 restores plain reads and writes."""
    if not 1024 <= yamux_frame_bytes <= _yamux.MAX_WINDOW_SIZE:
        raise ValueError(f"yamux_frame_bytes must be within [1024, {_yamux.MAX_WINDOW_SIZE}], got {yamux_frame_bytes}")
    if tcp_read_bytes < 0:
        raise ValueError(f"tcp_read_bytes must be >= 0, got {tcp_read_bytes}")
    _yamux.MAX_MESSAGE_SIZE = yamux_frame_bytes
    _state["tcp_read_bytes"] = tcp_read_bytes
    _io_trio.TrioTCPStream.read = _buffered_read if tcp_read_bytes else _original_read  # type: ignore[method-assign]
    batched = _batched_noise_write if tcp_read_bytes else _original_noise_write
    _noise_io.NoiseTransportReadWriter.write_msg = batched  # type: ignore[method-assign,assignment]
