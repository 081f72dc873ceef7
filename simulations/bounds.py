"""Floors on the step time of the node's async schedule with replicated stages (pure functions).

No finish, routing or overlap the node could be given beats these; `simulations.pipeline` simulates what it does.
Per optimizer step, for one `WanConfig` with `replicated_async` (links at their median, every node as fast):

- compute: the busiest replica's forward and backward of its microbatches, and its update;
- uplink: the busiest replica's bytes on its uplink (its activation and gradient frames, and its bundle to every
  stage peer as the collective sends it) over its bandwidth;
- window: the node's window rule. A node computes step k + S + 1 only once it applied step k (S = max_staleness).
  The leader applies step k at least two latencies after the step is done (its COMMIT to the head replicas that
  computed a share, their bundles back). From then on, step k + S + 1 is not done before its microbatches went
  down and back up the pipeline, 2 (P - 1) latencies, and the busiest replica computed its share.
  So (S + 1) steps take at least 2 P latencies plus the busiest replica's compute.

The step cannot be shorter than the largest of the three; `binding` names it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .params import WanConfig


@dataclass(frozen=True)
class StepFloors:
    """Lower bounds on one step's seconds (see the module docstring)."""

    compute_s: float  # the busiest replica's compute per step (forwards, backwards, update)
    uplink_s: float  # the busiest replica's uplink seconds per step (frames and bundle)
    window_s: float  # the node's window rule: (2 P latencies + the busiest compute) / (max_staleness + 1)
    busiest_stage: int  # the stage whose replica the compute floor is
    uplink_stage: int  # the stage whose replica the uplink floor is

    @property
    def step_s(self) -> float:
        """The floor: the largest of the three."""
        return max(self.compute_s, self.uplink_s, self.window_s)

    @property
    def binding(self) -> str:
        """Which floor is the step's: compute, uplink or window."""
        floors = {"compute": self.compute_s, "uplink": self.uplink_s, "window": self.window_s}
        return max(floors, key=lambda k: floors[k])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with the floor and its binding."""
        return {**asdict(self), "step_s": self.step_s, "binding": self.binding}


def microbatches_per_replica(cfg: WanConfig, stage: int) -> int:
    """Microbatches one replica of `stage` computes per step: an even share, or all of them on a head leader that
    hands nothing out (head_leader without head_delegation)."""
    if stage == 0 and cfg.head_leader and not cfg.head_delegation:
        return cfg.microbatches
    return -(-cfg.microbatches // cfg.replicas)


def bundle_bytes(cfg: WanConfig, stage: int, collective: str | None = None) -> float:
    """Bytes one replica of `stage` puts on its uplink per step to average with its peers, as `collective` (None:
    the config's `sync_collective`) sends them: direct, (r - 1) bundles; ring or sharded, a reduce-scatter and
    all-gather of one, 2 (r - 1) / r of it; fastest, the fewer."""
    r = cfg.replicas
    if r < 2 or not cfg.grad_sync_bytes:
        return 0.0
    b = cfg.grad_sync_bytes[stage] / cfg.sync_every
    direct, ring = (r - 1) * b, 2.0 * (r - 1) / r * b
    return {"direct": direct, "ring": ring, "sharded": ring}.get(collective or cfg.sync_collective, min(direct, ring))


def step_floors(cfg: WanConfig, collective: str | None = None) -> StepFloors:
    """The three floors of a replicated async configuration (ValueError for any other); `collective` replaces the
    config's for the bundle's bytes (a what-if: the node pushes bundles directly)."""
    cfg = cfg.validate()
    if not cfg.replicated_async:
        raise ValueError("step_floors: the window floor is the node's async schedule with replicated stages "
                         "(schedule async, head_leader, push_per_step)")
    stages = range(cfg.num_stages)
    opt = cfg.opt_s or (0.0,) * cfg.num_stages
    compute = [microbatches_per_replica(cfg, s) * (cfg.fwd_s[s] + cfg.bwd_s[s]) + opt[s] for s in stages]
    bw = cfg.link.bandwidth_mbps * 1e6 / 8.0
    uplink = []
    for s in stages:
        frames = microbatches_per_replica(cfg, s) * cfg.microbatch_tokens * (
            (cfg.fwd_bytes_per_token if s < cfg.num_stages - 1 else 0.0)
            + (cfg.bwd_bytes_per_token if s > 0 else 0.0))
        uplink.append((frames + bundle_bytes(cfg, s, collective)) / bw)
    busiest = max(stages, key=lambda s: compute[s])
    widest = max(stages, key=lambda s: uplink[s])
    latency = cfg.link.latency_ms / 1e3
    window = (2 * cfg.num_stages * latency + compute[busiest]) / ((cfg.max_staleness or 0) + 1)
    return StepFloors(compute_s=compute[busiest], uplink_s=uplink[widest], window_s=window, busiest_stage=busiest,
                      uplink_stage=widest)
