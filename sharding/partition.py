"""Assign embedding, blocks and head to pipeline stages, balanced by FLOPs or measured throughput."""

from __future__ import annotations

import math
from collections.abc import Sequence

from .config import ModelConfig
from .flops import block_forward_flops, head_forward_flops
from .stagespec import StageSpec


def partition(
    config: ModelConfig, num_stages: int, throughputs: Sequence[float] | None = None
) -> list[StageSpec]:
    """Split the model into `num_stages` contiguous stages minimising the slowest stage's time.

    Cost of a stage = its forward FLOPs per token / its throughput (1.0 each when not given).
    In subspace mode the free tail layers all stay on the last stage.
    """
    config.validate()
    if not isinstance(num_stages, int) or isinstance(num_stages, bool) or num_stages < 1:
        raise ValueError(f"num_stages={num_stages!r}: must be a positive integer")
    if config.tie_embeddings and num_stages > 1:
        raise ValueError(
            f"num_stages={num_stages} with ModelConfig.tie_embeddings: the embedding lives on stage 0 and the head "
            "on the last stage, and tied weights across stages are not supported (no gradient exchange between "
            "them): use one stage or tie_embeddings = false"
        )
    n = config.n_layers
    # the last legal boundary: before the first free tail layer
    last_cut = n - config.free_tail_layers
    max_stages = last_cut + 1 if config.free_tail_layers > 0 else n
    if num_stages > max_stages:
        if config.free_tail_layers > 0:
            raise ValueError(
                f"num_stages={num_stages} is more than the {max_stages} stages possible with "
                f"n_layers={n} and free_tail_layers={config.free_tail_layers} (free layers share the "
                "tail stage): use fewer stages, more layers or fewer free tail layers"
            )
        raise ValueError(
            f"num_stages={num_stages} exceeds n_layers={n} (every stage needs at least one block): "
            f"use num_stages <= {n} or more layers"
        )
    if throughputs is None:
        speeds = [1.0] * num_stages
    else:
        speeds = [float(x) for x in throughputs]
        if len(speeds) != num_stages:
            raise ValueError(
                f"throughputs has {len(speeds)} entries for num_stages={num_stages}: give one per stage"
            )
        bad = [x for x in speeds if not (math.isfinite(x) and x > 0)]
        if bad:
            raise ValueError(f"throughputs must be finite and > 0, got {bad}: pass measured tokens/s")
    cost = [float(block_forward_flops(config, b)) for b in range(n)]
    cost[-1] += float(head_forward_flops(config))
    prefix = [0.0]
    for c in cost:
        prefix.append(prefix[-1] + c)

    # best[s][e]: minimal max-time for stages 0..s-1 covering blocks [0, e); choice[s][e]: start of stage s-1
    inf = math.inf
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    choice = [[-1] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, num_stages + 1):
        for e in range(s, n + 1):
            # a stage boundary at e (not the end) must be a legal cut
            if e < n and e > last_cut:
                continue
            for b in range(s - 1, e):
                if best[s - 1][b] == inf:
                    continue
                t = max(best[s - 1][b], (prefix[e] - prefix[b]) / speeds[s - 1])
                if t < best[s][e] - 1e-9 * max(1.0, t):
                    best[s][e] = t
                    choice[s][e] = b
    if best[num_stages][n] == inf:  # pragma: no cover - guarded by the max_stages check above
        raise ValueError(f"num_stages={num_stages}: no legal partition; use fewer stages")
    bounds = [n]
    e = n
    for s in range(num_stages, 0, -1):
        e = choice[s][e]
        bounds.append(e)
    bounds.reverse()
    return [
        StageSpec(
            index=i,
            num_stages=num_stages,
            block_start=bounds[i],
            block_end=bounds[i + 1],
            has_embedding=i == 0,
            has_lm_head=i == num_stages - 1,
        )
        for i in range(num_stages)
    ]


def validate_specs(config: ModelConfig, specs: Sequence[StageSpec]) -> None:
    """Check that hand-made specs cover the model contiguously and keep free layers on the tail."""
    if not specs:
        raise ValueError("specs is empty: give at least one StageSpec")
    num = len(specs)
    expect = 0
    for i, s in enumerate(specs):
        if s.index != i or s.num_stages != num:
            raise ValueError(f"StageSpec {i}: index/num_stages must be {i}/{num}, got {s.index}/{s.num_stages}")
        if s.block_start != expect or s.block_end <= s.block_start:
            raise ValueError(f"StageSpec {i}: blocks [{s.block_start},{s.block_end}) must start at {expect}")
        if s.has_embedding != (i == 0) or s.has_lm_head != (i == num - 1):
            raise ValueError(f"StageSpec {i}: embedding goes on stage 0 and the head on the last stage")
        expect = s.block_end
    if expect != config.n_layers:
        raise ValueError(f"specs cover {expect} blocks, the model has n_layers={config.n_layers}")
    for s in specs[:-1]:
        check_spec(config, s)


def check_spec(config: ModelConfig, spec: StageSpec) -> None:
    """Raise ValueError if one spec is inconsistent with the config."""
    if not (0 <= spec.index < spec.num_stages):
        raise ValueError(f"StageSpec.index={spec.index} must be in [0, num_stages={spec.num_stages})")
    if not (0 <= spec.block_start < spec.block_end <= config.n_layers):
        raise ValueError(
            f"StageSpec blocks [{spec.block_start},{spec.block_end}) must be a non-empty range "
            f"inside [0,{config.n_layers})"
        )
    if spec.has_embedding != spec.is_first or spec.has_lm_head != spec.is_last:
        raise ValueError("StageSpec: has_embedding must equal is_first and has_lm_head must equal is_last")
    if config.tie_embeddings and spec.has_embedding != spec.has_lm_head:
        raise ValueError(
            f"StageSpec {spec.index}: ModelConfig.tie_embeddings needs the embedding and the head on one stage: "
            "use one stage or tie_embeddings = false"
        )
    if spec.has_embedding and spec.block_start != 0:
        raise ValueError("StageSpec: the embedding stage must start at block 0")
    if spec.has_lm_head and spec.block_end != config.n_layers:
        raise ValueError("StageSpec: the LM-head stage must end at the last block")
    if config.is_subspace and not spec.has_lm_head and not config.is_constrained(spec.block_end - 1):
        raise ValueError(
            f"StageSpec {spec.index}: a boundary after free tail layer {spec.block_end - 1} cannot be "
            f"compressed; free_tail_layers={config.free_tail_layers} must all sit on the tail stage"
        )
