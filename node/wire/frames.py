"""Wire frames of `/pmn/act/1.0.0`: a fixed-size versioned header followed by a body.

Body layout: token window bytes | codec payload bytes | signature bytes. The header digest is
BLAKE3 over window + payload (the signature signs a receipt over that digest, so it is not
covered). BLAKE3 because every activation byte is hashed at both ends of every hop: it costs
0.23 CPU s/GiB here against sha256's 0.6 (with SHA-NI) and blake2b's 1.2, which keeps the hash
cheap enough to run on the event loop. Everything here is pure: no I/O, no torch.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from enum import IntEnum

from blake3 import blake3

from node.errors import (
    BadMagicError,
    ChecksumError,
    CodecMismatchError,
    DtypeMismatchError,
    FrameTooLargeError,
    ShapeMismatchError,
    SpecHashMismatchError,
    TruncatedFrameError,
    UnexpectedFrameError,
    UnknownKindError,
    UnsupportedVersionError,
)

MAGIC = b"PMNF"
VERSION = 2  # 2: BLAKE3 digests and HELLO bindings (1 had sha256 digests); a version-1 peer is refused by name
MAX_NDIM = 4
# magic, version, kind, flags, spec hash, stage, step, microbatch, codec, dtype, ndim, id dtype,
# shape[4], window_len, payload_len, sig_len, reserved, digest
_HEADER = struct.Struct(">4sBBH32sHQIBBBB4IIIHH32s")
HEADER_SIZE = _HEADER.size
DIGEST_SIZE = 32


class Kind(IntEnum):
    """What a frame carries."""

    HELLO = 1  # handshake: JSON payload (stage, num_stages, credits, address, next_step, binding)
    ACTIVATION = 2  # forward boundary hidden state of one microbatch + its token window
    GRADIENT = 3  # backward gradient w.r.t. the boundary hidden state of one microbatch
    ACK = 4  # acknowledges one accepted frame: payload = acked digest + countersignature
    CREDIT = 5  # grants `microbatch` more frames of credit to the other side
    ERROR = 6  # the sender rejected something; payload = UTF-8 message
    CLOSE = 7  # orderly end of the run (no more data frames will follow)
    LOSS = 8  # tail -> upstream: JSON payload with the step's loss (progress reporting)
    COMMIT = 9  # head -> downstream replicas: JSON payload {"step", "commit": [[mb, attempt], ...]}
    NORM = 10  # squared gradient norm of `step` for global-norm clipping: payload = float64 (big-endian);
    # microbatch field = NORM_PARTIAL (running sum of stages <= sender, downstream) or NORM_TOTAL (upstream),
    # or for the async schedule NORM_UP (running sum of stages >= sender, upstream) or NORM_DOWN (the total, downstream)
    EVAL = 11  # forward-only boundary hidden state of validation microbatch `microbatch` (+ its token window),
    # evaluated with the weights after update `step`; no gradient comes back and no receipt is signed


# kinds that travel forward (stage k -> k+1) with a token window
FORWARD_KINDS = (Kind.ACTIVATION, Kind.EVAL)


NORM_PARTIAL = 0  # NORM frame: sum over stages 0..sender, sent to the next stage
NORM_TOTAL = 1  # NORM frame: the whole model's squared norm, sent back towards stage 0
NORM_UP = 2  # NORM frame (async schedule): sum over stages sender..last, sent to the previous stage
NORM_DOWN = 3  # NORM frame (async schedule): the whole model's squared norm, sent from stage 0 towards the last
_NORM = struct.Struct(">d")


def encode_norm(value: float) -> bytes:
    """Payload of a NORM frame."""
    return _NORM.pack(value)


def decode_norm(payload: bytes) -> float:
    """A NORM payload's squared norm; UnexpectedFrameError unless it is 8 bytes of a finite float >= 0."""
    if len(payload) != _NORM.size:
        raise UnexpectedFrameError(f"norm frame payload of {len(payload)} bytes, expected {_NORM.size}")
    (value,) = _NORM.unpack(payload)
    if not (math.isfinite(value) and value >= 0):
        raise UnexpectedFrameError(f"norm frame carries {value!r}, not a finite squared norm >= 0")
    return float(value)


class CodecId(IntEnum):
    """Codec ids on the wire (names match sharding.codecs)."""

    NONE = 0
    DENSE = 1
    BF16 = 2
    INT8 = 3
    SUBSPACE = 4
    SUBSPACE_FP32 = 5
    SUBSPACE_INT8 = 6


class Dtype(IntEnum):
    """Element type of the codec payload."""

    NONE = 0
    FLOAT32 = 1
    BFLOAT16 = 2
    INT8 = 3
    FLOAT16 = 4
    UINT8 = 5


