"""Length-prefixed JSON messages on a libp2p stream, shared by the audit and inference protocols.

A message is `u32 header length | JSON header | u32 body length | body` (big-endian lengths). Each
length is checked against the reader's limit before a byte of that part is read, and every failure
raises the caller's own error class (AuditError, InferenceError, ...) naming what was wrong.
"""

from __future__ import annotations

import json
import struct
from typing import Any

_LEN = struct.Struct(">I")
READ_CHUNK = 1 << 20  # most bytes asked of the stream per read call


async def read_exact(stream: Any, n: int, error: type[Exception]) -> bytes:
    """Exactly `n` bytes from `stream`; `error` when it ends first."""
    parts: list[bytes] = []
    have = 0
    while have < n:
        try:
            chunk = await stream.read(min(n - have, READ_CHUNK))
        except EOFError:
            chunk = b""
        if not chunk:
            raise error(f"stream closed after {have} of {n} bytes")
        parts.append(chunk)
        have += len(chunk)
    return b"".join(parts)


async def write_message(stream: Any, header: dict[str, Any], body: bytes = b"") -> None:
    """Send one message in a single stream write."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    await stream.write(_LEN.pack(len(raw)) + raw + _LEN.pack(len(body)) + body)


async def read_message(stream: Any, max_bytes: int, error: type[Exception]) -> tuple[dict[str, Any], bytes]:
    """Receive one message whose header is an object with a string "type".

    A header or body longer than `max_bytes` raises `error` before that part is read."""
    (hlen,) = _LEN.unpack(await read_exact(stream, 4, error))
    if hlen > max_bytes:
        raise error(f"header of {hlen} bytes exceeds the limit of {max_bytes}")
    try:
        header = json.loads(await read_exact(stream, hlen, error))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"malformed message header: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise error("malformed message header: expected an object with a string 'type'")
    (blen,) = _LEN.unpack(await read_exact(stream, 4, error))
    if blen > max_bytes:
        raise error(f"body of {blen} bytes exceeds the limit of {max_bytes}")
    return header, await read_exact(stream, blen, error)
