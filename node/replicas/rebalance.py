"""Rebalancing: move one node from the most over-provisioned stage to the bottleneck stage (pure)."""

from __future__ import annotations

from dataclasses import dataclass

MIN_GAIN = 1.1  # a move must raise the slowest non-head stage's throughput by at least this factor


@dataclass(frozen=True)
class Move:
    """One planned move."""

    peer_id: str  # the node that moves (lowest peer id of the donor stage)
    from_stage: int  # donor stage (it keeps at least one replica)
    to_stage: int  # bottleneck stage
    throughputs: tuple[float, ...]  # per-stage summed throughput the plan was made from


def stage_throughputs(nodes: list[tuple[str, int, float]], num_stages: int) -> list[float]:
    """Per-stage sum of the announced throughputs of (peer id, stage, tokens/s) entries."""
    out = [0.0] * num_stages
    for _, stage, tp in nodes:
        if 0 <= stage < num_stages:
            out[stage] += tp
    return out


def plan_move(nodes: list[tuple[str, int, float]], num_stages: int, threshold: float) -> Move | None:
    """The move to make now, or None.

    nodes: (peer id, stage, tokens/s) of every live node, this one included. The bottleneck is the
    non-head stage with the least summed throughput (stage 0 is the step authority; its standby
    replicas compute nothing, and `ReplicaEngine.plan` leaves head replicas out of `nodes`); the donor is the stage with the most, among stages with at least two replicas. A move
    happens only when every node has reported a throughput, donor > threshold * bottleneck, and the
    slowest stage gets at least MIN_GAIN faster by the move. Deterministic: every node computes
    the same plan from the same announcements.
    """
    if num_stages < 2 or not nodes or any(tp <= 0 for _, s, tp in nodes if s >= 0):
        return None
    tps = stage_throughputs(nodes, num_stages)
    members: dict[int, list[tuple[str, float]]] = {}
    for pid, s, tp in nodes:
        if 0 <= s < num_stages:
            members.setdefault(s, []).append((pid, tp))
    worst = min(range(1, num_stages), key=lambda s: (tps[s], s))
    donors = [s for s in range(num_stages) if s != worst and len(members.get(s, [])) >= 2]
    if not donors:
        return None
    best = max(donors, key=lambda s: (tps[s], -s))
    if tps[best] <= threshold * tps[worst]:
        return None
    mover, mover_tp = min(members[best])
    after = list(tps)
    after[best] -= mover_tp
    after[worst] += mover_tp  # the mover's own rate stands in for what it will add to the bottleneck
    if min(after[1:]) <= min(tps[1:]) * MIN_GAIN:
        return None  # no clear gain (also stops a node from moving straight back)
    return Move(mover, best, worst, tuple(tps))