class IdDtype(IntEnum):
    """Element type of the token-id window (the byte after ndim; 0 was reserved, so version-2 peers send uint16)."""

    UINT16 = 0  # vocabularies of at most 65,536 tokens
    UINT32 = 1  # vocabularies of up to 2**32 tokens


ID_DTYPE_BYTES: dict[IdDtype, int] = {IdDtype.UINT16: 2, IdDtype.UINT32: 4}


def id_dtype_for(id_bytes: int) -> IdDtype:
    """The window element type of `id_bytes` bytes per token id (2 or 4); ValueError otherwise."""
    for dt, n in ID_DTYPE_BYTES.items():
        if n == id_bytes:
            return dt
    raise ValueError(f"id_bytes={id_bytes}: token ids travel as uint16 (2) or uint32 (4)")


CODEC_IDS: dict[str, CodecId] = {
    "dense": CodecId.DENSE,
    "bf16": CodecId.BF16,
    "int8": CodecId.INT8,
    "subspace": CodecId.SUBSPACE,
    "subspace-fp32": CodecId.SUBSPACE_FP32,
    "subspace-int8": CodecId.SUBSPACE_INT8,
}
CODEC_NAMES: dict[CodecId, str] = {v: k for k, v in CODEC_IDS.items()}
# dtype each codec puts on the wire (int8 carries per-row scales inside its payload, subspace sends bf16 z)
CODEC_DTYPES: dict[CodecId, Dtype] = {
    CodecId.DENSE: Dtype.FLOAT32,
    CodecId.BF16: Dtype.BFLOAT16,
    CodecId.INT8: Dtype.INT8,
    CodecId.SUBSPACE: Dtype.BFLOAT16,
    CodecId.SUBSPACE_FP32: Dtype.FLOAT32,
    CodecId.SUBSPACE_INT8: Dtype.INT8,
}


@dataclass(frozen=True)
class FrameHeader:
    """Decoded fixed-size header."""

    kind: Kind  # what the frame carries
    spec_hash: bytes  # 32-byte model spec hash of the sender
    stage: int  # sender's stage index
    step: int  # global training step
    microbatch: int  # microbatch index (CREDIT: number of credits granted)
    codec: CodecId = CodecId.NONE  # codec of the payload
    dtype: Dtype = Dtype.NONE  # element type of the payload
    shape: tuple[int, ...] = ()  # logical tensor shape (B, T, d) of data frames
    window_len: int = 0  # bytes of the (B, T+1) token-id window
    payload_len: int = 0  # bytes of the codec payload
    sig_len: int = 0  # bytes of the trailing signature
    digest: bytes = field(default=b"\x00" * DIGEST_SIZE)  # BLAKE3 of window + payload
    version: int = VERSION  # protocol version
    attempt: int = 0  # data frames: the head's attempt id of this (step, microbatch) (header flags field)
    id_dtype: IdDtype = IdDtype.UINT16  # element type of the token-id window (uint32 for vocab > 65536)

    @property
    def body_len(self) -> int:
        """Bytes following the header."""
        return self.window_len + self.payload_len + self.sig_len


@dataclass(frozen=True)
class Frame:
    """A header plus its body parts."""

    header: FrameHeader  # decoded header
    window: bytes = b""  # token-id window bytes
    payload: bytes = b""  # codec payload bytes
    signature: bytes = b""  # sender's signature (may be empty)


