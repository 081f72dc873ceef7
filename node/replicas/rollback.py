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
* A replica that sees a higher generation announced follows it only when the rollback is justified from its own
  view (`unjustified`): the announcement names the lost stage (`rollback_stage`); no *fresh* peer of that stage in
  this node's generation other than the announcer (one it had a sign of life from within 4 x
  `discovery.announce_interval_s`, `Discovery.recent`; this node included) is at a step after R; and R is a step
  this node can restart from (a checkpoint it holds, or its live state). An unjustified or unfollowable
  announcement is ignored, logged once with the reason and counted against its sender (peer scores). Among the
  followable ones (`candidates`: the highest generation, then the lowest step, wins, so two replicas that start
  a rollback at once agree; a generation is its number and its step, `Announcement.generation`, so two that
  took the same number with different steps are strangers until the later one follows the earlier) it stops its engine as for a re-sync, saves its live state when it is at R, moves its
  checkpoints after R aside into `abandoned/gen<g>/` (`node.training.checkpoint.abandon_checkpoints_after`;
  nothing stored is deleted but the oldest abandoned generations beyond `runtime.abandoned_keep`), restores its
  checkpoint at R explicitly (`checkpoint_at`), announces the new generation and continues from R. The head, the
  step authority, generates again from R. The replica that starts a rollback applies the same freshness check
  to its own stage first: while a lost peer still shows signs of life it keeps re-syncing instead.
* Replicas of different generations are strangers: discovery's `stage_peers` (channels, pushes, pulls, state
  sync) and the stage-peer access policy see only peers of our generation, so no frame, contribution, commit or
  state of the old generation reaches the new one, though steps >= R are numbered again. Exactly-once holds per
  generation; the progress records carry the generation (`rollback_gen`).
* Data sampling depends on the seed, the step and the microbatch only: the re-run steps see the same data and
  the loss curve continues from R as if the steps after it had never run.
* A node that starts while a generation > 0 is announced adopts it when it is justified the same way (for a
  starting node, R is restartable when it holds a checkpoint at R or a fresh peer of its stage trains in the new
  generation to sync from) and moves its own checkpoints after that generation's R aside (it cannot tell whether
  they predate the rollback).
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
                and e.generation() == me.generation() and 0 <= e.stage < me.num_stages):
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
    if e.rollback_gen > 0 and not 0 <= e.rollback_stage < e.num_stages:
        return f"generation {e.rollback_gen} without its lost stage"
    return ""


def rank(e: Any) -> tuple[int, int]:
    """Sort key of a rollback generation (`Announcement.generation`), the one to follow first: the highest number,
    then the lowest rollback step."""
    return -e.rollback_gen, e.rollback_step


def label(e: Any) -> str:
    """A rollback generation as logs name it: its number, and its step when it has one."""
    return str(e.rollback_gen) if e.rollback_gen == 0 else f"{e.rollback_gen} (step {e.rollback_step})"


def candidates(entries: Iterable[Any], me: Any) -> list[Any]:
    """The announcements of our model of a rollback generation that ranks before ours (`rank`), the one to follow
    first: the highest generation, then the lowest step, then the lowest peer id (malformed ones, `invalid`, are
    skipped). Two replicas that start a rollback at once both take the next number; when they chose different
    steps, the one at the later step follows the other, so the swarm meets in one generation."""
    newer = [e for e in entries if e.spec_hash == me.spec_hash and e.num_stages == me.num_stages
             and rank(e) < rank(me) and not invalid(e)]
    return sorted(newer, key=lambda e: (*rank(e), e.peer_id))


def pending(entries: Iterable[Any], me: Any) -> Any | None:
    """The first of `candidates`, None if none."""
    newer = candidates(entries, me)
    return newer[0] if newer else None


def holders(fresh: Iterable[Any], me: Any, stage: int, step: int, but: str = "") -> list[Any]:
    """The `fresh` announcements of our model and generation, other than `but`, serving `stage` at a step after
    `step`: replicas that still hold the stage's newer state, so it is not lost."""
    return [e for e in fresh if e.peer_id != but and e.stage == stage and e.next_step > step
            and e.spec_hash == me.spec_hash and e.num_stages == me.num_stages and e.generation() == me.generation()]


def unjustified(e: Any, fresh: Iterable[Any], me: Any, mine: Iterable[int], fresh_s: float) -> str:
    """Why this node must not follow the rollback `e` announces ("" = it follows): `fresh`, the announcements of
    the peers it had a sign of life from within `fresh_s`; `me`, its own announcement (its generation, and its
    stage and step when it serves one); `mine`, the steps it can restart from."""
    lost, step = e.rollback_stage, e.rollback_step
    if not 0 <= lost < me.num_stages:
        return f"rollback generation {e.rollback_gen} to step {step} names no lost stage"
    alive = holders(fresh, me, lost, step, but=e.peer_id)
    if me.stage == lost and me.next_step > step:
        return (f"rollback generation {e.rollback_gen} to step {step}: this node serves stage {lost} at step "
                f"{me.next_step}, its newer state is not lost")
    if alive:
        a = min(alive, key=lambda a: a.peer_id)
        return (f"rollback generation {e.rollback_gen} to step {step}: peer {a.peer_id} of stage {lost} announced "
                f"step {a.next_step} within {fresh_s:g} s, the stage's newer state is not lost")
    held = sorted(set(mine))
    if step not in held:
        return (f"rollback generation {e.rollback_gen} to step {step}: this node cannot restart from that step "
                f"(it holds {held[-3:] or 'none'})")
    return ""


def next_gen(entries: Iterable[Any], me: Any) -> int:
    """The generation a new rollback takes: one past every generation announced (ours included)."""
    return max([me.rollback_gen, *(e.rollback_gen for e in entries)]) + 1
