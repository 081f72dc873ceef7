"""Bulk reads and gathered writes on a libp2p stream: tuned where its muxer is TunedYamux, stock otherwise."""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

from libp2p.abc import INetStream
from libp2p.network.stream.net_stream import StreamState

from node.net.transport.noise import Bytes
from node.net.transport.yamux import Gather, TunedYamuxStream


def tuned_stream(stream: INetStream) -> TunedYamuxStream | None:
    """The TunedYamuxStream under a libp2p stream, or None for any other muxer (a stock host's)."""
    muxed = getattr(stream, "muxed_stream", None)
    return muxed if isinstance(muxed, TunedYamuxStream) else None


async def write_gather(stream: INetStream, parts: Iterable[Bytes]) -> None:
    """stream.write(b"".join(parts)); on a tuned stream without the join (one write, no copy)."""
    if tuned_stream(stream) is not None:
        # NetStream.write passes the object through to the muxed stream's write, which takes a Gather
        await stream.write(cast(bytes, Gather(parts)))
    else:
        await stream.write(b"".join(parts))


async def read_some(stream: INetStream, n: int) -> bytes | bytearray:
    """stream.read(n) for bulk readers: at most n bytes, at least one (EOF/reset raise as stream.read does).

    On an open tuned stream the muxer's buffer itself is handed over (a bytearray the caller now
    owns) instead of a bytes copy of it; anything else goes through stream.read(n).
    """
    muxed = tuned_stream(stream)
    if muxed is not None and getattr(stream, "_state", None) is StreamState.OPEN:
        buf = await muxed.take_buffer(n)
        if buf is not None:
            return buf
    data: bytes = await stream.read(n)
    return data


async def grow_receive_window(stream: INetStream, size: int) -> None:
    """Let the peer send up to `size` unread bytes on this stream at once (tuned streams; stock: no-op).

    py-libp2p starts every stream at 256 KiB and grows it slowly; a sender whose window is
    exhausted waits for an update, which caps throughput. Credits already bound what a sender may
    have in flight, so the window can be large.
    """
    muxed = tuned_stream(stream)
    if muxed is not None:
        await muxed.grow_receive_window(size)
