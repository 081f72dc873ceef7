"""Kept-open streams of one request/response protocol, per peer (keep-alive for libp2p streams).

Opening a stream costs py-libp2p's multistream-select negotiation: the client writes the multistream header
and waits for its echo, then the protocol id and waits for its echo, two round trips before the first request
byte. On the emulated WAN (100 ms round trip) a `/pmn/avg` push of a 14 kB bundle took 0.33 s, 3.3 round
trips. A request on a stream kept open from an earlier one costs one round trip.

`StreamPool.request(info, exchange)` runs `exchange(stream)` (write a request, read its answer) on an idle
stream to that peer when one is kept, else on a new one. On success the stream goes back to the pool (up to
`max_idle_per_peer` per peer; `exchange` says whether its stream may be reused); on a failure it is reset. A
kept stream can have been closed by the server meanwhile (its keep-alive ran out, the connection died): a
failure on a kept stream is retried once on a new stream, so requests must be idempotent. `request_once` is
the same exchange on a stream of its own, closed afterwards.

The server side holds a stream open between requests for its own keep-alive (`AvgLimits.keepalive_s` for
`/pmn/avg`); the pool drops streams idle for `idle_s`, below it, rather than reuse one the server is closing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

from node.net.gate import close_quietly, reset_quietly

T = TypeVar("T")
Exchange = Callable[[Any], Awaitable[tuple[T, bool]]]  # stream -> (result, whether the stream may be reused)


@dataclass
class StreamPoolConfig:
    """How many streams a pool keeps and for how long."""

    max_idle_per_peer: int = 4  # streams kept open to one peer between requests (concurrent requests beyond
    # them open more, closed once done)
    idle_s: float = 20.0  # a kept stream unused this long is closed, not reused (below the server's keep-alive,
    # `AvgLimits.keepalive_s`, so a request rarely meets a stream the server is closing)

    def validate(self) -> StreamPoolConfig:
        """Raise ValueError naming a bad field; return self."""
        if isinstance(self.max_idle_per_peer, bool) or not isinstance(self.max_idle_per_peer, int) \
                or self.max_idle_per_peer < 0:
            raise ValueError(f"StreamPoolConfig.max_idle_per_peer={self.max_idle_per_peer!r}: must be an integer >= 0")
        if not self.idle_s > 0:
            raise ValueError(f"StreamPoolConfig.idle_s={self.idle_s!r}: must be > 0")
        return self


DISCARD_TIMEOUT_S = 1.0  # bound on resetting a stream whose exchange was cancelled (shielded from the cancel)


async def _discard(stream: Any) -> None:
    """Reset a stream whose exchange failed or was cancelled (the reset itself shielded, and bounded)."""
    with trio.CancelScope(shield=True), trio.move_on_after(DISCARD_TIMEOUT_S):
        await reset_quietly(stream)


async def _on_new_stream(host: Any, info: Any, protocol: Any, exchange: Exchange[T]) -> tuple[T, bool, Any]:
    """`exchange` on a new stream to `info`'s peer: its result, whether the stream may be reused, the stream (reset
    when the exchange failed)."""
    await host.connect(info)
    stream = await host.new_stream(info.peer_id, [protocol])
    try:
        result, reuse = await exchange(stream)
    except BaseException:
        await _discard(stream)
        raise
    return result, reuse, stream


async def request_once(host: Any, info: Any, protocol: Any, exchange: Exchange[T]) -> T:
    """`exchange` on a new stream to `info`'s peer, closed afterwards (reset when the exchange failed)."""
    result, _, stream = await _on_new_stream(host, info, protocol, exchange)
    await close_quietly(stream)
    return result


class StreamPool:
    """Idle streams of one protocol, kept per peer between requests (see the module doc)."""

    def __init__(self, host: Any, protocol: Any, cfg: StreamPoolConfig | None = None) -> None:
        self.host = host
        self.protocol = protocol
        self.cfg = (cfg or StreamPoolConfig()).validate()
        self._idle: dict[str, list[tuple[float, Any]]] = {}  # peer id -> (time it went idle, stream), oldest first
        self.opened = 0  # new streams this pool opened that answered their first request
        self.reused = 0  # requests that ran on a kept stream
        self.retried = 0  # requests retried on a new stream after their kept stream failed

    def _take(self, peer: str) -> tuple[Any | None, list[Any]]:
        """The newest idle stream to `peer` (None: none), and every stream idle longer than `idle_s`, to any peer
        (peers that left included), to close."""
        now = trio.current_time()
        stale = []
        for p in list(self._idle):
            fresh = [(t, s) for t, s in self._idle[p] if now - t <= self.cfg.idle_s]
            stale += [s for t, s in self._idle[p] if now - t > self.cfg.idle_s]
            if fresh:
                self._idle[p] = fresh
            else:
                del self._idle[p]
        kept = self._idle.get(peer, [])
        stream = kept.pop()[1] if kept else None
        if not kept:
            self._idle.pop(peer, None)
        return stream, stale

    async def _release(self, peer: str, stream: Any, reuse: bool) -> None:
        """After a successful exchange: keep the stream for the next request (room and `reuse` permitting), else
        close it (reset it when the exchange said it may not be reused: the server resets a refused request's)."""
        kept = self._idle.setdefault(peer, [])
        if reuse and len(kept) < self.cfg.max_idle_per_peer:
            kept.append((trio.current_time(), stream))
            return
        if not kept:
            del self._idle[peer]
        await (close_quietly(stream) if reuse else reset_quietly(stream))

    async def request(self, info: Any, exchange: Exchange[T]) -> T:
        """`exchange` on a kept stream to `info`'s peer, else (or after a kept stream failed) on a new one."""
        peer = info.peer_id.pretty()
        stream, stale = self._take(peer)
        for old in stale:
            await close_quietly(old)
        if stream is not None:
            try:
                result, reuse = await exchange(stream)
            except Exception:  # the server closed it meanwhile, or the connection died: once more, on a new one
                await _discard(stream)
                self.retried += 1
            except BaseException:
                await _discard(stream)
                raise
            else:
                self.reused += 1
                await self._release(peer, stream, reuse)
                return result
        result, reuse, stream = await _on_new_stream(self.host, info, self.protocol, exchange)
        self.opened += 1
        await self._release(peer, stream, reuse)
        return result

    async def close(self) -> None:
        """Close every kept stream."""
        idle, self._idle = self._idle, {}
        for kept in idle.values():
            for _, stream in kept:
                await close_quietly(stream)
