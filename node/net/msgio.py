"""Length-prefixed messages on a libp2p stream, bounded before a byte is buffered.

Two framings share these readers:
* `u32 header length | JSON header | u32 body length | body` (audit, inference): `read_header` then
  `read_body`, so a handler can authorize the peer from the header before a body byte is read;
* `u32 length | JSON` (announcements, the headers of averaging and state messages): `read_json`.

Every length is checked against `MessageLimits` before that part is read; the JSON is size- and
depth-bounded before it is parsed (`node.net.jsonbound`); every read waits at most `idle_timeout_s`
for the next bytes. Failures raise the caller's own error class naming what was wrong.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

import trio

from node.net.jsonbound import loads_bounded

_LEN = struct.Struct(">I")
READ_CHUNK = 1 << 20  # most bytes asked of the stream per read call
CLEAN_END = "stream closed before the next message"  # the error text when a stream ends between messages


def is_clean_end(exc: BaseException) -> bool:
    """True when `exc` says the stream ended between two messages (the peer closed it: not a fault)."""
    return str(exc) == CLEAN_END


@dataclass
class MessageLimits:
    """What one protocol accepts in one message (checked before the part is read or parsed)."""

    max_header_bytes: int = 64 * 1024  # longest JSON header, checked on its length prefix
    max_body_bytes: int = 8 * 1024 * 1024  # longest body, checked on its length prefix
    max_depth: int = 8  # deepest JSON nesting accepted (scanned before json.loads)
    idle_timeout_s: float = 30.0  # longest wait for the next bytes of a stream (slow-loris / idle streams)

    def validate(self) -> MessageLimits:
        """Raise ValueError naming a bad field."""
        if self.max_header_bytes < 64 or self.max_body_bytes < 0:
            raise ValueError("MessageLimits: max_header_bytes must be >= 64 and max_body_bytes >= 0")
        if not 1 <= self.max_depth <= 64:
            raise ValueError(f"MessageLimits.max_depth={self.max_depth}: must be within [1, 64]")
        if not self.idle_timeout_s > 0:
            raise ValueError(f"MessageLimits.idle_timeout_s={self.idle_timeout_s}: must be > 0")
        return self


async def read_exact(stream: Any, n: int, error: type[Exception], idle_timeout_s: float | None = None) -> bytes:
    """Exactly `n` bytes from `stream`; `error` when it ends first or stays silent for `idle_timeout_s`."""
    parts: list[bytes] = []
    have = 0
    while have < n:
        try:
            if idle_timeout_s is None:
                chunk = await stream.read(min(n - have, READ_CHUNK))
            else:
                with trio.fail_after(idle_timeout_s):
                    chunk = await stream.read(min(n - have, READ_CHUNK))
        except EOFError:
            chunk = b""
        except trio.TooSlowError:
            raise error(f"stream idle for more than {idle_timeout_s} s after {have} of {n} bytes") from None
        if not chunk:
            raise error(f"stream closed after {have} of {n} bytes" if have or n != 4 else CLEAN_END)
        parts.append(chunk)
        have += len(chunk)
    return b"".join(parts)


async def read_length(stream: Any, limit: int, error: type[Exception], idle_timeout_s: float | None,
                      what: str) -> int:
    """A u32 length prefix, `error` when it exceeds `limit` (nothing of the part is read then)."""
    (n,) = _LEN.unpack(await read_exact(stream, 4, error, idle_timeout_s))
    if n > limit:
        raise error(f"{what} of {n} bytes exceeds the limit of {limit}")
    return int(n)


async def read_json(stream: Any, limits: MessageLimits, error: type[Exception], what: str = "message") -> Any:
    """One `u32 length | JSON` message, size- and depth-bounded (any JSON value)."""
    n = await read_length(stream, limits.max_header_bytes, error, limits.idle_timeout_s, what)
    raw = await read_exact(stream, n, error, limits.idle_timeout_s)
    return loads_bounded(raw, limits.max_header_bytes, limits.max_depth, error, what)


async def write_json(stream: Any, obj: Any, tail: bytes = b"") -> None:
    """Send one `u32 length | JSON` message (and `tail`, raw bytes after it) in a single write."""
    raw = json.dumps(obj, separators=(",", ":")).encode()
    await stream.write(_LEN.pack(len(raw)) + raw + tail)


async def write_message(stream: Any, header: dict[str, Any], body: bytes = b"") -> None:
    """Send one header + body message in a single stream write."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    await stream.write(_LEN.pack(len(raw)) + raw + _LEN.pack(len(body)) + body)


async def read_header(stream: Any, limits: MessageLimits, error: type[Exception]) -> tuple[dict[str, Any], int]:
    """The header (an object with a string "type") and the declared body length, body not read.

    The body length is checked against `limits.max_body_bytes` here; the caller reads the body with
    `read_body` once it decided the body is wanted, or refuses it unread."""
    header = await read_json(stream, limits, error, "message header")
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise error("malformed message header: expected an object with a string 'type'")
    blen = await read_length(stream, limits.max_body_bytes, error, limits.idle_timeout_s, "message body")
    return header, blen


async def read_body(stream: Any, n: int, limits: MessageLimits, error: type[Exception]) -> bytes:
    """The `n`-byte body announced by `read_header`."""
    return await read_exact(stream, n, error, limits.idle_timeout_s) if n else b""


async def read_message(stream: Any, max_bytes: int | MessageLimits, error: type[Exception]
                       ) -> tuple[dict[str, Any], bytes]:
    """Receive one header + body message (client side: replies whose body the caller always wants).

    `max_bytes` (an int) bounds the header and the body alike; a MessageLimits bounds each part."""
    limits = max_bytes if isinstance(max_bytes, MessageLimits) else MessageLimits(
        max_header_bytes=min(max_bytes, 1 << 20), max_body_bytes=max_bytes, max_depth=16, idle_timeout_s=3600.0)
    header, blen = await read_header(stream, limits, error)
    return header, await read_body(stream, blen, limits, error)


def field(header: dict[str, Any], key: str, kind: type | tuple[type, ...], error: type[Exception]) -> Any:
    """`header[key]` when it has type `kind` (a bool is never an int here), else `error` naming the field."""
    value = header.get(key)
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        value = None
    if not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise error(f"field '{key}' must be of type {names}, got {type(value).__name__}")
    return value


def int_field(header: dict[str, Any], key: str, lo: int, hi: int, error: type[Exception]) -> int:
    """An integer field within [lo, hi] (`error` naming the field and the range otherwise)."""
    value = field(header, key, int, error)
    if not lo <= value <= hi:
        raise error(f"field '{key}' must be within [{lo}, {hi}], got {value}")
    return int(value)
