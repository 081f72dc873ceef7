"""PowerSGD with a code that is linear across replicas: the all-reduce form of Vogels et al. (2019).

The node's PowerSGD (`gradcompress.PowerSGDEncoder`) factorises each replica's gradient on its own: every
replica has its own Q, so the sum of r contributions is a rank-(r x rank) matrix that no single contribution's
bytes can carry. A reduce-scatter to shard owners followed by an all-gather of their sums (the sharded exchange
`pmn simulate wan --collective sharded` models) then saves nothing. Here every replica projects on the *same*
Q, so what the replicas send is linear in their gradients and a sum of contributions is again one contribution:

    round 1  P_i = M_i Q           (m x r, each replica i; M_i its gradient plus its error feedback)
             P   = mean_i P_i      (an all-reduce: linear)
             P^  = orthonormalize(P)   (identical on every replica)
    round 2  Q_i = M_i^T P^        (n x r)
             Q'  = mean_i Q_i      (an all-reduce: linear)
    result   P^ Q'^T, the same on every replica; Q' warm-starts the next step's Q

Vectors (norm gains) travel dense in round 1. Each replica's error feedback keeps what its own share missed:
M_i - P^ Q_i^T as it sent Q_i (and, for a vector, its values less what it sent), so the replicas' errors average to
what the step missed of the mean gradient. Keeping M_i - P^ Q'^T instead (the mean's approximation, as PyTorch's
`powerSGD_hook` does) puts each replica's distance from the mean into its error too; measured here with Muon
(`benchmarks/wan_averaging.py --math`, wide model, 600 steps, rank 12 int4, seed 0) it trained to 1.2916 where
the replica's own share gave 1.1510 (the node's PowerSGD 1.1208, dense bf16 1.0987).

The bytes per replica are one wire vector of the layout, split over two rounds (P and the dense values, then Q);
what each round sends is rounded as a contribution is (bf16, or int8 / int4 codes with a bf16 scale per column),
and the mean once more, as a shard owner would send it back.

Two things the node's form does not need: two round trips per step instead of one push, and a Q every replica
agrees on (from a shared seed, then the previous step's Q'). The math is here so that its loss can be measured
(`benchmarks/wan_averaging.py --math --exchange step --methods dense,powersgd-shared-int4`); the node does not send it.
Measured there (session 28, wide model, 600 steps, rank 12, int4) it trains worse than the node's code at the same
bytes per replica on every seed: loss over dense bf16 1.102 against 1.024 with Muon (median of 4 seeds), 1.030
against 0.990 with AdamW (3 seeds); the table is in that script's docstring.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .gradcompress import (
    GradCompressError,
    PowerSGDLayout,
    check_finite,
    dequantize_factors,
    orthonormalize,
    powersgd_decode,
    quantize_factors,
)

SHARED_BITS = (16, 8, 4)  # what a round's values travel as: bf16, or int8 / int4 codes with a bf16 scale per column


def round_trip(layout: PowerSGDLayout, wire: torch.Tensor, bits: int) -> torch.Tensor:
    """`wire` (a finite fp32 wire vector of `layout`) as a receiver decodes it after it travelled in `bits`."""
    if bits == 16:
        check_finite(wire, layout.wire_size, f"PowerSGD rank-{layout.rank} wire vector")
        return wire.to(torch.bfloat16).to(torch.float32)
    codes, scales = quantize_factors(layout, wire, bits)
    return dequantize_factors(layout, codes, scales, bits)


class SharedPowerSGD:
    """One replica group's shared PowerSGD state: the common warm-start Q of each matrix and every replica's
    error-feedback buffer (in one process, for measuring; a node would hold its own buffer and the common Q)."""

    def __init__(self, layout: PowerSGDLayout, replicas: int, seed: int = 0, bits: int = 16) -> None:
        if type(replicas) is not int or replicas < 1:
            raise GradCompressError(f"shared PowerSGD needs an integer number of replicas >= 1, got {replicas!r}")
        if bits not in SHARED_BITS:
            raise GradCompressError(f"shared PowerSGD rounds travel in one of {SHARED_BITS} bits, got {bits!r}")
        self.layout = layout  # where each parameter sits in the dense and the wire vector
        self.bits = bits  # what each round's values travel as (16: bf16)
        self.errors = [torch.zeros(layout.size) for _ in range(replicas)]  # replica -> what it has not yet sent
        g = torch.Generator().manual_seed(seed)  # the seed every replica of the stage agrees on
        self.q: dict[int, torch.Tensor] = {  # entry index -> the common warm-start Q (cols x rank)
            i: torch.randn(e.cols, e.rank, generator=g) for i, e in enumerate(layout.entries) if e.compressed}

    @property
    def replicas(self) -> int:
        """Replicas in the group."""
        return len(self.errors)

    def step(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """The mean of the replicas' `grads` (one flat fp32 gradient each, in replica order) as every replica
        decodes it after the two rounds; the error buffers and the common Q are updated."""
        lay = self.layout
        if len(grads) != self.replicas:
            raise GradCompressError(f"shared PowerSGD step got {len(grads)} gradients for {self.replicas} replicas")
        ms = []
        for i, g in enumerate(grads):
            if g.dim() != 1 or g.numel() != lay.size:
                raise GradCompressError(f"replica {i}'s gradient has shape {tuple(g.shape)}, expected ({lay.size},)")
            ms.append(g.detach().to(torch.float32) + self.errors[i])
        firsts = [round_trip(lay, self._project(m), self.bits) for m in ms]  # P_i and the vectors, as sent
        first = round_trip(lay, torch.stack(firsts).mean(0), self.bits)  # their mean, as its owners send it back
        p_hat = {i: orthonormalize(self._p(first, i)) for i in self.q}
        seconds = [round_trip(lay, self._back_project(m, p_hat), self.bits) for m in ms]  # Q_i, as sent
        second = round_trip(lay, torch.stack(seconds).mean(0), self.bits)  # Q'
        mean = powersgd_decode(lay, self._assemble(first, p_hat, second))
        self.errors = [m - powersgd_decode(lay, self._assemble(f, p_hat, q)) for m, f, q in zip(ms, firsts, seconds,
                                                                                                 strict=True)]
        for i, e in enumerate(lay.entries):
            if e.compressed:
                q0 = e.wire_offset + e.rows * e.rank
                q = second[q0: q0 + e.cols * e.rank].reshape(e.cols, e.rank)
                if float(q.norm()) > 0:
                    self.q[i] = q.clone()  # the next step's common warm start
        return mean

    def _assemble(self, first: torch.Tensor, p_hat: dict[int, torch.Tensor], second: torch.Tensor) -> torch.Tensor:
        """The wire vector P^ and Q of each matrix (Q from round 2's `second`), the vectors from round 1's `first`."""
        out = first.clone()
        for i, e in enumerate(self.layout.entries):
            if e.compressed:
                p0, q0 = e.wire_offset, e.wire_offset + e.rows * e.rank
                out[p0: q0] = p_hat[i].reshape(-1)
                out[q0: q0 + e.cols * e.rank] = second[q0: q0 + e.cols * e.rank]
        return out

    def _p(self, wire: torch.Tensor, i: int) -> torch.Tensor:
        """Entry `i`'s P block (rows x rank) of a wire vector."""
        e = self.layout.entries[i]
        return wire[e.wire_offset: e.wire_offset + e.rows * e.rank].reshape(e.rows, e.rank)

    def _project(self, m: torch.Tensor) -> torch.Tensor:
        """Round 1's wire vector of one replica: P = M Q per matrix, the values of each vector, Q blocks zero."""
        lay = self.layout
        wire = torch.zeros(lay.wire_size)
        for i, e in enumerate(lay.entries):
            block = m[e.offset: e.offset + e.numel]
            if e.compressed:
                wire[e.wire_offset: e.wire_offset + e.rows * e.rank] = (
                    block.reshape(e.rows, e.cols) @ self.q[i]).reshape(-1)
            else:
                wire[e.wire_offset: e.wire_offset + e.numel] = block
        return wire

    def _back_project(self, m: torch.Tensor, p_hat: dict[int, torch.Tensor]) -> torch.Tensor:
        """Round 2's wire vector of one replica: Q = M^T P^ per matrix, everything else zero."""
        lay = self.layout
        wire = torch.zeros(lay.wire_size)
        for i, e in enumerate(lay.entries):
            if e.compressed:
                q0 = e.wire_offset + e.rows * e.rank
                block = m[e.offset: e.offset + e.numel].reshape(e.rows, e.cols)
                wire[q0: q0 + e.cols * e.rank] = (block.T @ p_hat[i]).reshape(-1)
        return wire
