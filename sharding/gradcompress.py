"""Compression of replica gradient contributions (pure math, no I/O).

A stage's trainable parameters travel as one flat fp32 vector (their concatenation in a fixed
order). A *layout* knows their shapes; a compressed contribution is again one flat fp32 vector, the
*wire vector*, of a size fixed by the layout and the method, so that a receiver can check it before
reading it and every replica decodes it to the same dense gradient.

* PowerSGD (Vogels et al. 2019), one power iteration per contribution: each matrix-shaped gradient
  M (m x n, trailing dims flattened) with r (m + n) < m n becomes P (m x r, orthonormal columns) and
  Q = M^T P (n x r); the receiver rebuilds P Q^T. Q is warm-started from the sender's previous Q of
  that parameter; vectors (norm gains) travel dense. Error feedback: what the approximation missed is
  added to the sender's next contribution.
* int8 or int4 factors (optional): each column of P and of Q, and each dense vector, travels as int8
  codes (or 4-bit codes, two to a byte) with one bf16 absmax scale, half (a quarter) of the bytes of
  bf16 factors; the sender's error feedback absorbs the rounding, as it absorbs the low-rank
  approximation.
* Top-k with error feedback: the k largest-magnitude entries of gradient + error, as (values,
  indices) in the wire vector (indices as exact float32 integers, so stages up to 2**24 values).
* DiLoCo outer step (Douillard et al. 2023): replicas run H inner optimizer steps alone, then average
  their parameter deltas; `OuterNesterov` applies the averaged delta with Nesterov momentum.

Every decoder validates its input (size, finiteness, index range) and raises `GradCompressError`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import ShardingError

METHODS = ("dense", "powersgd", "topk")  # per-contribution encodings (DiLoCo is a schedule, see OuterNesterov)
MAX_TOPK_SIZE = 1 << 24  # largest vector top-k can index (float32 holds integers exactly up to 2**24)


class GradCompressError(ShardingError):
    """A compressed contribution does not fit the layout, or holds non-finite values or bad indices."""


@dataclass(frozen=True)
class Entry:
    """One parameter inside the flat vector."""

    offset: int  # first index in the flat dense vector
    numel: int  # values of the parameter
    rows: int  # matrix view: first dimension (numel for a vector)
    cols: int  # matrix view: product of the other dimensions (1 for a vector)
    wire_offset: int  # first index of its encoding in the PowerSGD wire vector
    compressed: bool  # True: P (rows x rank) then Q (cols x rank); False: the values themselves
    rank: int = 0  # columns of P and Q when compressed (0 for a dense entry)


@dataclass(frozen=True)
class PowerSGDLayout:
    """Where each parameter sits in the dense vector and in the rank-`rank` wire vector."""

    rank: int  # r: columns of P and Q of every matrix `build`'s `ranks` gives no rank of its own
    entries: tuple[Entry, ...]  # one per parameter, in flat order (each compressed one with its rank)
    size: int  # values of the dense vector
    wire_size: int  # values of the wire vector

    @classmethod
    def build(cls, shapes: list[tuple[int, ...]], rank: int,
              ranks: Sequence[int | None] | None = None) -> PowerSGDLayout:
        """Layout of parameters with `shapes` (in flat order); a matrix is compressed at rank r when
        r (m + n) < m n. ranks: one entry per shape, a rank of its own or None for `rank` (e.g. a higher rank
        for the matrices Muon orthogonalises)."""
        per = list(ranks) if ranks is not None else [None] * len(shapes)
        if len(per) != len(shapes):
            raise GradCompressError(f"PowerSGD ranks has {len(per)} entries for {len(shapes)} parameters")
        for r in (rank, *(x for x in per if x is not None)):
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                raise GradCompressError(f"PowerSGD rank must be an integer >= 1, got {r!r}")
        entries = []
        off = woff = 0
        for shape, own in zip(shapes, per, strict=True):
            r = rank if own is None else own
            numel = math.prod(shape)
            rows, cols = (shape[0], numel // shape[0]) if len(shape) >= 2 and shape[0] > 0 else (numel, 1)
            compressed = len(shape) >= 2 and r * (rows + cols) < numel
            entries.append(Entry(off, numel, rows, cols, woff, compressed, r if compressed else 0))
            off += numel
            woff += r * (rows + cols) if compressed else numel
        return cls(rank, tuple(entries), off, woff)

    @property
    def ratio(self) -> float:
        """Dense values per wire value."""
        return self.size / max(1, self.wire_size)

    @property
    def scale_count(self) -> int:
        """Scales of an int8 wire vector: one per column of P and of Q, one per dense vector."""
        return sum(2 * e.rank if e.compressed else 1 for e in self.entries)

    def blocks(self, wire: torch.Tensor) -> list[torch.Tensor]:
        """Views of `wire` (wire_size values) as the 2-D blocks int8 scales apply to, column by column:
        P (rows x rank) and Q (cols x rank) of a compressed entry, (numel x 1) of a dense one."""
        out = []
        for e in self.entries:
            if e.compressed:
                r = e.rank
                q0 = e.wire_offset + e.rows * r
                out += [wire[e.wire_offset: q0].view(e.rows, r), wire[q0: q0 + e.cols * r].view(e.cols, r)]
            else:
                out.append(wire[e.wire_offset: e.wire_offset + e.numel].view(e.numel, 1))
        return out


def check_finite(wire: torch.Tensor, size: int, what: str) -> None:
    """GradCompressError unless `wire` is a flat vector of `size` finite values."""
    if wire.dim() != 1 or wire.numel() != size:
        raise GradCompressError(f"{what} has shape {tuple(wire.shape)}, expected ({size},)")
    if not bool(torch.isfinite(wire).all()):
        bad = int((~torch.isfinite(wire)).sum())
        raise GradCompressError(f"{what} holds {bad} non-finite value(s) (NaN/Inf)")


def orthonormalize(p: torch.Tensor) -> torch.Tensor:
    """Columns of `p` made orthonormal (reduced QR with a fixed sign, so the result is deterministic)."""
    q, r = torch.linalg.qr(p, mode="reduced")
    sign = torch.sign(torch.diagonal(r))
    sign[sign == 0] = 1.0
    return q * sign


def powersgd_decode(layout: PowerSGDLayout, wire: torch.Tensor) -> torch.Tensor:
    """Dense fp32 vector of a PowerSGD wire vector (GradCompressError on a wrong size or NaN/Inf)."""
    check_finite(wire, layout.wire_size, f"PowerSGD rank-{layout.rank} contribution")
    w = wire.to(torch.float32)
    out = torch.empty(layout.size, dtype=torch.float32)
    for e in layout.entries:
        if e.compressed:
            r = e.rank
            p = w[e.wire_offset: e.wire_offset + e.rows * r].reshape(e.rows, r)
            q = w[e.wire_offset + e.rows * r: e.wire_offset + r * (e.rows + e.cols)].reshape(e.cols, r)
            out[e.offset: e.offset + e.numel] = (p @ q.T).reshape(-1)
        else:
            out[e.offset: e.offset + e.numel] = w[e.wire_offset: e.wire_offset + e.numel]
    return out


CODE_MAX = {8: 127, 4: 7}  # bits of a factor code -> its largest value (codes are symmetric: -max .. max)


def _code_max(bits: int) -> int:
    """Largest code of `bits`-bit factors (GradCompressError unless bits is 8 or 4)."""
    if type(bits) is not int or bits not in CODE_MAX:
        raise GradCompressError(f"PowerSGD factor codes must have 8 or 4 bits, got {bits!r}")
    return CODE_MAX[bits]


def quantize_factors(layout: PowerSGDLayout, wire: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """`bits`-bit codes (an int8 tensor of wire_size values in -max .. max, max = 127 or 7) and bf16-exact fp32
    scales (scale_count) of a finite fp32 wire vector: each column's values divided by its absmax / max, rounded
    to the nearest code."""
    top = _code_max(bits)
    check_finite(wire, layout.wire_size, f"PowerSGD rank-{layout.rank} wire vector")
    values = wire.to(torch.float32).clone()
    scales = []
    for block in layout.blocks(values):
        scale = (block.abs().amax(0) / top).to(torch.bfloat16).to(torch.float32)  # (columns,)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        block.copy_((block / safe).round().clamp(-top, top))
        scales.append(scale)
    return values.to(torch.int8), torch.cat(scales)


def dequantize_factors(layout: PowerSGDLayout, codes: torch.Tensor, scales: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """The fp32 wire vector of `bits`-bit `codes` (an int8 tensor) and their column `scales` (GradCompressError on
    wrong sizes, a code outside -max .. max, or a scale that is negative, NaN or Inf)."""
    top = _code_max(bits)
    what = f"int{bits} PowerSGD rank-{layout.rank}"
    if codes.dtype != torch.int8 or codes.dim() != 1 or codes.numel() != layout.wire_size:
        raise GradCompressError(f"{what} codes have shape {tuple(codes.shape)} and dtype {codes.dtype}, "
                                f"expected ({layout.wire_size},) int8")
    check_finite(scales, layout.scale_count, f"{what} scales")
    if bool((scales < 0).any()):
        raise GradCompressError(f"{what} scales hold {int((scales < 0).sum())} negative value(s)")
    outside = (codes < -top) | (codes > top)
    if bool(outside.any()):
        raise GradCompressError(f"{what} codes hold {int(outside.sum())} value(s) outside -{top} .. {top} "
                                f"(e.g. {int(codes[outside][0])})")
    return _scaled(layout, codes, scales)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes (int8 values in -8 .. 7) packed two to a byte, the first in the low nibble: ceil(n / 2)
    uint8 values (an odd count ends with a zero high nibble)."""
    n = codes.numel()
    u = (codes.reshape(-1).to(torch.int16) & 0xF).to(torch.uint8)
    if n % 2:
        u = torch.cat([u, torch.zeros(1, dtype=torch.uint8)])
    return u[0::2] | (u[1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, count: int) -> torch.Tensor:
    """The first `count` 4-bit codes of `packed` (uint8, two to a byte, low nibble first) as int8 values in
    -8 .. 7 (GradCompressError when `packed` is not uint8 or holds fewer than `count` codes)."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or 2 * packed.numel() < count:
        raise GradCompressError(f"packed 4-bit codes have shape {tuple(packed.shape)} and dtype {packed.dtype}, "
                                f"expected at least ({(count + 1) // 2},) uint8")
    nibbles = torch.stack([packed & 0xF, packed >> 4], dim=1).reshape(-1)[:count].to(torch.int8)  # 0 .. 15
    return torch.where(nibbles > 7, nibbles - 16, nibbles).to(torch.int8)


def _scaled(layout: PowerSGDLayout, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The fp32 wire vector of checked int8 `codes` times their column `scales`."""
    wire = codes.to(torch.float32)
    off = 0
    for block in layout.blocks(wire):
        block.mul_(scales[off: off + block.shape[1]].to(torch.float32))
        off += block.shape[1]
    return wire


class PowerSGDEncoder:
    """One sender's PowerSGD state: error-feedback buffer and warm-start Q of each matrix."""

    def __init__(self, layout: PowerSGDLayout, seed: int = 0, error_feedback: bool = True,
                 wire_dtype: torch.dtype = torch.float32, iterations: int = 1) -> None:
        if type(iterations) is not int or iterations < 1:
            raise GradCompressError(f"PowerSGD power iterations must be an integer >= 1, got {iterations!r}")
        self.layout = layout
        self.iterations = iterations  # power iterations per matrix and contribution (more: nearer the best rank-r
        # approximation, same bytes; the sender encodes alone, so iterations cost compute, not round trips)
        self.wire_dtype = wire_dtype  # precision the wire vector travels in (the error buffer absorbs the rounding)
        self.error_feedback = error_feedback  # keep what the approximation missed for the next contribution
        self.error = torch.zeros(layout.size)  # residual of the previous contributions
        g = torch.Generator().manual_seed(seed)
        self.q: dict[int, torch.Tensor] = {  # entry index -> warm-start Q (cols x rank)
            i: torch.randn(e.cols, e.rank, generator=g) for i, e in enumerate(layout.entries) if e.compressed}

    def encode(self, grad: torch.Tensor) -> torch.Tensor:
        """Wire vector of `grad` (+ the error buffer); the error buffer and warm starts are updated."""
        g = self._with_error(grad)
        wire = self._factors(g).to(self.wire_dtype).to(torch.float32)
        if self.error_feedback:
            self.error = g - powersgd_decode(self.layout, wire)
        return wire

    def encode_quantized(self, grad: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
        """`bits`-bit codes and column scales of `grad` (+ the error buffer), see quantize_factors; the error
        buffer (which then holds the rounding too) and warm starts are updated."""
        g = self._with_error(grad)
        codes, scales = quantize_factors(self.layout, self._factors(g), bits)
        if self.error_feedback:
            self.error = g - powersgd_decode(self.layout, _scaled(self.layout, codes, scales))  # ours: unchecked
        return codes, scales

    def _with_error(self, grad: torch.Tensor) -> torch.Tensor:
        """`grad` as fp32 plus the error buffer (GradCompressError on a wrong shape)."""
        if grad.dim() != 1 or grad.numel() != self.layout.size:
            raise GradCompressError(f"gradient has shape {tuple(grad.shape)}, expected ({self.layout.size},)")
        return grad.detach().to(torch.float32) + (self.error if self.error_feedback else 0.0)

    def _factors(self, g: torch.Tensor) -> torch.Tensor:
        """The fp32 wire vector of `g`: `iterations` warm-started power iterations per matrix (updates the warm
        starts)."""
        lay = self.layout
        wire = torch.empty(lay.wire_size, dtype=torch.float32)
        for i, e in enumerate(lay.entries):
            r = e.rank
            block = g[e.offset: e.offset + e.numel]
            if not e.compressed:
                wire[e.wire_offset: e.wire_offset + e.numel] = block
                continue
            m = block.reshape(e.rows, e.cols)
            q = self.q[i]
            for _ in range(self.iterations):
                p = orthonormalize(m @ q)
                q = m.T @ p
            if bool(torch.isfinite(q).all()) and float(q.norm()) > 0:
                self.q[i] = q  # warm start of the next power iteration
            wire[e.wire_offset: e.wire_offset + e.rows * r] = p.reshape(-1)
            wire[e.wire_offset + e.rows * r: e.wire_offset + r * (e.rows + e.cols)] = q.reshape(-1)
        return wire


def topk_wire_size(size: int, fraction: float) -> int:
    """Wire values of a top-k contribution keeping `fraction` of `size` entries: 2 k."""
    if not 0 < fraction <= 1:
        raise GradCompressError(f"top-k fraction must be in (0, 1], got {fraction!r}")
    if size > MAX_TOPK_SIZE:
        raise GradCompressError(f"top-k indexes at most {MAX_TOPK_SIZE} values, the vector has {size}")
    return 2 * max(1, math.ceil(size * fraction))


def topk_decode(wire: torch.Tensor, size: int, fraction: float) -> torch.Tensor:
    """Dense vector of a top-k wire vector [values | indices] (GradCompressError on bad size, values or indices)."""
    n = topk_wire_size(size, fraction)
    check_finite(wire, n, "top-k contribution")
    k = n // 2
    vals, idx_f = wire[:k].to(torch.float32), wire[k:]
    if bool((idx_f != idx_f.round()).any()) or bool((idx_f < 0).any()) or bool((idx_f >= size).any()):
        raise GradCompressError(f"top-k contribution holds indices outside [0, {size}) or non-integers")
    idx = idx_f.to(torch.int64)
    if int(torch.unique(idx).numel()) != k:
        raise GradCompressError("top-k contribution repeats an index")
    out = torch.zeros(size, dtype=torch.float32)
    out[idx] = vals
    return out


class TopKEncoder:
    """One sender's top-k state: the error-feedback buffer."""

    def __init__(self, size: int, fraction: float, error_feedback: bool = True) -> None:
        self.size = size  # values of the dense vector
        self.fraction = fraction  # share of entries kept per contribution
        self.wire_size = topk_wire_size(size, fraction)
        self.error_feedback = error_feedback
        self.error = torch.zeros(size)

    def encode(self, grad: torch.Tensor) -> torch.Tensor:
        """Wire vector [values | indices] of the k largest |grad + error| entries; the error buffer is updated."""
        if grad.dim() != 1 or grad.numel() != self.size:
            raise GradCompressError(f"gradient has shape {tuple(grad.shape)}, expected ({self.size},)")
        g = grad.detach().to(torch.float32) + (self.error if self.error_feedback else 0.0)
        k = self.wire_size // 2
        idx = torch.topk(g.abs(), k, sorted=False).indices.sort().values
        vals = g[idx]
        if self.error_feedback:
            self.error = g.clone()
            self.error[idx] = 0.0
        return torch.cat([vals, idx.to(torch.float32)])


class OuterNesterov:
    """DiLoCo's outer optimizer: SGD with Nesterov momentum on the averaged outer delta.

    delta = theta_start - mean(theta_replica) (a pseudo-gradient); v <- mu v + delta;
    theta <- theta_start - lr (delta + mu v).
    """

    def __init__(self, size: int, lr: float = 0.7, momentum: float = 0.9) -> None:
        if not lr > 0 or not 0 <= momentum < 1:
            raise GradCompressError(f"outer lr must be > 0 and momentum in [0, 1), got {lr!r}, {momentum!r}")
        self.lr = lr  # outer learning rate
        self.momentum = momentum  # outer Nesterov momentum
        self.v = torch.zeros(size)  # momentum buffer

    def step(self, start: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """New flat parameters from the outer-round start and the averaged delta (GradCompressError on NaN/Inf)."""
        check_finite(delta, self.v.numel(), "outer delta")
        self.v = self.momentum * self.v + delta
        return start - self.lr * (delta + self.momentum * self.v)
