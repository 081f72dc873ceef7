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

The node's own finish protocol adds to the window (`window_as_built_s`): its leader applies step k only after its
finish, whose parts follow each other. With the early COMMIT (delegated head work, max_staleness >= 1), the finish is:
1. its bundle to its first holder and the answer back: a bundle's bytes and two latencies;
2. the COMMIT to the other head replicas: one latency;
3. their bundles to it (`simulations.averaging.exchange_cost`): direct, r - 1 bundles' bytes on each one's uplink and
   one latency; sharded, 2 (r - 1) / r of a bundle and two latencies in each of the linear code's two rounds;
4. its update.
Otherwise it pushes its bundle to every peer (answered), then COMMITs, then waits for theirs. Sharded, it COMMITs
and then takes part in the exchange. So (S + 1) steps take at least 2 (P - 1) latencies, the busiest compute and that
finish: a floor for the node as designed (`step_as_built_s`), not for any design.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .averaging import exchange_cost
from .params import WanConfig


@dataclass(frozen=True)
class StepFloors:
    """Lower bounds on one step's seconds (see the module docstring)."""

    compute_s: float  # the busiest replica's compute per step (forwards, backwards, update)
    uplink_s: float  # the busiest replica's uplink seconds per step (frames and bundle)
    window_s: float  # the node's window rule: (2 P latencies + the busiest compute) / (max_staleness + 1)
    busiest_stage: int  # the stage whose replica the compute floor is
    uplink_stage: int  # the stage whose replica the uplink floor is
    leader_finish_s: float = 0.0  # the node's head leader's finish of a step, its parts one after another
    window_as_built_s: float = 0.0  # (2 (P - 1) latencies + the busiest compute + leader_finish_s) / (S + 1)

    @property
    def step_s(self) -> float:
        """The floor: the largest of the three."""
        return max(self.compute_s, self.uplink_s, self.window_s)

    @property
    def binding(self) -> str:
        """Which floor is the step's: compute, uplink or window."""
        floors = {"compute": self.compute_s, "uplink": self.uplink_s, "window": self.window_s}
        return max(floors, key=lambda k: floors[k])

    @property
    def step_as_built_s(self) -> float:
        """The floor of the node as designed: compute, uplink or its own finish protocol's window."""
        return max(self.compute_s, self.uplink_s, self.window_as_built_s)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with the floors and the binding one."""
        return {**asdict(self), "step_s": self.step_s, "binding": self.binding, "step_as_built_s": self.step_as_built_s}


def microbatches_per_replica(cfg: WanConfig, stage: int) -> int:
    """Microbatches one replica of `stage` computes per step: an even share, or all of them on a head leader that
    hands nothing out (head_leader without head_delegation)."""
    if stage == 0 and cfg.head_leader and not cfg.head_delegation:
        return cfg.microbatches
    return -(-cfg.microbatches // cfg.replicas)


def bundle_bytes(cfg: WanConfig, stage: int, collective: str | None = None) -> float:
    """Bytes one replica of `stage` puts on its uplink per step to average with its peers, as `collective` (None:
    the config's `sync_collective`) sends them: direct, (r - 1) bundles; ring or sharded, a reduce-scatter and
    all-gather of one, 2 (r - 1) / r of it; fastest, the quicker of direct and ring."""
    if cfg.replicas < 2 or not cfg.grad_sync_bytes:
        return 0.0
    bundle = cfg.grad_sync_bytes[stage] / cfg.sync_every
    return exchange_cost(cfg.replicas, bundle, collective or cfg.sync_collective, *_link(cfg))[0]


def _link(cfg: WanConfig) -> tuple[float, float]:
    """A node's uplink bytes per second and a link's one-way seconds, at their medians."""
    return cfg.link.bandwidth_mbps * 1e6 / 8.0, cfg.link.latency_ms / 1e3


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
    bw, latency = _link(cfg)
    uplink = []
    for s in stages:
        frames = microbatches_per_replica(cfg, s) * cfg.microbatch_tokens * (
            (cfg.fwd_bytes_per_token if s < cfg.num_stages - 1 else 0.0)
            + (cfg.bwd_bytes_per_token if s > 0 else 0.0))
        uplink.append((frames + bundle_bytes(cfg, s, collective)) / bw)
    busiest = max(stages, key=lambda s: compute[s])
    widest = max(stages, key=lambda s: uplink[s])
    ahead = (cfg.max_staleness or 0) + 1
    window = (2 * cfg.num_stages * latency + compute[busiest]) / ahead
    finish = leader_finish_s(cfg, collective)
    as_built = (2 * (cfg.num_stages - 1) * latency + compute[busiest] + finish) / ahead
    return StepFloors(compute_s=compute[busiest], uplink_s=uplink[widest], window_s=window, busiest_stage=busiest,
                      uplink_stage=widest, leader_finish_s=finish, window_as_built_s=as_built)


def leader_finish_s(cfg: WanConfig, collective: str | None = None) -> float:
    """The node's head leader's finish of one step, its parts one after another (see the module docstring), with no
    queueing: the early COMMIT's first-holder round trip, the COMMIT, the head replicas' exchange, the update."""
    opt = (cfg.opt_s or (0.0,))[0]
    r, bundle = cfg.replicas, (cfg.grad_sync_bytes[0] / cfg.sync_every if cfg.grad_sync_bytes else 0.0)
    if r < 2 or bundle <= 0:
        return opt
    bw, latency = _link(cfg)
    collective = collective or cfg.sync_collective
    nbytes, hops = exchange_cost(r, bundle, collective, bw, latency)
    # before the COMMIT: the early COMMIT's copy to the first holder, answered; else, pushing directly, the bundle to
    # every peer, answered (sharded: nothing, every head replica takes part in the exchange after the COMMIT)
    copies = 1 if cfg.leader_commits_early else 0 if collective in ("sharded", "ring") else r - 1
    first = copies * bundle / bw + 2 * latency if copies else 0.0
    return first + latency + nbytes / bw + hops * latency + opt
