"""Bytes a stage's replicas exchange per optimiser step under each averaging option (a bytes model only).

- `dense`: every gradient element, every step (bf16: 2 bytes each).
- `powersgd:R`: rank-R factors P (m x R) and Q (n x R) of every matrix gradient, vectors dense (bf16).
- `diloco:H`: the dense pseudo-gradient once every H inner steps (bytes / H per step on average;
  the simulator runs the dense exchange with `WanConfig.sync_every = H`).

Exchange cost is a ring all-reduce of those bytes among the stage's replicas (`pipeline._grad_sync_s`), holding
the stage's compute, or with `WanConfig.overlap_sync` sent on the uplinks in the background (an outer step
applied one round late, measured by `benchmarks/wan_averaging.py --math`'s diloco-delayed run).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BYTES_PER_ELEMENT = 2  # bf16 on the wire


@dataclass(frozen=True)
class Averaging:
    """One averaging option: `mode` dense | powersgd | diloco, with its rank or outer period."""

    mode: str = "dense"  # dense, powersgd or diloco
    rank: int = 0  # powersgd: rank of the factors
    outer_steps: int = 1  # diloco: inner steps between two outer (averaging) steps

    @classmethod
    def parse(cls, text: str) -> Averaging:
        """`dense`, `powersgd:<rank>` or `diloco:<H>` (ValueError names the forms)."""
        mode, _, arg = text.partition(":")
        try:
            if mode == "dense" and not arg:
                return cls()
            if mode == "powersgd" and int(arg) >= 1:
                return cls("powersgd", rank=int(arg))
            if mode == "diloco" and int(arg) >= 1:
                return cls("diloco", outer_steps=int(arg))
        except ValueError:
            pass
        raise ValueError(f"averaging={text!r}: use dense, powersgd:<rank >= 1> or diloco:<H >= 1>")

    def label(self) -> str:
        """The option as `parse` reads it."""
        return {"dense": "dense", "powersgd": f"powersgd:{self.rank}", "diloco": f"diloco:{self.outer_steps}"}[
            self.mode]


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
    """Bytes each replica contributes to one step's averaging (before the all-reduce's 2(r-1)/r factor)."""
    mats, vectors = stage_shapes(config, spec)
    dense = sum(m * n for m, n in mats) + vectors
    if option.mode == "dense":
        return float(dense * BYTES_PER_ELEMENT)
    if option.mode == "powersgd":
        low = sum(min(m * n, option.rank * (m + n)) for m, n in mats) + vectors
        return float(low * BYTES_PER_ELEMENT)
    return float(dense * BYTES_PER_ELEMENT) / option.outer_steps
