"""Replicas of the head stage (stage 0): one leader holds the step authority, the others stand by (pure).

The rule (see docs/ARCHITECTURE.md, "Replicated mode"):

* Exactly one head replica *leads*: it announces `head_term` >= 0 (`node.net.discovery.Announcement`),
  generates every microbatch of a step, routes it and commits it, as a single head does. The others
  announce `head_term` = -1 and *stand by*: they generate nothing, so no two head replicas ever generate
  the same microbatch.
* The microbatch attempt-id space is partitioned by term: the leader of term t numbers the attempts of
  every microbatch from `attempt_base(t)` = t * ATTEMPT_STRIDE on, so attempts of a later leader never
  collide with those an earlier one left in flight downstream.
* A head contribution exists only for a committed attempt (the leader computes it when the gradient
  returned and commits it once another live head replica holds it, `ReplicaEngine._hold`), so a
  standby's store holds a subset of the leader's commits, with the same attempts: once it holds one
  contribution for every microbatch of a step it knows the step's commit (`held_commits`) and applies it,
  exactly as the leader does, and forwards the same COMMIT frames downstream.
* Before a step's COMMIT goes downstream the leader pushes every committed contribution a reachable
  standby has not acknowledged (one that joined mid-step missed earlier pushes), so a standby holds every
  step the pipeline applied; one that does not (it was unreachable) stops instead of taking over.
* When the leader has refused or failed every dial for `replicas.head_takeover_s` (or its announcement
  expired), the standby with the lowest peer id among those still reachable (`successor`) takes over in
  the term after the highest it has seen (`next_term`): it adopts the commits it holds for its current
  step and generates only the remaining microbatches, with attempts of its own term.
* A leader that sees another leader of a higher term (or of its own term with a lower peer id) stops
  with an error naming that peer, the stage and the step (`rival`): two leaders never both go on.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

ATTEMPT_STRIDE = 1024  # attempts one leader may use per microbatch (re-routes included)
MAX_ATTEMPT = 0xFFFF  # the frame header's attempt field is 16 bits wide
MAX_TERM = MAX_ATTEMPT // ATTEMPT_STRIDE  # highest term whose attempts fit the header
PING_STEP = 1 << 40  # the step a standby pulls to learn that the leader answers (the largest `/pmn/avg` accepts;
# no store holds it, so the answer is empty)


def attempt_base(term: int) -> int:
    """First attempt id of every microbatch the leader of `term` generates (ValueError past MAX_TERM)."""
    if not 0 <= term <= MAX_TERM:
        raise ValueError(f"head term {term} out of range [0, {MAX_TERM}]: attempt ids are 16 bits")
    return term * ATTEMPT_STRIDE


def term_of(attempt: int) -> int:
    """The term of the leader that generated `attempt`."""
    return attempt // ATTEMPT_STRIDE


def held_commits(keys: Iterable[tuple[int, int]]) -> dict[int, int]:
    """The commits a head replica's contributions of one step prove: mb -> attempt, for each microbatch that
    has exactly one held contribution (a head computes a contribution only for the attempt it commits)."""
    seen: dict[int, set[int]] = {}
    for mb, a in keys:
        seen.setdefault(mb, set()).add(a)
    return {mb: next(iter(a)) for mb, a in seen.items() if len(a) == 1}


def leader(entries: Iterable[Any]) -> Any | None:
    """The announced leader among head-replica announcements: highest `head_term`, then lowest peer id."""
    leading = [e for e in entries if e.head_term >= 0]
    return min(leading, key=lambda e: (-e.head_term, e.peer_id)) if leading else None


def rival(me: str, term: int, entries: Iterable[Any]) -> Any | None:
    """An announced leader that outranks this one (leading in `term`): a higher term, or the same term and a
    lower peer id; None when this node may go on leading."""
    best = leader(e for e in entries if e.peer_id != me)
    if best is None or (-best.head_term, best.peer_id) > (-term, me):
        return None
    return best


def successor(me: str, standbys: Iterable[str]) -> bool:
    """True when this node takes over: it has the lowest peer id among the reachable standbys (itself included)."""
    return me <= min([me, *standbys])


def next_term(seen_terms: Iterable[int], attempts: Iterable[int]) -> int:
    """The term a new leader takes: one past every term announced or visible in held attempt ids."""
    return max([-1, *seen_terms, *(term_of(a) for a in attempts)]) + 1
