"""Locks taken without a schedule point when they are free.

`async with trio.Lock()` yields to the scheduler even when the lock is free; a small yamux write
passes several locks (about 10 scheduler turns per small message). These take a free lock
synchronously and only wait when it is held. Every write still reaches the socket's send, which is
a checkpoint, so cancellation works as before.
"""

from __future__ import annotations

from typing import Any

import trio


async def take(lock: trio.Lock | trio.Semaphore) -> None:
    """Acquire `lock`: at once if it is free, else wait for it as lock.acquire() does."""
    try:
        lock.acquire_nowait()
    except trio.WouldBlock:
        await lock.acquire()


class QuickLock:
    """A trio.Lock whose `async with` takes it without a schedule point when it is free.

    Wraps an existing lock (which other holders may keep using: it is the same lock); any other
    attribute is the wrapped lock's.
    """

    __slots__ = ("_lock",)

    def __init__(self, lock: trio.Lock) -> None:
        self._lock = lock

    @property
    def lock(self) -> trio.Lock:
        """The wrapped trio.Lock."""
        return self._lock

    async def __aenter__(self) -> None:
        await take(self._lock)

    async def __aexit__(self, *exc_info: object) -> None:
        self._lock.release()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lock, name)
