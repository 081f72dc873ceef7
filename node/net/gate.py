"""Admission of streams on one protocol: bans, open-stream caps, the access policy, refusal accounting.

A ban ends the peer's admitted streams too, not only its new ones: a stream kept open (an averaging or delegation
link, an inference session) is cancelled and reset as soon as its peer is banned, by any protocol sharing the scores.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
from libp2p.peer.id import ID

from node.errors import NotAuthorizedError, PeerRefusedError
from node.net.access import AccessPolicy, AuditRequest, OpenPolicy
from node.net.peerscore import PeerGuardConfig, PeerScores


def stream_peer(stream: Any) -> ID:
    """The Noise-authenticated peer id at the other end of a stream."""
    pid: ID = stream.muxed_conn.peer_id
    return pid


async def reset_quietly(stream: Any) -> None:
    """Reset a stream, ignoring one that is already gone."""
    try:
        await stream.reset()
    except Exception:  # already closed or reset
        pass


async def close_quietly(stream: Any) -> None:
    """Close a stream (our side), ignoring one that is already gone."""
    try:
        await stream.close()
    except Exception:  # a dead connection: nothing to close cleanly
        pass


class ProtocolGate:
    """One protocol's doorkeeper: refuses banned peers and streams over the caps, asks the policy, and
    counts every refusal against the peer (`PeerScores`, shareable between protocols)."""

    def __init__(self, protocol: str, policy: AccessPolicy | None = None, cfg: PeerGuardConfig | None = None,
                 scores: PeerScores | None = None) -> None:
        self.protocol = protocol
        self.policy: AccessPolicy = policy if policy is not None else OpenPolicy(protocol)
        self.scores = scores if scores is not None else PeerScores(cfg)
        self.cfg = self.scores.cfg if cfg is None else cfg.validate()
        self.open: Counter[str] = Counter()  # peer id -> streams open now
        self.total = 0  # streams open now, all peers
        self.refused: Counter[str] = Counter()  # reason -> streams or messages refused
        # peer id -> the cancel scope of each stream of it being served, with the task serving it
        self._serving: dict[str, list[tuple[trio.CancelScope, trio.lowlevel.Task]]] = {}
        self.scores.on_ban(self._cut)

    def _cut(self, key: str) -> None:
        """A ban of `key` (from any protocol sharing the scores): cancel every stream of it this gate is serving. The
        stream whose handler issued the ban is left to that handler, which answers with its error and resets it."""
        try:
            me: trio.lowlevel.Task | None = trio.lowlevel.current_task()
        except RuntimeError:  # banned outside trio (a test's penalize): no handler of ours is running
            me = None
        for scope, task in self._serving.get(key, []):
            if task is not me and not scope.cancel_called:
                scope.cancel()
                self.refused["banned_while_open"] += 1

    def refuse(self, peer: ID | str, reason: str) -> bool:
        """Count one refusal against `peer`; True when that got it banned."""
        self.refused[reason] += 1
        key = peer if isinstance(peer, str) else peer.pretty()
        return self.scores.penalize(key, f"{self.protocol}:{reason}")

    @asynccontextmanager
    async def serve(self, stream: Any) -> AsyncIterator[ID]:
        """Hold one admitted stream (yields its peer id); PeerRefusedError when the peer is banned or the
        protocol's stream caps are reached (the stream is reset, the refusal counted)."""
        peer = stream_peer(stream)
        key = peer.pretty()
        reason = ""
        if self.scores.is_banned(key):
            reason = "banned"
        elif self.open[key] >= self.cfg.max_streams_per_peer:
            reason = "streams_per_peer"
        elif self.total >= self.cfg.max_streams_total:
            reason = "streams_total"
        if reason:  # counted per protocol, not against the peer: a busy honest neighbour may hit a cap
            self.refused[reason] += 1
            await reset_quietly(stream)
            raise PeerRefusedError(f"{self.protocol}: stream refused ({reason})")
        self.open[key] += 1
        self.total += 1
        entry = (trio.CancelScope(), trio.lowlevel.current_task())
        self._serving.setdefault(key, []).append(entry)
        try:
            with entry[0]:  # cancelled by `_cut` when the peer is banned while its stream is open
                yield peer
        finally:
            self.total -= 1
            self.open[key] -= 1
            if self.open[key] <= 0:
                del self.open[key]
            held = self._serving[key]
            held.remove(entry)
            if not held:
                del self._serving[key]
        if entry[0].cancelled_caught:  # the handler was cut off mid-stream: the peer learns it by a reset
            await reset_quietly(stream)

    async def authorize(self, peer: ID, stage: int | None) -> None:
        """The policy's verdict; a NotAuthorizedError is counted against the peer (when it is at fault) and re-raised."""
        try:
            await self.policy.check(peer, self.protocol, stage)
        except NotAuthorizedError as exc:
            self._refused(peer, exc)
            raise

    async def authorize_audit(self, peer: ID, request: AuditRequest) -> None:
        """The policy's verdict on one audit request (counted like `authorize`)."""
        try:
            await self.policy.check_audit(peer, request)
        except NotAuthorizedError as exc:
            self._refused(peer, exc)
            raise

    def _refused(self, peer: ID, exc: NotAuthorizedError) -> None:
        if exc.peer_at_fault:
            self.refuse(peer, "not_authorized")
        else:
            self.refused["unavailable"] += 1
