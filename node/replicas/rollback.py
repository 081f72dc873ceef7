"""Rollback: when every holder of a stage's newer state is gone, the swarm rewinds to a step all stages hold (pure).

The rule (see docs/ARCHITECTURE.md, "Replicated mode"):
* Every replica announces the next steps of the checkpoints it holds of its stage (`Announcement.ckpt_steps`:
  it keeps `runtime.checkpoint_keep` of them, one every `runtime.checkpoint_every` steps), its rollback
  generation (`rollback_gen`, 0 at the start of a run) and the step that generation rewound to (`rollback_step`).
* A replica that finds its stage's newer state lost (the pipeline is past its step and no live peer of its stage
  gave that step's commit, or its state, within `replicas.no_replica_timeout_s`) computes the rollback step R
  (`choose_step`): the newest step, not after its own, at which every stage has a live replica of its generation,
  other than the lost peers, holding a checkpoint at exactly R or running at R (itself included). It announces
  generation g+1 with R (g: the highest generation announced). When no such R exists it stops with the one-line
  error naming the lost peer, its stage and step, and why no rollback was possible.
* A replica that sees a higher generation announced (`pending`: the highest generation, then the lowest step,
  wins, so two replicas that start a rollback at once agree) stops its engine as for a re-sync, deletes its
  checkpoints after R (they belong to the abandoned generation), restores its checkpoint at R (or saves its live
  state first when it is at R; or, holding neither, fetches the state from a peer of the new generation), announces
  the new generation and continues from R. The head, the step authority, generates again from R.
* Replicas of different generations are strangers: discovery's `stage_peers` (channels, pushes, pulls, state
  sync) and the stage-peer access policy see only peers of our generation, so no frame, contribution, commit or
  state of the old generation reaches the new one, though steps >= R are numbered again. Exactly-once holds per
  generation; the progress records carry the generation (`rollback_gen`).
* Data sampling depends on the seed, the step and the microbatch only: the re-run steps see the same data and
  the loss curve continues from R as if the steps after it had never run.
* A node that starts while a generation > 0 is announced adopts it and deletes its own checkpoints after that
  generation's R (it cannot tell whether they predate the rollback).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def holds(e: Any) -> set[int]:
    """The steps an announced replica could restart its stage from: its checkpoints and its live state."""
    return set(e.ckpt_steps) | ({e.next_step} if e.next_step >= 0 else set())


def choose_step(entries: Iterable[Any], me: Any, stage: int, mine: Iterable[int], lost: Iterable[str],
                upto: int) -> tuple[int | None, str]:
    """(R, "") with R the newest step <= `upto` that every stage can restart from, counting the live
    announcements of our model and generation less the `lost` peers, plus this node (serving `stage`, able to
    restart from the steps `mine`); (None, why) when there is none."""
    gone = set(lost)
    held: list[set[int]] = [set() for _ in range(me.num_stages)]
    for e in entries:
        if (e.peer_id not in gone and e.spec_hash == me.spec_hash and e.num_stages == me.num_stages
                and e.rollback_gen == me.rollback_gen and 0 <= e.stage < me.num_stages):
            held[e.stage] |= holds(e)
    held[stage] |= set(mine)
    common = {r for r in set.intersection(*held) if r <= upto}
    if common:
        return max(common), ""
    empty = [s for s, h in enumerate(held) if not h]
    if empty:
        return None, f"no live replica of stage {empty[0]} announces a checkpoint"
    return None, (f"no step <= {upto} is held by every stage (" +
                  ", ".join(f"stage {s}: {sorted(h)[-3:]}" for s, h in enumerate(held)) +
                  "; runtime.checkpoint_keep bounds how far back a stage can go)")


def invalid(e: Any) -> str:
    """Why an announced rollback is malformed ("" if it is not)."""
    if e.rollback_gen > 0 and e.rollback_step < 0:
        return f"generation {e.rollback_gen} without a rollback step"
    return ""


def pending(entries: Iterable[Any], me: Any) -> Any | None:
    """The announcement of the rollback this node must follow: among the announcements of our model of a higher
    generation than ours, the highest generation, then the lowest step, then the lowest peer id; None if none
    (malformed ones, `invalid`, are skipped)."""
    newer = [e for e in entries if e.spec_hash == me.spec_hash and e.num_stages == me.num_stages
             and e.rollback_gen > me.rollback_gen and not invalid(e)]
    return min(newer, key=lambda e: (-e.rollback_gen, e.rollback_step, e.peer_id)) if newer else None


def next_gen(entries: Iterable[Any], me: Any) -> int:
    """The generation a new rollback takes: one past every generation announced (ours included)."""
    return max([me.rollback_gen, *(e.rollback_gen for e in entries)]) + 1
