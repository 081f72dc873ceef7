"""take_chunks: exact takes off a chunk queue equal slicing the concatenated stream."""

from __future__ import annotations

from collections import deque

from hypothesis import given
from hypothesis import strategies as st

from node.net.chunks import take_chunks


@given(st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=12),
       st.lists(st.integers(min_value=0, max_value=60), max_size=20), st.booleans())
def test_takes_equal_slices_of_the_stream(parts: list[bytes], sizes: list[int], as_bytearray: bool) -> None:
    stream = b"".join(parts)
    chunks: deque[bytes | bytearray] = deque(bytearray(p) if as_bytearray else p for p in parts)
    offset = pos = 0
    for n in sizes:
        n = min(n, len(stream) - pos)
        out, offset = take_chunks(chunks, offset, n)
        assert isinstance(out, bytes) and out == stream[pos : pos + n]
        pos += n
        assert sum(len(c) for c in chunks) - offset == len(stream) - pos  # nothing lost or read twice
