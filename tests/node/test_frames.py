"""Wire frame encoding: round trips and every rejection path."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.errors import (
    BadMagicError,
    ChecksumError,
    CodecMismatchError,
    DtypeMismatchError,
    FrameTooLargeError,
    ShapeMismatchError,
    SpecHashMismatchError,
    TruncatedFrameError,
    UnknownKindError,
    UnsupportedVersionError,
)
from node.wire import frames

SPEC_HASH = bytes(range(32))
SPEC = frames.FrameSpec(
    spec_hash=SPEC_HASH, codec=frames.CodecId.DENSE, microbatch_size=2, seq_len=4, d_model=8,
    bytes_per_token=32, id_bytes=2, max_frame_bytes=4096,
)


def _activation(**kw: object) -> bytes:
    args: dict = dict(
        payload=b"\x01" * SPEC.payload_len, window=b"\x02" * SPEC.window_len, codec=frames.CodecId.DENSE,
        dtype=frames.Dtype.FLOAT32, shape=SPEC.shape,
    )
    args.update(kw)
    return frames.encode_frame(frames.Kind.ACTIVATION, SPEC_HASH, 0, 3, 1, **args)


@given(
    kind=st.sampled_from(list(frames.Kind)),
    stage=st.integers(0, 2**16 - 1),
    step=st.integers(0, 2**64 - 1),
    mb=st.integers(0, 2**32 - 1),
    payload=st.binary(max_size=200),
    window=st.binary(max_size=50),
    sig=st.binary(max_size=70),
    shape=st.lists(st.integers(0, 2**32 - 1), max_size=4),
)
def test_roundtrip(kind, stage, step, mb, payload, window, sig, shape) -> None:
    raw = frames.encode_frame(kind, SPEC_HASH, stage, step, mb, payload=payload, window=window,
                         signature=sig, shape=tuple(shape))
    fr = frames.decode_frame(raw, max_frame_bytes=10_000)
    assert (fr.header.kind, fr.header.stage, fr.header.step, fr.header.microbatch) == (kind, stage, step, mb)
    assert (fr.payload, fr.window, fr.signature) == (payload, window, sig)
    assert fr.header.shape == tuple(shape)
    assert len(raw) == frames.HEADER_SIZE + fr.header.body_len


@given(data=st.binary(min_size=frames.HEADER_SIZE, max_size=frames.HEADER_SIZE))
def test_random_headers_never_crash(data: bytes) -> None:
    from node.errors import FrameError

    try:
        h = frames.decode_header(data, max_frame_bytes=1 << 20)
    except FrameError as exc:
        assert str(exc)
    else:
        assert h.body_len + frames.HEADER_SIZE <= 1 << 20


def test_random_header_errors_are_frame_errors() -> None:
    from node.errors import FrameError

    with pytest.raises(FrameError):
        frames.decode_header(b"\xff" * frames.HEADER_SIZE, 1 << 20)


def test_valid_activation_passes_spec_check() -> None:
    fr = frames.decode_frame(_activation(), SPEC.max_frame_bytes)
    frames.check_data_header(fr.header, SPEC)


def test_too_large_rejected_from_header_alone() -> None:
    raw = _activation(payload=b"\x00" * 5000)
    with pytest.raises(FrameTooLargeError, match="maximum is 4096"):
        frames.decode_header(raw[: frames.HEADER_SIZE], SPEC.max_frame_bytes)


@pytest.mark.parametrize(
    ("kw", "exc"),
    [
        (dict(shape=(2, 4, 9)), ShapeMismatchError),
        (dict(payload=b"\x00" * 10), ShapeMismatchError),
        (dict(window=b"\x00" * 3), ShapeMismatchError),
        (dict(dtype=frames.Dtype.FLOAT16), DtypeMismatchError),
        (dict(codec=frames.CodecId.INT8, dtype=frames.Dtype.INT8), CodecMismatchError),
    ],
)
def test_spec_checks(kw: dict, exc: type[Exception]) -> None:
    fr = frames.decode_frame(_activation(**kw), SPEC.max_frame_bytes)
    with pytest.raises(exc):
        frames.check_data_header(fr.header, SPEC)


def test_spec_hash_mismatch_names_both() -> None:
    raw = frames.encode_frame(frames.Kind.HELLO, b"\x07" * 32, 0, 0, 0)
    h = frames.decode_header(raw, 4096)
    with pytest.raises(SpecHashMismatchError) as ei:
        frames.check_spec_hash(h, SPEC_HASH)
    assert "07" * 32 in str(ei.value) and SPEC_HASH.hex() in str(ei.value)


def test_bad_magic_version_kind() -> None:
    raw = bytearray(_activation())
    with pytest.raises(BadMagicError):
        frames.decode_header(b"XXXX" + bytes(raw[4:]), 1 << 20)
    raw[4] = 9
    with pytest.raises(UnsupportedVersionError, match="version 9"):
        frames.decode_header(bytes(raw), 1 << 20)
    raw[4] = frames.VERSION
    raw[5] = 200
    with pytest.raises(UnknownKindError):
        frames.decode_header(bytes(raw), 1 << 20)


def test_truncated_and_corrupt_body() -> None:
    raw = _activation()
    with pytest.raises(TruncatedFrameError):
        frames.decode_frame(raw[:-5], 1 << 20)
    with pytest.raises(TruncatedFrameError):
        frames.decode_header(raw[:10], 1 << 20)
    bad = bytearray(raw)
    bad[-1] ^= 0xFF
    with pytest.raises(ChecksumError):
        frames.decode_frame(bytes(bad), 1 << 20)


def test_encode_rejects_bad_fields() -> None:
    with pytest.raises(ValueError, match="spec_hash"):
        frames.encode_frame(frames.Kind.HELLO, b"short", 0, 0, 0)
    with pytest.raises(ValueError, match="out of range"):
        frames.encode_frame(frames.Kind.HELLO, SPEC_HASH, 70000, 0, 0)


def test_verify_digest_accepts_memoryviews_and_names_the_frame() -> None:
    payload, window = bytes(range(256)) * 5, b"\x01\x02" * 9
    h = frames.FrameHeader(kind=frames.Kind.GRADIENT, spec_hash=SPEC_HASH, stage=2, step=9, microbatch=4,
                      payload_len=len(payload), window_len=len(window), digest=frames.digest(window, payload))
    # verify_digest is annotated `bytes` but takes any buffer (what this test checks): hence the ignore
    frames.verify_digest(h, memoryview(window), memoryview(payload))  # type: ignore[arg-type]
    with pytest.raises(ChecksumError, match="checksum mismatch in gradient frame step 9 mb 4"):
        frames.verify_digest(h, window, payload[:-1] + b"\x00")
