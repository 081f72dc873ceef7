"""Bytes a stage's replicas exchange per optimiser step under each averaging option (a bytes model only).

- `dense`: every gradient element, every step (bf16: 2 bytes each).
- `powersgd:R`: rank-R factors P (m x R) and Q (n x R) of every matrix gradient, vectors dense (bf16).
- `powersgd:R:int8` / `powersgd:R:int4`: the same factors and vectors as int8 codes (int4: two to a byte),
  plus one bf16 scale per factor column and per vector (the node's `powersgd_bits = 8` / `4`).
- `powersgd:R/B[...]`: the transformer blocks' matrices at rank B, the embedding and head at R (the node's
  `powersgd_block_rank = B`).
- `diloco:H`: the dense pseudo-gradient once every H inner steps (bytes / H per step on average;
  the simulator runs the dense exchange with `WanConfig.sync_every = H`).

Exchange cost is a ring all-reduce of those bytes among the stage's replicas, or direct pushes to every other
replica (`WanConfig.sync_collective`, `pipeline._grad_sync_s`), holding the stage's compute; or sent on the
uplinks in the background: with `WanConfig.overlap_sync` an outer step applied one round late (measured by
`benchmarks/wan_averaging.py --math`'s diloco-delayed run), with `WanConfig.sync_push` each microbatch's share
pushed after its backward and the step's update waiting for the last (the node's PowerSGD exchange).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from protocol.modelspec import POWERSGD_BITS

BYTES_PER_ELEMENT = 2  # bf16 on the wire
SCALE_BYTES = 2  # powersgd int8 / int4: bytes of a column's bf16 scale
CODE_BITS = {f"int{b}": b for b in POWERSGD_BITS if b < 16}  # powersgd wire suffix -> bits of a factor code
SHARDED_ROUNDS = 2  # sync_collective sharded: rounds of the linear code per step (P, then Q), each a reduce-scatter
# and an all-gather


@dataclass(frozen=True)
class Averaging:
    """One averaging option: `mode` dense | powersgd | diloco, with its rank or outer period."""

    mode: str = "dense"  # dense, powersgd or diloco
    rank: int = 0  # powersgd: rank of the factors
    outer_steps: int = 1  # diloco: inner steps between two outer (averaging) steps
    bits: int = 16  # powersgd: bits of a factor value on the wire: 16 (bf16), 8 or 4 (codes with a bf16 scale per column)
    block_rank: int = 0  # powersgd: rank of the transformer blocks' matrices (0: rank)

    @classmethod
    def parse(cls, text: str) -> Averaging:
        """`dense`, `powersgd:<rank>[/<block rank>][:int8|:int4]` or `diloco:<H>` (ValueError names the forms)."""
        mode, _, arg = text.partition(":")
        ranks, _, wire = arg.partition(":")
        rank, slash, block = ranks.partition("/")
        try:
            if mode == "dense" and not arg:
                return cls()
            if (mode == "powersgd" and int(rank) >= 1 and (not slash or int(block) >= 1)
                    and (wire == "" or wire in CODE_BITS)):
                r, b = int(rank), int(block) if slash else 0
                return cls("powersgd", rank=r, bits=CODE_BITS.get(wire, 16), block_rank=0 if b == r else b)
            if mode == "diloco" and int(arg) >= 1:
                return cls("diloco", outer_steps=int(arg))
        except ValueError:
            pass
        raise ValueError(f"averaging={text!r}: use dense, powersgd:<rank >= 1>[/<block rank >= 1>][:int8|:int4] or "
                         "diloco:<H >= 1>")

    def label(self) -> str:
        """The option as `parse` reads it."""
        ranks = f"{self.rank}/{self.block_rank}" if self.block_rank else str(self.rank)
        return {"dense": "dense", "powersgd": f"powersgd:{ranks}" + (f":int{self.bits}" if self.bits < 16 else ""),
                "diloco": f"diloco:{self.outer_steps}"}[self.mode]


def stage_shapes(config: Any, spec: Any) -> tuple[list[tuple[int, int]], int]:
    """(matrix shapes, vector elements) of one stage's trainable parameters (as `presets.stage_params`)."""
    d, r = config.d_model, config.mlp_ratio
    per_block = [(3 * d, d), (d, d), (r * d, d), (d, r * d)]
    blocks = spec.block_end - spec.block_start
    mats = per_block * blocks
    vectors = 2 * d * blocks
    if spec.has_embedding:
        mats.append((config.vocab_size, d))
    if spec.has_lm_head:
        mats.append((config.vocab_size, d))
        vectors += d
    return mats, vectors


def sync_bytes_per_step(config: Any, spec: Any, option: Averaging) -> float:
    """Bytes of one replica's contribution to a step's averaging (before the all-reduce's 2(r-1)/r factor): the
    whole step's under a per-step exchange; the node sends one such contribution per microbatch it computes."""
    mats, vectors = stage_shapes(config, spec)
    dense = sum(m * n for m, n in mats) + vectors
    if option.mode == "dense":
        return float(dense * BYTES_PER_ELEMENT)
    if option.mode == "powersgd":
        in_blocks = len(mats) - spec.has_embedding - spec.has_lm_head  # stage_shapes lists the blocks' first
        ranks = [option.block_rank or option.rank if i < in_blocks else option.rank for i in range(len(mats))]
        low = sum(min(m * n, r * (m + n)) for (m, n), r in zip(mats, ranks, strict=True)) + vectors
        if option.bits == 16:
            return float(low * BYTES_PER_ELEMENT)
        scales = sum(2 * r if r * (m + n) < m * n else 1  # a dense matrix: 1
                     for (m, n), r in zip(mats, ranks, strict=True))
        scales += vectors // config.d_model  # the norm-gain vectors (d_model each): one scale each
        return float(math.ceil(low * option.bits / 8) + scales * SCALE_BYTES)
    return float(dense * BYTES_PER_ELEMENT) / option.outer_steps


def exchange_cost(replicas: int, bundle: float, collective: str, bw: float = 1.0,
                  latency: float = 0.0) -> tuple[float, float]:
    """(bytes on each replica's uplink, latencies waited) for `replicas` to average `bundle` bytes each
    (`WanConfig.sync_collective`): ring, an all-reduce, 2 (r - 1) / r of it over 2 (r - 1) latencies; direct, a push
    to every other replica, (r - 1) bundles over one; sharded, a reduce-scatter to shard owners and an all-gather of
    their sums in each of `SHARDED_ROUNDS` rounds, 2 (r - 1) / r over four; fastest, whichever of ring and direct takes
    less time at `bw` bytes/s and `latency` seconds.

    Ring and sharded sum contributions on the way, which needs a code that is linear across replicas: dense, or
    PowerSGD with a common Q (`sharding.sharedpowersgd`), whose P and Q travel in two rounds (P, then Q = M^T P^ once
    every replica has the summed P). The node's PowerSGD factorises each replica's gradient on its own; a sum of
    its contributions is no contribution, so it pushes them directly."""
    r = replicas
    costs = {"ring": (2.0 * (r - 1) / r * bundle, 2.0 * (r - 1)), "direct": ((r - 1) * bundle, 1.0),
             "sharded": (2.0 * (r - 1) / r * bundle, 2.0 * SHARDED_ROUNDS)}
    if collective == "fastest":
        return min(costs["ring"], costs["direct"], key=lambda c: c[0] / bw + c[1] * latency)
    return costs[collective]
