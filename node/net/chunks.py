"""Taking exact byte counts off a queue of received chunks, copying each byte at most once.

Shared by the channel's frame reader and the batched Noise session (node.net.transport.noise).
"""

from __future__ import annotations

from collections import deque


def take_chunks(chunks: deque[bytes | bytearray], offset: int, n: int) -> tuple[bytes, int]:
    """The next `n` bytes of `chunks` (whose first `offset` bytes were already taken) and the new offset.

    Whole chunks consumed are popped; the caller guarantees at least `n` bytes are queued. A request
    that is exactly one whole `bytes` chunk returns it without a copy; otherwise the pieces are
    joined once.
    """
    if n == 0:
        return b"", offset
    first = chunks[0]
    if len(first) - offset >= n:
        if offset == 0 and n == len(first):
            out = first if isinstance(first, bytes) else bytes(first)
        else:
            out = bytes(memoryview(first)[offset : offset + n])
        offset += n
        if offset == len(first):
            chunks.popleft()
            offset = 0
        return out, offset
    parts: list[bytes | bytearray | memoryview] = []
    need = n
    while need:
        first = chunks[0]
        rest = len(first) - offset
        if rest <= need:
            parts.append(memoryview(first)[offset:] if offset else first)
            chunks.popleft()
            offset = 0
            need -= rest
        else:
            parts.append(memoryview(first)[offset : offset + need])
            offset += need
            need = 0
    return b"".join(parts), offset
