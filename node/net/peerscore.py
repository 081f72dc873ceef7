"""Per-peer refusal scores with bans that back off, shared by every protocol a node serves.

Each refused message (malformed, oversized, unauthorized, idle too long) costs the peer `penalty`;
a peer whose score reaches `ban_score` is banned for `ban_base_s * 2**(n-1)` (capped at `ban_max_s`)
on its n-th ban, and its score starts again from 0. Whoever must act on a ban at once (a protocol gate cutting the
peer's open streams) registers with `on_ban`. Only `max_tracked_peers` peers are remembered
(fresh identities cannot grow the table without bound: the unbanned peer seen longest ago goes first).
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import trio


@dataclass
class PeerGuardConfig:
    """Refusal scoring, bans and open-stream caps of the protocols a node serves."""

    penalty: float = 1.0  # score a peer loses per refused message or stream
    ban_score: float = -5.0  # a peer whose score falls to this value or below is banned
    ban_base_s: float = 1.0  # first ban of a peer; the n-th lasts ban_base_s * 2**(n-1)
    ban_max_s: float = 300.0  # cap on one ban
    max_tracked_peers: int = 4096  # peers whose score is remembered (the oldest unbanned one is forgotten first)
    max_streams_per_peer: int = 4  # streams one peer may hold open on one protocol at once (more are reset)
    max_streams_total: int = 64  # streams all peers together may hold open on one protocol at once

    def validate(self) -> PeerGuardConfig:
        """Raise ValueError naming a bad field."""
        if self.penalty <= 0 or self.ban_score >= 0:
            raise ValueError("PeerGuardConfig: penalty must be > 0 and ban_score < 0")
        if not 0 < self.ban_base_s <= self.ban_max_s:
            raise ValueError("PeerGuardConfig: need 0 < ban_base_s <= ban_max_s")
        if min(self.max_tracked_peers, self.max_streams_per_peer, self.max_streams_total) < 1:
            raise ValueError("PeerGuardConfig: max_tracked_peers, max_streams_per_peer, max_streams_total must be >= 1")
        return self


def ban_duration(count: int, base_s: float, max_s: float) -> float:
    """Length of a peer's `count`-th ban (count >= 1): base * 2**(count-1), capped at max_s."""
    if count < 1:
        raise ValueError(f"ban count must be >= 1, got {count}")
    return min(base_s * 2 ** min(count - 1, 64), max_s)


@dataclass
class _Peer:
    score: float = 0.0  # current score (0 = clean)
    bans: int = 0  # bans so far
    banned_until: float = 0.0  # clock time the current ban ends


class PeerScores:
    """Scores and bans by peer id (a string); one instance may be shared by several protocols."""

    def __init__(self, cfg: PeerGuardConfig | None = None, clock: Callable[[], float] | None = None) -> None:
        self.cfg = (cfg or PeerGuardConfig()).validate()
        self.clock = clock or trio.current_time
        self.peers: OrderedDict[str, _Peer] = OrderedDict()  # least recently penalized first
        self.reasons: Counter[str] = Counter()  # refusal reason -> count (all peers)
        self.banned = 0  # bans issued so far
        self._ban_listeners: list[Callable[[str], None]] = []  # called with the peer id of every new ban

    def on_ban(self, listener: Callable[[str], None]) -> None:
        """Call `listener(peer)` each time a peer is banned (synchronously, from `penalize`)."""
        self._ban_listeners.append(listener)

    def is_banned(self, peer: str) -> bool:
        """True while the peer's current ban lasts."""
        p = self.peers.get(peer)
        return p is not None and p.banned_until > self.clock()

    def score(self, peer: str) -> float:
        """Current score (0 for a peer never refused)."""
        p = self.peers.get(peer)
        return 0.0 if p is None else p.score

    def penalize(self, peer: str, reason: str) -> bool:
        """Count one refusal against `peer`; True when it is banned now."""
        self.reasons[reason] += 1
        p = self.peers.pop(peer, None) or _Peer()
        self.peers[peer] = p
        now = self.clock()
        p.score -= self.cfg.penalty
        if p.score <= self.cfg.ban_score:
            p.bans += 1
            p.score = 0.0
            p.banned_until = now + ban_duration(p.bans, self.cfg.ban_base_s, self.cfg.ban_max_s)
            self.banned += 1
            for listener in self._ban_listeners:
                listener(peer)
        while len(self.peers) > self.cfg.max_tracked_peers:
            victim = next((k for k, v in self.peers.items() if v.banned_until <= now), None)
            if victim is None:
                break  # every tracked peer is banned: keep them all until bans end
            del self.peers[victim]
        return p.banned_until > now
