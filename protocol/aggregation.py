"""Robust aggregation of replica updates (gradients or parameter deltas) of one stage.

Non-finite updates are rejected first; then CenteredClip (iterative clipped averaging around a
robust start) or the coordinate-wise median combines the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from protocol.errors import AggregationError


@dataclass(frozen=True)
class AggregationConfig:
    """How replica updates are combined."""

    method: str = "centered_clip"  # "centered_clip", "median" or "mean" (not robust; for comparison)
    clip_radius: float | None = None  # CenteredClip tau; None = radius_scale * median distance to the median
    radius_scale: float = 0.1  # adaptive tau as a fraction of the median distance (smaller: less attacker bias)
    iterations: int = 20  # CenteredClip fixed-point iterations (v moves at most tau per iteration)
    min_finite: int = 1  # fewest finite updates required after NaN/Inf rejection

    def validate(self) -> AggregationConfig:
        """Raise ValueError naming a bad field."""
        if self.method not in ("centered_clip", "median", "mean"):
            raise ValueError(f"AggregationConfig.method={self.method!r}: use centered_clip, median or mean")
        if self.clip_radius is not None and not self.clip_radius > 0:
            raise ValueError(f"AggregationConfig.clip_radius={self.clip_radius!r}: must be > 0 or None")
        if not self.radius_scale > 0:
            raise ValueError(f"AggregationConfig.radius_scale={self.radius_scale!r}: must be > 0")
        if self.iterations < 1:
            raise ValueError(f"AggregationConfig.iterations={self.iterations!r}: must be >= 1")
        if self.min_finite < 1:
            raise ValueError(f"AggregationConfig.min_finite={self.min_finite!r}: must be >= 1")
        return self


def stack_finite(updates: list[torch.Tensor], min_finite: int = 1) -> tuple[torch.Tensor, list[int]]:
    """Stack flattened updates with only finite entries; return them and the indices rejected."""
    if not updates:
        raise AggregationError("updates", "no replica updates to aggregate")
    shape = updates[0].shape
    kept: list[torch.Tensor] = []
    rejected: list[int] = []
    for i, u in enumerate(updates):
        if u.shape != shape:
            raise AggregationError(f"updates[{i}]", f"shape {tuple(u.shape)} differs from {tuple(shape)}")
        if bool(torch.isfinite(u).all()):
            kept.append(u.detach().reshape(-1).to(torch.float64))
        else:
            rejected.append(i)
    if len(kept) < min_finite:
        raise AggregationError("updates", f"{len(kept)} finite update(s), at least {min_finite} required")
    return torch.stack(kept), rejected


def coordinate_median(stacked: torch.Tensor) -> torch.Tensor:
    """Coordinate-wise median of an (n, d) stack (the mean of the two middle values for even n)."""
    ordered = stacked.sort(dim=0).values
    n = ordered.shape[0]
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def centered_clip(stacked: torch.Tensor, radius: float | None = None, iterations: int = 20,
                  radius_scale: float = 0.1) -> torch.Tensor:
    """CenteredClip (Karimireddy et al. 2021) started at the coordinate-wise median.

    v <- v + mean_i(clip(x_i - v, radius)), where clip scales a vector to norm <= radius. Each of f
    attackers can pull v by at most radius / n per iteration, so a small radius (by default
    `radius_scale` times the median distance of the updates to the median) keeps the bias small.
    """
    v = coordinate_median(stacked)
    if radius is None:
        radius = radius_scale * float((stacked - v).norm(dim=1).median())
        if radius == 0.0:
            return v
    for _ in range(iterations):
        diff = stacked - v
        norms = diff.norm(dim=1, keepdim=True)
        scale = torch.clamp(radius / norms.clamp_min(1e-30), max=1.0)
        v = v + (diff * scale).mean(dim=0)
    return v


def aggregate(updates: list[torch.Tensor], config: AggregationConfig | None = None,
              weights: list[float] | None = None) -> torch.Tensor:
    """Combine replica updates (same shape) into one, in the first update's shape and dtype.

    weights: the mean's weight of each update (None: equal); the robust methods weigh every update alike."""
    config = (config or AggregationConfig()).validate()
    if weights is not None and (len(weights) != len(updates) or min(weights, default=1.0) <= 0):
        raise AggregationError("weights", f"{len(weights)} positive weights needed for {len(updates)} updates")
    stacked, rejected = stack_finite(updates, config.min_finite)
    if config.method == "median":
        out = coordinate_median(stacked)
    elif config.method == "mean" and weights is not None:
        w = torch.tensor([x for i, x in enumerate(weights) if i not in rejected], dtype=stacked.dtype)
        out = (stacked * (w / w.sum())[:, None]).sum(dim=0)
    elif config.method == "mean":
        out = stacked.mean(dim=0)
    else:
        out = centered_clip(stacked, config.clip_radius, config.iterations, config.radius_scale)
    return out.reshape(updates[0].shape).to(updates[0].dtype)
