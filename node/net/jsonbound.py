"""JSON parsing bounded in size and nesting depth, independent of Python's recursion limit.

`json.loads` recurses in C once per nesting level; with the recursion limit raised (py_ecc sets it to
100,000) a deeply nested message overflows the C stack and kills the process. `nesting_depth_at_most`
checks the nesting with a few linear regex passes (no recursion, no per-byte Python loop) before
`json.loads` ever sees the bytes.
"""

from __future__ import annotations

import json
import re
from typing import Any

_ESCAPE = re.compile(rb"\\.", re.DOTALL)  # one escape sequence inside a string (removed first)
_STRING = re.compile(rb'"[^"]*"')  # a string once its escapes are gone
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")  # bytes deleted before counting nesting
_PAIR = re.compile(rb"\[\]|\{\}")  # an innermost pair of brackets


def nesting_depth_at_most(raw: bytes, max_depth: int) -> bool:
    """True when the brackets of `raw` (outside strings) nest at most `max_depth` deep and balance.

    Each pass removes every innermost `[]` / `{}` pair, so `d` passes empty a document of depth `d`;
    unbalanced or mismatched brackets never empty and count as too deep. Linear per pass, C speed."""
    s = _STRING.sub(b"", _ESCAPE.sub(b"", raw)).translate(None, _NOT_BRACKET)
    if re.search(rb"[\[{]{%d}" % (max_depth + 1), s):  # a run of openers deeper than allowed: no passes needed
        return False
    for _ in range(max_depth):
        if not s:
            return True
        shorter = _PAIR.sub(b"", s)
        if len(shorter) == len(s):
            return False
        s = shorter
    return not s


def loads_bounded(raw: bytes, max_bytes: int, max_depth: int, error: type[Exception], what: str = "message") -> Any:
    """`json.loads(raw)` once `raw` is at most `max_bytes` long and nests at most `max_depth` deep.

    Anything else (too long, too deep, not UTF-8, not JSON, a number too long to convert) raises
    `error` naming the problem."""
    if len(raw) > max_bytes:
        raise error(f"{what} of {len(raw)} bytes exceeds the limit of {max_bytes}")
    if not nesting_depth_at_most(raw, max_depth):
        raise error(f"{what} nests deeper than {max_depth} levels (or its brackets do not balance)")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise error(f"malformed {what}: {str(exc)[:200]}") from None
