"""Choosing a downstream replica per microbatch: EWMA latency, in-flight limit, exponential bans."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from node.config import ReplicaConfig


def ewma(prev: float | None, sample: float, alpha: float) -> float:
    """Exponentially weighted moving average; the first sample is taken as is."""
    return sample if prev is None else alpha * sample + (1 - alpha) * prev


def fastest_first(peers: list[Any], seconds: dict[str, float]) -> list[Any]:
    """`peers` (announcements with a `peer_id`) by their EWMA `seconds`, fastest first; peers never measured go
    after the measured ones, in their given order (the sort is stable)."""
    return sorted(peers, key=lambda e: (e.peer_id not in seconds, seconds.get(e.peer_id, 0.0)))


def ban_duration(count: int, base_s: float, max_s: float) -> float:
    """Length of a peer's `count`-th ban (count >= 1): base * 2**(count-1), capped at max_s."""
    if count < 1:
        raise ValueError(f"ban count must be >= 1, got {count}")
    return min(base_s * 2 ** (count - 1), max_s)


@dataclass
class PeerStats:
    """What the router knows about one downstream replica."""

    latency: float | None = None  # EWMA of round-trip seconds (None = never measured)
    inflight: int = 0  # microbatches sent and not yet answered
    bans: int = 0  # how often it was banned
    banned_until: float = 0.0  # clock time its current ban ends
    served: int = 0  # answered microbatches


@dataclass
class BanEvent:
    """One ban, for status files and tests."""

    peer: str  # banned peer id
    reason: str  # why ("timeout", "lost")
    count: int  # its ban number
    duration_s: float  # how long it lasts
    at: float  # clock time it started


@dataclass
class Router:
    """Per-peer stats and the choice of a replica for the next microbatch."""

    cfg: ReplicaConfig  # limits and ban durations
    peers: dict[str, PeerStats] = field(default_factory=dict)  # peer id -> stats
    events: list[BanEvent] = field(default_factory=list)  # bans so far

    def stats(self, peer: str) -> PeerStats:
        """The peer's stats (created on first use)."""
        return self.peers.setdefault(peer, PeerStats())

    def is_banned(self, peer: str, now: float) -> bool:
        """True while the peer's ban lasts."""
        return self.stats(peer).banned_until > now

    def ban(self, peer: str, reason: str, now: float) -> BanEvent:
        """Ban the peer for its next (doubled) duration."""
        st = self.stats(peer)
        st.bans += 1
        d = ban_duration(st.bans, self.cfg.ban_base_s, self.cfg.ban_max_s)
        st.banned_until = now + d
        ev = BanEvent(peer, reason, st.bans, d, now)
        self.events.append(ev)
        return ev

    def choose(self, candidates: list[str], now: float) -> str | None:
        """The usable candidate with the lowest expected finish time, or None if none has room.

        Expected finish = EWMA latency * (in flight + 1); unmeasured peers count as the fastest
        measured one, so a new replica gets work at once. Ties go to the lower peer id.
        """
        usable = [p for p in candidates
                  if not self.is_banned(p, now) and self.stats(p).inflight < self.cfg.max_inflight]
        if not usable:
            return None
        known = [lat for lat in (self.stats(p).latency for p in usable) if lat is not None]
        default = min(known) if known else 0.0

        def cost(p: str) -> tuple[float, int, str]:
            st = self.stats(p)
            lat: float = st.latency if st.latency is not None else default
            return lat * (st.inflight + 1), st.inflight, p

        return min(usable, key=cost)

    def sent(self, peer: str) -> None:
        """A microbatch went to the peer."""
        self.stats(peer).inflight += 1

    def answered(self, peer: str, latency_s: float) -> None:
        """The peer answered a microbatch after `latency_s`."""
        st = self.stats(peer)
        st.inflight = max(0, st.inflight - 1)
        st.served += 1
        st.latency = ewma(st.latency, latency_s, self.cfg.ewma_alpha)

    def abandoned(self, peer: str) -> None:
        """A microbatch sent to the peer will not be answered (timeout or loss)."""
        st = self.stats(peer)
        st.inflight = max(0, st.inflight - 1)