@dataclass(frozen=True)
class FrameSpec:
    """What data frames for one model must look like (derived from the model spec and codec)."""

    spec_hash: bytes  # 32-byte model spec hash both sides must share
    codec: CodecId  # the one codec used at stage boundaries
    microbatch_size: int  # B
    seq_len: int  # T
    d_model: int  # d
    bytes_per_token: int  # exact codec payload bytes per token
    id_bytes: int  # bytes per token id in the window (2 for vocab <= 65536, else 4)
    max_frame_bytes: int  # hard limit on header + body, checked before any body byte is read
    eval_batches: int = 0  # validation microbatches per evaluation this node takes as EVAL frames (0 = refuses them)
    local_windows: bool = False  # training ACTIVATION frames carry no token window: every stage reads the window of
    # (step, microbatch) from its own copy of the spec's dataset, and the header digest still covers it (a sender
    # whose data differs fails the receiver's digest check). EVAL frames always carry theirs.

    def carries_window(self, kind: Kind) -> bool:
        """Whether a frame of `kind` carries its token window in the body."""
        return kind in FORWARD_KINDS and not (self.local_windows and kind == Kind.ACTIVATION)

    @property
    def dtype(self) -> Dtype:
        """Payload dtype implied by the codec."""
        return CODEC_DTYPES[self.codec]

    @property
    def id_dtype(self) -> IdDtype:
        """Element type of the token-id window implied by the model's vocabulary."""
        return id_dtype_for(self.id_bytes)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(B, T, d) of every boundary tensor."""
        return (self.microbatch_size, self.seq_len, self.d_model)

    @property
    def payload_len(self) -> int:
        """Exact codec payload bytes of one microbatch."""
        return self.bytes_per_token * self.microbatch_size * self.seq_len

    @property
    def window_len(self) -> int:
        """Exact token window bytes of one microbatch."""
        return self.id_bytes * self.microbatch_size * (self.seq_len + 1)


def digest(*parts: bytes) -> bytes:
    """BLAKE3 (32 bytes) over the concatenation of `parts`."""
    h = blake3()
    for p in parts:
        h.update(p)
    return h.digest()


def encode_header(h: FrameHeader) -> bytes:
    """Pack a header into exactly HEADER_SIZE bytes (raises ValueError on out-of-range fields)."""
    if len(h.spec_hash) != 32:
        raise ValueError(f"spec_hash must be 32 bytes, got {len(h.spec_hash)}")
    if len(h.shape) > MAX_NDIM:
        raise ValueError(f"shape has {len(h.shape)} dims, at most {MAX_NDIM} allowed")
    shape = tuple(h.shape) + (0,) * (MAX_NDIM - len(h.shape))
    try:
        return _HEADER.pack(
            MAGIC, h.version, int(h.kind), h.attempt, h.spec_hash, h.stage, h.step, h.microbatch,
            int(h.codec), int(h.dtype), len(h.shape), int(h.id_dtype), *shape,
            h.window_len, h.payload_len, h.sig_len, 0, h.digest,
        )
    except struct.error as exc:
        raise ValueError(f"header field out of range: {exc}") from exc


def encode_frame(
    kind: Kind,
    spec_hash: bytes,
    stage: int,
    step: int,
    microbatch: int,
    *,
    payload: bytes = b"",
    window: bytes = b"",
    signature: bytes = b"",
    codec: CodecId = CodecId.NONE,
    dtype: Dtype = Dtype.NONE,
    shape: tuple[int, ...] = (),
    id_dtype: IdDtype = IdDtype.UINT16,
    window_in_body: bool = True,
) -> bytes:
    """Header + body bytes of one frame (the digest is computed here). `window_in_body=False`: the digest covers
    `window` but the body leaves it out (FrameSpec.local_windows: the receiver reads its own copy)."""
    body_window = window if window_in_body else b""
    header = FrameHeader(
        kind=kind, spec_hash=spec_hash, stage=stage, step=step, microbatch=microbatch, codec=codec,
        dtype=dtype, shape=shape, id_dtype=id_dtype, window_len=len(body_window), payload_len=len(payload),
        sig_len=len(signature), digest=digest(window, payload),
    )
    return b"".join((encode_header(header), body_window, payload, signature))


def decode_header(buf: bytes, max_frame_bytes: int) -> FrameHeader:
    """Unpack and sanity-check a header; the size limit is enforced here, before any body byte."""
    if len(buf) < HEADER_SIZE:
        raise TruncatedFrameError(f"header truncated: {len(buf)} of {HEADER_SIZE} bytes")
    (magic, version, kind, attempt, spec_hash, stage, step, mb, codec, dtype, ndim, id_dtype,
     s0, s1, s2, s3, window_len, payload_len, sig_len, _r1, dig) = _HEADER.unpack_from(buf)
    if magic != MAGIC:
        raise BadMagicError(f"bad magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise UnsupportedVersionError(f"unsupported frame version {version}, this node speaks {VERSION}")
    try:
        kind_e, codec_e, dtype_e, id_dtype_e = Kind(kind), CodecId(codec), Dtype(dtype), IdDtype(id_dtype)
    except ValueError as exc:
        raise UnknownKindError(f"unknown enum value in header: {exc}") from exc
    if ndim > MAX_NDIM:
        raise ShapeMismatchError(f"header declares {ndim} dims, at most {MAX_NDIM} allowed")
    total = HEADER_SIZE + window_len + payload_len + sig_len
    if total > max_frame_bytes:
        raise FrameTooLargeError(f"frame of {total} bytes declared, maximum is {max_frame_bytes}")
    return FrameHeader(
        kind=kind_e, spec_hash=spec_hash, stage=stage, step=step, microbatch=mb, codec=codec_e,
        dtype=dtype_e, shape=(s0, s1, s2, s3)[:ndim], window_len=window_len, payload_len=payload_len,
        sig_len=sig_len, digest=dig, version=version, attempt=attempt, id_dtype=id_dtype_e,
    )


def check_spec_hash(h: FrameHeader, expected: bytes) -> None:
    """Raise SpecHashMismatchError naming both hashes if they differ."""
    if h.spec_hash != expected:
        raise SpecHashMismatchError(
            f"model spec hash mismatch: peer has 0x{h.spec_hash.hex()}, we have 0x{expected.hex()}"
        )


def check_data_header(h: FrameHeader, spec: FrameSpec) -> None:
    """Check an ACTIVATION/GRADIENT header against the model spec (before reading its body)."""
    check_spec_hash(h, spec.spec_hash)
    if h.codec != spec.codec:
        raise CodecMismatchError(f"frame codec {h.codec.name.lower()}, model uses {spec.codec.name.lower()}")
    if h.dtype != spec.dtype:
        raise DtypeMismatchError(f"frame dtype {h.dtype.name.lower()}, codec sends {spec.dtype.name.lower()}")
    if h.kind == Kind.EVAL:
        check_eval_header(h, spec)
    if h.kind in FORWARD_KINDS and h.id_dtype != spec.id_dtype:
        raise DtypeMismatchError(f"frame token ids {h.id_dtype.name.lower()}, the model's vocabulary travels as "
                                 f"{spec.id_dtype.name.lower()}")
    if tuple(h.shape) != spec.shape:
        raise ShapeMismatchError(f"frame shape {tuple(h.shape)}, model expects {spec.shape}")
    if h.payload_len != spec.payload_len:
        raise ShapeMismatchError(f"payload of {h.payload_len} bytes, shape implies {spec.payload_len}")
    want_window = spec.window_len if spec.carries_window(h.kind) else 0
    if h.window_len != want_window:
        why = ""
        if h.kind == Kind.ACTIVATION and spec.local_windows:
            why = (": this node reads training windows from the spec's dataset (local_windows); start the sender "
                   "from the same spec with its [data] section")
        elif h.kind == Kind.ACTIVATION and h.window_len == 0:
            why = (": the sender reads training windows from a dataset (local_windows) and this node has none; "
                   "start it from the spec with its [data] section")
        raise ShapeMismatchError(f"token window of {h.window_len} bytes, expected {want_window}{why}")


def check_eval_header(h: FrameHeader, spec: FrameSpec) -> None:
    """An EVAL frame is taken only by a node that evaluates, within its validation microbatches, unsigned."""
    if spec.eval_batches < 1:
        raise UnexpectedFrameError("eval frame refused: this node runs no evaluation (runtime.eval_every = 0, "
                                   "or a schedule that evaluates on /pmn/eval)")
    if h.microbatch >= spec.eval_batches:
        raise UnexpectedFrameError(f"eval frame for validation microbatch {h.microbatch}; evaluations have "
                                   f"{spec.eval_batches}")
    if h.sig_len:
        raise UnexpectedFrameError(f"eval frame carries a {h.sig_len}-byte signature: evaluation hops are not "
                                   "receipted")


def verify_digest(h: FrameHeader, window: bytes, payload: bytes) -> None:
    """Raise ChecksumError unless BLAKE3(window + payload) equals the header's digest."""
    if digest(window, payload) != h.digest:
        raise ChecksumError(f"checksum mismatch in {h.kind.name.lower()} frame step {h.step} mb {h.microbatch}")


def split_body(h: FrameHeader, body: bytes, local_window: bytes | None = None) -> Frame:
    """Split a complete body, verifying its length and digest. `local_window`: the receiver's own copy of the
    token window of a frame whose body carries none (FrameSpec.local_windows), checked by the digest."""
    if len(body) != h.body_len:
        raise TruncatedFrameError(f"body truncated: {len(body)} of {h.body_len} bytes")
    w_end = h.window_len
    p_end = w_end + h.payload_len
    window, payload, sig = body[:w_end], body[w_end:p_end], body[p_end:]
    if local_window is not None and not w_end:
        window = local_window
    verify_digest(h, window, payload)
    return Frame(header=h, window=window, payload=payload, signature=sig)


def decode_frame(buf: bytes, max_frame_bytes: int, local_window: bytes | None = None) -> Frame:
    """Decode one complete frame from bytes (header checks, then body; `local_window` as in split_body)."""
    h = decode_header(buf[:HEADER_SIZE], max_frame_bytes)
    return split_body(h, buf[HEADER_SIZE:], local_window)
