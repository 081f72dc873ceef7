"""Replicated-stage runtime: one node among possibly several serving a stage.

* Channels to every live replica of the next stage (dialled from discovery) and from every replica
  of the previous stage (accepted).
* The head is the step's authority: it sends each microbatch (attempt id in the frame header) to
  the replica the `Router` picks (EWMA latency, in-flight limit, bans), re-sends it with a new
  attempt when that replica is lost or exceeds `replica_timeout_s`, and commits a microbatch when
  its gradient returns. The step's commit (mb -> attempt) travels downstream in COMMIT frames.
* The head stage may have replicas (`node.replicas.heads`): one leads (the step authority above, with
  attempt ids of its term), the others stand by, learn each step's commit from the leader's contributions they
  hold, apply it, and take over (adopting the commits they hold, generating only the rest) when the leader is
  gone for `head_takeover_s`. With the step exchange the leader hands microbatches to them over
  `/pmn/delegate/1.0.0` links (`node.replicas.delegation`): they compute stage 0 of those and route them on.
* Inner stages route the same way (keeping the head's attempt id) and send each gradient back to
  whoever sent the activation; late answers are discarded.
* Each replica keeps the parameter gradient of every (step, mb, attempt) separately, pushes it to
  its stage peers, and applies only the committed ones (`node.replicas.averaging`), so every microbatch is
  applied exactly once per stage and all replicas of a stage apply the same update.
* When every holder of the stage's newer state is gone, `commit_poller` fails the engine with a
  `StateLostError` and the runner starts a rollback; an engine that sees a rollback announced stops with a
  `RollbackError` (`node.replicas.rollback`). Channels and contributions are exchanged only with replicas of
  this engine's rollback generation.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import trio

from node.config import NodeConfig
from node.errors import (
    AveragingError,
    NodeError,
    NoReplicaError,
    ResyncNeededError,
    RollbackError,
    StateLostError,
    UpstreamLostError,
)
from node.net.discovery import Discovery
from node.net.streampool import StreamPool, StreamPoolConfig
from node.replicas import averaging, delegation, heads, rollback
from node.replicas.delegation import DelegateLink, Task
from node.replicas.rebalance import Move, plan_move
from node.replicas.routing import Router, ban_duration, ewma, fastest_first
from node.training.worker import StageWorker, window_to_bytes
from node.wire import frames
from node.wire.channel import ActChannel, ActEndpoint, Received


@dataclass
class _Work:
    """A microbatch attempt this stage must send downstream (or has sent)."""

    mb: int  # microbatch index
    attempt: int  # the head's attempt id
    payload: bytes  # encoded boundary activation
    window: bytes  # token window bytes
    up: str = ""  # peer that sent us the activation ("" at the head)
    down: str = ""  # replica it was sent to ("" while waiting for one)
    sent_at: float = 0.0  # trio clock when sent
    delegated: bool = False  # leading head: handed to the head replica `down` as a task (nothing computed here)
    task: bool = False  # a head replica: a task of the leader `up` (computed here, DONE goes to the leader)


def thread_cpu(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """`fn(*args)` and the CPU seconds the calling thread spent in it (`time.thread_time`: the stage's torch work
    runs in that thread with the node's one intra-op thread; more intra-op threads' CPU is not counted)."""
    c0 = time.thread_time()
    out = fn(*args)
    return out, time.thread_time() - c0


@dataclass
class StepOutcome:
    """What one replica did in one step (progress record fields)."""

    step: int  # global step
    loss: float | None  # mean committed loss (tail replicas)
    applied: list[list[int]]  # committed [mb, attempt] pairs whose contributions were combined
    mine: list[list[int]]  # committed [mb, attempt] pairs this replica computed
    computed: list[list[int]]  # every [mb, attempt] this replica computed (committed or not)
    dropped: list[int]  # committed microbatches applied without their contribution: always empty (a step waits
    # for them, re-syncs or rolls back: `_await_missing`), kept so records can be checked for exactly-once
    rerouted: int  # attempts re-sent to another replica
    seconds: float  # wall time of the step
    compute_s: float  # seconds spent computing (forward/backward, debug delay)
    tokens: int  # tokens of the step
    compute_cpu_s: float = 0.0  # CPU seconds of that computing (its thread's; what a shared host's cores gave it)
    update_cpu_s: float = 0.0  # CPU seconds of the step's update (combining the bundles, the optimizer step)
    extra: dict[str, Any] = field(default_factory=dict)  # free-form additions


class ReplicaEngine:
    """Runs global steps of one stage in replicated mode until told to stop or move."""

    def __init__(self, cfg: NodeConfig, worker: StageWorker, endpoint: ActEndpoint, discovery: Discovery,
                 host: Any, store: averaging.ContributionStore) -> None:
        self.cfg = cfg
        self.rc = cfg.replicas
        self.worker = worker
        self.endpoint = endpoint
        self.discovery = discovery
        self.host = host
        self.store = store
        self.stage = worker.spec.index
        self.m = worker.num_microbatches
        self.spec_hash = worker.config.spec_hash().hex()
        self.up: dict[str, ActChannel] = {}
        self.down: dict[str, ActChannel] = {}
        self.router = Router(self.rc)
        # /pmn/avg streams kept open to the stage peers between pushes and pulls (None: a new stream per request)
        self.avg_streams = StreamPool(host, averaging.AVG_PROTOCOL, StreamPoolConfig(
            self.rc.avg_keep_streams, self.rc.avg_stream_idle_s)) if self.rc.avg_keep_streams else None
        self.lock = trio.Lock()  # held while an optimizer step is applied (state snapshots wait on it)
        self._wake = trio.Event()
        self._news = trio.Event()  # set (and replaced) on every poke: for waiters other than the step loop
        self._future: list[tuple[ActChannel, Received]] = []
        self._work: dict[tuple[int, int], _Work] = {}  # (step, mb) -> outstanding or waiting attempt
        self._queue: deque[tuple[int, int]] = deque()  # (step, mb) waiting for a replica
        self._computed: dict[int, list[list[int]]] = {}
        self._forwarded: set[int] = set()
        self._peer_failures: dict[str, tuple[int, float]] = {}  # stage peer -> (failed exchanges, skip until)
        self._unreachable: dict[str, float] = {}  # stage peer -> until when it counts as gone (refused or no dial)
        self._probing: set[str] = set()  # stage peers in backoff with a background push in flight
        self._push_s: dict[str, float] = {}  # stage peer -> EWMA seconds of a bundle push it answered
        self._alone_checked = -float("inf")  # trio time of the last discovery round run because no stage peer was known
        self._probe_send, self._probe_recv = trio.open_memory_channel[tuple[Any, ...]](float("inf"))
        self._rerouted = 0
        self._ahead = 0  # forwards of later steps run while the current step was not applied (the async window)
        # step -> seconds of its finish's phases (the progress record's "phases": where a step's time goes)
        self._phases: dict[int, dict[str, float]] = {}
        # activation-protocol bytes (read, written) of this node's endpoint when the last step was applied
        self._wire_seen = (endpoint.totals.bytes_in, endpoint.totals.bytes_out)
        self._forwards = 0  # gradients sent upstream (test hook)
        self._commits_sent = 0  # step COMMITs an early-committing leader sent on (test hook)
        self._had_next = False  # a replica of the next stage was usable at some point
        self._ahead_peers: list[str] = []  # stage peers last seen ahead of this replica (named if the state is lost)
        self._compute_s = 0.0  # wall seconds of this step's compute (its worker threads)
        self.finishing: trio.Nursery | None = None  # the engine's nursery (the runner's), where the finishes of later
        # steps start while the current one finishes (`replicas.pipelined_finish`); None: each waits for its run_step
        self._early: dict[int, trio.Event] = {}  # later steps whose finish started early -> set once it ran
        self._bundled_through = -1  # the newest step whose bundle was encoded (or had none, or that was applied):
        # the codec's state (error feedback, warm-started Q) takes the steps in order
        self._bundle_turn = trio.Event()  # set (and replaced) whenever `_bundled_through` moves
        self._compute_cpu_s = 0.0  # CPU seconds of the same compute
        self._last_event = trio.current_time()
        self.current_step = worker.next_step
        self.throughput = 0.0  # tokens/s of compute over the last step with work
        self.events: list[dict[str, Any]] = []  # bans and reroutes, for the status file
        self.fatal: NodeError | None = None  # set by a background task; run_step raises it
        # the runner's judge of an announced rollback: the RollbackError to stop with, or None (none to follow;
        # None here: announced rollbacks are not followed)
        self.follow_rollback: Callable[[], RollbackError | None] | None = None
        # stage 0: the term this replica leads in (-1 = a standby head replica; the runner sets it)
        self.head_term = 0 if worker.spec.is_first else -1
        self._terms_seen: set[int] = set()  # head terms announced by stage-0 peers (a new leader's term exceeds them)
        self._leader_down_since: float | None = None  # when dials to the leading head replica began to fail
        self._last_probe = float("-inf")  # when a standby last asked the leader for its step
        self._holders: dict[tuple[int, int, int], set[str]] = {}  # (step, mb, attempt) -> stage peers that took it
        self._had_up = False  # a replica of the previous stage had a channel open to this one at some point
        self._upless_since: float | None = None  # since when no channel from the previous stage is open
        self._last_up: str = ""  # the last previous-stage replica that had a channel open to this one
        # replica_exchange = "step": one contribution per replica and step, the sum of the committed microbatches
        # whose gradient the previous stage took from this replica (told in its COMMIT frame: `yours`)
        self.per_step = cfg.runtime.replica_exchange == "step"
        self._dense: dict[int, dict[tuple[int, int], tuple[torch.Tensor, float | None, str]]] = {}  # step ->
        # (mb, attempt) -> (dense gradient, tail loss, the previous-stage peer that sent the activation)
        self._accepted: dict[int, dict[int, str]] = {}  # step -> mb -> next-stage peer whose gradient this replica used
        self._verdicts: dict[int, dict[str, set[int]]] = {}  # step -> previous-stage peer -> mbs it used ours for
        self._owned: dict[int, list[list[int]]] = {}  # step -> the (mb, attempt) pairs this replica's bundle sums
        # delegated head work (`node.replicas.delegation`): on the leader, links to the other head replicas and a
        # router for them; on the others, the links their leaders opened
        self.delegating = self.per_step and self.rc.head_delegation and worker.spec.is_first \
            and not worker.spec.is_last
        self.delegate_limits = delegation.DelegateLimits()
        self.delegates: dict[str, DelegateLink] = {}  # head replica -> our link to it (leading)
        self.leaders: dict[str, DelegateLink] = {}  # leading head replica -> its link to us
        # runtime.schedule = "async": steps after the oldest unapplied one whose work runs now (their forwards and
        # backwards use the worker's stashed weights, `AsyncStageWorker`); 0: one step at a time (gpipe, 1f1b)
        self.window = cfg.runtime.max_staleness if cfg.runtime.schedule == "async" else 0
        # tasks per delegate: max_tasks for each step of the window (a step's share is out for a round trip)
        self.delegate_router = Router(replace(self.rc, max_inflight=self.rc.max_tasks * (self.window + 1)))
        self._linking: set[str] = set()  # head replicas a delegation link is being opened to
        self._future_tasks: list[tuple[DelegateLink, Task]] = []  # tasks of later steps, taken when we get there
        self._commits: dict[int, dict[int, int]] = {}  # leading head: step -> committed mb -> attempt
        self._opened: set[int] = set()  # leading head: steps whose microbatches were queued for generation
        self._pending: deque[tuple[int, int]] = deque()  # leading head: (step, mb) still to generate, oldest first
        self._next_attempt: dict[tuple[int, int], int] = {}  # leading head: (step, mb) -> attempt its next
        # generation takes
        self._delegated: Counter[int] = Counter()  # leading head: step -> microbatches committed from delegates' work
        self._assigned: Counter[tuple[int, str]] = Counter()  # leading head: (step, delegate) -> microbatches handed

    # -- channels ----------------------------------------------------------------------------------

    def poke(self) -> None:
        """Wake the step loop (and whoever waits on `_news`: a step finishing beside it)."""
        self._last_event = trio.current_time()
        self._wake.set()
        self._news.set()
        self._news = trio.Event()

    async def accept_loop(self) -> None:
        """Accept channels from replicas of the previous stage."""
        async for ch in self.endpoint.incoming:
            other = self._other_generation(ch.peer)
            if other:
                await ch.send_error(other)
                await ch.linger_and_reset()
            elif ch.failure is None and ch.remote_stage == self.stage - 1 and self.stage > 0:
                old = self.up.get(ch.peer)
                self.up[ch.peer] = ch
                ch.listeners.append(self.poke)
                if old is not None and old is not ch:
                    await self._drop_channel(old)
                self.poke()
            else:
                await ch.send_error(f"stage {self.stage} accepts activations only from stage {self.stage - 1}")
                await ch.linger_and_reset()

    def _other_generation(self, peer: str) -> str:
        """Why a channel from `peer` is refused as one of another rollback generation ("" = it is not known to be:
        a replica announces a new generation only after its old engine is closed)."""
        me = self.discovery.me
        for e in self.discovery.entries():
            if e.peer_id == peer and e.generation() != me.generation():
                return (f"stage {self.stage} at step {self.current_step} trains in rollback generation "
                        f"{rollback.label(me)}, peer {peer} announces generation {rollback.label(e)}")
        return ""

    def check_rollback(self) -> None:
        """RollbackError when a replica announces a rollback generation ranked before ours (`rollback.rank`) that this
        node follows (the swarm rewinds): `follow_rollback`, set by the runner, judges it (`rollback.unjustified`)."""
        if self.follow_rollback is not None and rollback.candidates(self.discovery.entries(), self.discovery.me):
            rb = self.follow_rollback()
            if rb is not None:
                raise rb

    async def dial_loop(self, nursery: trio.Nursery) -> None:
        """Keep a channel open to every live, unbanned replica of the next stage."""
        if self.worker.spec.is_last:
            return
        while True:
            now = trio.current_time()
            for ann in self.discovery.stage_peers(self.stage + 1):
                ch = self.down.get(ann.peer_id)
                if ch is not None and ch.failure is None:
                    continue
                if self.router.is_banned(ann.peer_id, now) or not ann.addrs:
                    continue
                try:
                    ch = await self.endpoint.open(ann.addrs[0])
                except Exception:  # dial errors come as many libp2p / OS types; retried next round
                    continue
                nursery.start_soon(ch.run_reader)
                ch.listeners.append(self.poke)
                self.down[ann.peer_id] = ch
                self.poke()
            if self.delegating and self.leads:
                await self._open_links(nursery, now)
            with trio.move_on_after(self.cfg.discovery.announce_interval_s):
                await self.discovery.changed.wait()

    async def _open_links(self, nursery: trio.Nursery, now: float) -> None:
        """A leading head replica: keep a delegation link open to every other head replica of our generation (each
        dialled in its own task; one that refuses or cannot be reached is dialled again after a growing backoff)."""
        for ann in self._head_peers():
            link = self.delegates.get(ann.peer_id)
            if (link is not None and link.failure is None) or not ann.addrs or ann.head_term >= 0 \
                    or ann.peer_id in self._linking or self.delegate_router.is_banned(ann.peer_id, now):
                continue
            self._linking.add(ann.peer_id)
            nursery.start_soon(self._open_link, nursery, ann.peer_id, ann.addrs[0])

    async def _open_link(self, nursery: trio.Nursery, peer: str, addr: str) -> None:
        try:
            link = await delegation.open_link(self.host, addr, self.spec_hash, self.m, self.delegate_limits,
                                              self.cfg.transport.dial_timeout_s, self._delegate_refused)
        except Exception as exc:  # refused (it does not see us lead yet, or delegates nothing) or unreachable
            self.delegate_router.ban(peer, "link_refused", trio.current_time())
            self.events.append({"event": "delegation_link", "peer": peer, "error": str(exc)[:200],
                                "time": time.time()})
            return
        finally:
            self._linking.discard(peer)
        if not self.leads:  # took too long: no longer the leader
            await link.close()
            return
        link.listeners.append(self.poke)
        nursery.start_soon(link.run_reader)
        self.delegates[peer] = link
        self.poke()

    def accept_leader(self, link: DelegateLink) -> str:
        """`DelegationService`: take the link a leading head replica opened to this one ("" = taken, else why not:
        this node does not delegate, leads itself, or the dialler is not the leader it sees announced)."""
        if not self.delegating:
            return (f"this node serves stage {self.stage} without delegated head work (stage 0 of several, "
                    "replicas.head_delegation and replica_exchange = step)")
        if self.leads:
            return f"this head replica leads in term {self.head_term} itself"
        lead = heads.leader(self._head_peers())
        if lead is None or lead.peer_id != link.peer:
            return (f"peer {link.peer} is not the leader of stage 0 this replica sees announced "
                    f"({'none' if lead is None else lead.peer_id})")
        link.term = lead.head_term
        old = self.leaders.pop(link.peer, None)
        if old is not None:
            old.failure = old.failure or NodeError("replaced by a new link")
        link.listeners.append(self.poke)
        self.leaders[link.peer] = link
        self.poke()
        return ""

    def _delegate_refused(self, peer: str, reason: str) -> None:
        """A delegate broke the delegation protocol: logged, and banned from tasks for a while."""
        now = trio.current_time()
        ev = self.delegate_router.ban(peer, reason, now)
        self.events.append({"event": "ban", "peer": peer, "reason": reason, "count": ev.count,
                            "duration_s": ev.duration_s, "step": self.current_step, "delegate": True,
                            "time": time.time()})

    async def _drop_channel(self, ch: ActChannel) -> None:
        try:
            await ch.stream.reset()
        except Exception:  # already gone
            pass

    async def close(self) -> None:
        """Close every channel (orderly CLOSE first) and delegation link."""
        for ch in [*self.down.values(), *self.up.values()]:
            await ch.close()
        for link in [*self.delegates.values(), *self.leaders.values()]:
            await link.close()
        if self.avg_streams is not None:
            await self.avg_streams.close()
        self.down.clear()
        self.up.clear()
        self.delegates.clear()
        self.leaders.clear()

    def decode(self, fr: frames.Frame) -> Any:
        """Channel decoder: activations via the worker; gradients against the attempt's stash (None if stale)."""
        h = fr.header
        if h.kind == frames.Kind.ACTIVATION:
            return self.worker.decode(fr)
        ids = self.worker.stash_ids(h.step, self._key(h.microbatch, h.attempt, task=True)) \
            if self.worker.spec.is_first else None  # a head replica's stash of a delegated task, if it is one
        if ids is None:
            ids = self.worker.stash_ids(h.step, self._key(h.microbatch, h.attempt))
        if ids is None:
            return None  # late answer for an abandoned attempt: dropped by the loop
        for obs in self.worker.observers:
            obs.on_frame(fr)
        return self.worker.codec.decode_gradient(fr.payload, ids)

    def _key(self, mb: int, attempt: int, task: bool = False) -> int:
        """Stash key of a microbatch attempt (the head stashes one forward per microbatch it generates, and one per
        attempt of a delegated task, above every microbatch index)."""
        if self.worker.spec.is_first:
            return mb + self.m * (attempt + 1) if task else mb
        return mb + self.m * attempt

    # -- compute -----------------------------------------------------------------------------------

    async def _compute(self, fn: Any, *args: Any) -> Any:
        delay = self.rc.debug_delay_s

        def run() -> Any:
            t0 = time.perf_counter()
            out, cpu = thread_cpu(fn, *args)
            if delay:
                time.sleep(delay)
            return out, time.perf_counter() - t0, cpu

        out, dt, cpu = await trio.to_thread.run_sync(run)
        self._compute_s += dt
        self._compute_cpu_s += cpu
        return out

    def _grads_after(self, fn: Any, step: int, *args: Any) -> Any:
        """`fn(step, *args)` and the parameter gradient it left on the weights `step` computes with."""
        out = fn(step, *args)
        return out, averaging.take_grads(self.worker.weights_for(step))

    async def _contribute(self, step: int, mb: int, attempt: int, vec: torch.Tensor, loss: float | None,
                          up: str = "") -> bool:
        """Keep our contribution and give it to the stage peers; True once it may be committed.

        replica_exchange = "step": the dense gradient is only kept (with `up`, the previous-stage peer that sent the
        activation) until the step's commit is known, then summed into this replica's bundle (`_bundle`); True.

        A contribution may be committed (its gradient sent upstream) only once a second replica of the stage
        holds it, or no other replica of the stage is alive to hold it: otherwise this replica dying right
        after sending the gradient would lose a committed microbatch to the stage. Usable peers are pushed to
        and waited for (bounded by `avg_timeout_s`); peers in backoff are not waited for, but one background
        push per such peer probes it (`probe_loop`). When no peer took it that way, `_hold` keeps trying.
        """
        computed = self._computed.setdefault(step, [])
        if [mb, attempt] not in computed:  # an inner stage may get an attempt again after not committing it
            computed.append([mb, attempt])
        if self.per_step:
            self._dense.setdefault(step, {})[(mb, attempt)] = (vec, loss, up)
            return True
        if self.store.codec.compressed:  # the spec's replica_averaging encoding (torch work: off the event loop)
            vec = await trio.to_thread.run_sync(self.store.codec.encode, vec)
        self.store.add(step, mb, attempt, vec, loss)
        peers, backoff = self._split_stage_peers()
        for e in backoff:
            if e.peer_id not in self._probing:
                self._probing.add(e.peer_id)
                self._probe_send.send_nowait((e.peer_id, e.addrs[0], step, mb, attempt, vec, loss))
        held = 0

        async def one(peer: str, addr: str) -> None:
            nonlocal held
            try:
                await self._push(addr, step, mb, attempt, vec, loss, self.rc.avg_timeout_s)
                self._peer_failures.pop(peer, None)
                self._unreachable.pop(peer, None)
                self._holders.setdefault((step, mb, attempt), set()).add(peer)
                held += 1
            except trio.TooSlowError:  # a slow peer pulls (or is dropped) later
                self._peer_failed(peer)
            except Exception:  # a vanished peer: not waited for by `_hold` during its backoff
                self._peer_failed(peer)
                self._unreachable[peer] = self._peer_failures[peer][1]

        if peers:
            with trio.move_on_after(self.rc.avg_timeout_s):
                async with trio.open_nursery() as n:
                    for e in peers:
                        n.start_soon(one, e.peer_id, e.addrs[0])
        return held > 0 or await self._hold(step, mb, attempt, vec, loss)

    async def _push(self, addr: str, step: int, mb: int, attempt: int, vec: torch.Tensor, loss: float | None,
                    timeout_s: float, bundle: averaging.Held | None = None, claim: dict[int, int] | None = None) -> None:
        if self.rc.debug_push_delay_s:  # TEST ONLY: a slow link to the stage peers
            await trio.sleep(self.rc.debug_push_delay_s)
        await averaging.push(self.host, addr, self.spec_hash, self.stage, step, mb, attempt, vec, loss, timeout_s,
                             enc=self.store.codec.tag, bundle=bundle, claim=claim, pool=self.avg_streams)

    async def _push_held(self, addr: str, step: int, key: tuple[int, int], timeout_s: float) -> None:
        """Push the held contribution of `step` under `key` (a bundle as one) to a stage peer; a leading head that
        delegates claims the step's whole commit with it (`_claim`)."""
        h = self.store.held(step, key)
        await self._push(addr, step, key[0], key[1], h.vec, h.losses[0], timeout_s,
                         bundle=h if self.per_step else None, claim=self._claim(step))

    def _claim(self, step: int) -> dict[int, int] | None:
        """The commit a leading head that delegates claims with the bundles it pushes once its step is complete (the
        delegates' bundles come after its COMMIT, so a standby learns the commit from this one)."""
        committed = self._commits.get(step, {})
        if self.delegating and self.leads and step >= self.current_step and len(committed) == self.m:
            return dict(committed)
        return None

    def _leader_claim(self, step: int) -> dict[int, int] | None:
        """The whole commit of `step` the head leader this replica sees announced claimed with a bundle, if any."""
        lead = heads.leader(self._head_peers())
        claim = self.store.claims.get(step, {}).get(lead.peer_id) if lead is not None else None
        return claim if claim is not None and sorted(claim) == list(range(self.m)) else None

    async def _bundle(self, step: int, owned: list[tuple[int, int]], first_holder: bool = False) -> None:
        """replica_exchange = "step": sum this replica's `owned` dense gradients of `step` into one contribution,
        encode it once (the codec's error feedback runs per step), keep it and push it to every usable stage peer
        (each bounded by `avg_timeout_s`; one that misses it pulls it). Nothing to send when it owns nothing.

        first_holder: push it to one stage peer after the other until one holds it, and no further (the async
        leader's: its COMMIT then goes on and `_rest_of_bundle` pushes to the others meanwhile), the peers whose
        pushes were answered fastest first (`fastest_first` on the pushes' EWMA seconds)."""
        while self._bundled_through < step - 1:  # an early finish: the steps before it encode first (the codec's
            await self._bundle_turn.wait()  # state runs in step order)
        self._owned[step] = [list(p) for p in owned]
        dense = self._dense.get(step, {})
        if not owned:
            self._bundled(step)
            return
        t = time.perf_counter()
        try:
            vec = await trio.to_thread.run_sync(self._sum_and_encode, [dense[p][0] for p in owned])
        finally:
            self._bundled(step)
        self._phase(step, "encode_s", time.perf_counter() - t)
        try:
            self.store.add_bundle(step, owned, vec, [dense[p][1] for p in owned])
        except AveragingError as exc:  # a peer's bundle already claims one of our pairs: kept, ours is not sent
            self.events.append({"event": "bundle_conflict", "step": step, "error": str(exc), "time": time.time()})
            return
        key = (owned[0][0], owned[0][1])
        if not first_holder:
            await self._push_bundle(step, key, self._stage_peers())
            return
        for e in fastest_first(self._stage_peers(), self._push_s):
            await self._push_bundle(step, key, [e])
            if self._holders.get((step, *key)):
                return

    def _bundled(self, step: int) -> None:
        """`step`'s bundle is encoded (or it had none): a later step's early finish may encode its own."""
        self._bundled_through = max(self._bundled_through, step)
        self._bundle_turn.set()
        self._bundle_turn = trio.Event()

    async def _rest_of_bundle(self, step: int) -> None:
        """The async leader's bundle of `step` to every usable stage peer that does not hold it yet."""
        owned = self._owned.get(step)
        if not owned:
            return
        key = (owned[0][0], owned[0][1])
        held = self._holders.get((step, *key), set())
        await self._push_bundle(step, key, [e for e in self._stage_peers() if e.peer_id not in held])

    async def _push_bundle(self, step: int, key: tuple[int, int], peers: list[Any]) -> None:
        """Push the bundle of `step` held under `key` to `peers` at once (each bounded by `avg_timeout_s`; one that
        misses it pulls it, or the stage recovers without it)."""

        async def one(peer: str, addr: str) -> None:
            try:
                t = trio.current_time()
                await self._push_held(addr, step, key, self.rc.avg_timeout_s)
                self._push_s[peer] = ewma(self._push_s.get(peer), trio.current_time() - t, self.rc.ewma_alpha)
                self._peer_failures.pop(peer, None)
                self._unreachable.pop(peer, None)
                self._holders.setdefault((step, *key), set()).add(peer)
            except Exception:  # slow, refusing or gone: it pulls the bundle, or the stage recovers without it
                self._peer_failed(peer)

        with trio.move_on_after(self.rc.avg_timeout_s):
            async with trio.open_nursery() as n:
                for e in peers:
                    n.start_soon(one, e.peer_id, e.addrs[0])

    def _sum_and_encode(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """One contribution's words from dense gradients: summed in place into the first (kept nowhere else), then
        encoded (a worker thread's job: a whole stage's gradients)."""
        total = grads[0]
        for g in grads[1:]:
            total.add_(g)
        return self.store.codec.encode(total) if self.store.codec.compressed else total

    async def _owned_pairs(self, step: int) -> list[tuple[int, int]]:
        """replica_exchange = "step", below the head: the committed pairs this replica computed whose gradient the
        previous stage took (its COMMIT frame's `yours`), waiting up to `avg_timeout_s` for the verdict of every
        previous-stage peer that sent one of them. A pair whose verdict never came is left out (the stage then
        lacks it and re-fetches the state or rolls back, as for a lost contribution). A replica with no announced
        peer of its stage owns every committed pair it computed: no other replica of the stage computed one."""
        commit = self.store.commits[step]
        mine = {p: up for p, (_, _, up) in self._dense.get(step, {}).items() if commit.get(p[0]) == p[1]}
        if not self.discovery.stage_peers(self.stage):
            return sorted(mine)
        deadline = trio.current_time() + self.rc.avg_timeout_s
        while True:
            news = self._news  # a COMMIT frame pokes (the step loop may run meanwhile and owns `_wake`)
            self._take_commits()
            told = self._verdicts.get(step, {})
            if all(up in told for up in mine.values()) or trio.current_time() >= deadline:
                break
            with trio.move_on_after(min(0.1, deadline - trio.current_time())):
                await news.wait()
        return sorted(p for p, up in mine.items() if p[0] in told.get(up, set()))

    async def _hold(self, step: int, mb: int, attempt: int, vec: torch.Tensor, loss: float | None) -> bool:
        """Push to every announced stage peer, in backoff or not, until one holds the contribution (True).

        A peer that refuses or cannot be reached at all (a dead process) is out for this contribution and,
        while its backoff lasts, for the next ones (`_unreachable`: a dial to a dead process costs libp2p's
        retries, and a dead peer stays announced for discovery's entry_ttl_s); when
        every peer is out this replica is the stage's only live holder and the contribution may be committed
        (True); when it knows no stage peer at all, it first runs a discovery round (`alone_recheck_s`). A peer
        that is merely slow is tried again every `hold_retry_s` until `replica_timeout_s` has
        passed (False: the gradient is not sent, the upstream re-routes the microbatch after its own timeout).
        """
        deadline = trio.current_time() + self.rc.replica_timeout_s
        out: set[str] = set()
        while True:
            left = deadline - trio.current_time()
            now = trio.current_time()
            peers = [e for e in self.discovery.stage_peers(self.stage) if e.addrs and e.peer_id not in out
                     and self._unreachable.get(e.peer_id, 0.0) <= now]
            if not peers:
                if not out and trio.current_time() - self._alone_checked >= self.rc.alone_recheck_s:
                    # no stage peer known at all: ask the swarm once more before holding it alone (config field doc)
                    self._alone_checked = trio.current_time()
                    with trio.move_on_after(self.rc.avg_timeout_s):
                        await self.discovery.gossip_round()
                    continue
                return True
            if left <= 0:
                return False
            held = False

            async def one(peer: str, addr: str, timeout_s: float, scope: trio.CancelScope) -> None:
                nonlocal held
                try:
                    await self._push(addr, step, mb, attempt, vec, loss, timeout_s)
                    held = True
                    self._unreachable.pop(peer, None)
                    self._holders.setdefault((step, mb, attempt), set()).add(peer)
                    scope.cancel()  # one holder is enough; the others pull it if they lack it
                except trio.TooSlowError:  # slow, not gone: tried again
                    pass
                except Exception:  # refused or unreachable: out for this contribution and its backoff
                    out.add(peer)
                    self._peer_failed(peer)
                    self._unreachable[peer] = self._peer_failures[peer][1]

            with trio.move_on_after(left):
                async with trio.open_nursery() as n:
                    for e in peers:
                        n.start_soon(one, e.peer_id, e.addrs[0], left, n.cancel_scope)
            if held:
                return True
            await trio.sleep(min(self.rc.hold_retry_s, max(0.0, deadline - trio.current_time())))

    async def probe_loop(self) -> None:
        """Run the background pushes `_contribute` queues for stage peers in backoff (one per peer at a time)."""
        async with trio.open_nursery() as nursery:
            async for item in self._probe_recv:
                nursery.start_soon(self._probe, *item)

    async def _probe(self, peer: str, addr: str, step: int, mb: int, attempt: int, vec: torch.Tensor,
                     loss: float | None) -> None:
        try:
            await self._push(addr, step, mb, attempt, vec, loss, self.rc.avg_timeout_s)  # bounded by avg_timeout_s
            self._peer_failures.pop(peer, None)  # it answers again: pushes wait for it from now on
            self._unreachable.pop(peer, None)
            self._holders.setdefault((step, mb, attempt), set()).add(peer)
        except Exception:  # still unreachable: the backoff grows
            self._peer_failed(peer)
        finally:
            self._probing.discard(peer)

    def _stage_peers(self) -> list[Any]:
        """Announced peers of our stage, less those whose last exchange failed within their backoff."""
        return self._split_stage_peers()[0]

    def _split_stage_peers(self) -> tuple[list[Any], list[Any]]:
        """Announced peers of our stage with addresses: (usable now, in backoff after a failed exchange)."""
        now = trio.current_time()
        usable: list[Any] = []
        backoff: list[Any] = []
        for e in self.discovery.stage_peers(self.stage):
            if e.addrs:
                (usable if self._peer_failures.get(e.peer_id, (0, 0.0))[1] <= now else backoff).append(e)
        return usable, backoff

    def _peer_failed(self, peer: str) -> None:
        count = self._peer_failures.get(peer, (0, 0.0))[0] + 1
        self._peer_failures[peer] = (count, trio.current_time() + ban_duration(count, self.rc.ban_base_s,
                                                                               self.rc.ban_max_s))

    # -- routing -----------------------------------------------------------------------------------

    def _candidates(self) -> list[str]:
        return sorted(p for p, ch in self.down.items() if ch.failure is None)

    def _live_delegates(self) -> list[str]:
        return sorted(p for p, link in self.delegates.items() if link.failure is None)

    def _abandon(self, w: _Work, step: int, reason: str) -> None:
        """The replica holding `w` was lost or timed out: ban it and queue `w` again (a delegated microbatch: the
        leader generates it again, with a new attempt)."""
        now = trio.current_time()
        router = self.delegate_router if w.delegated else self.router
        if w.down:
            router.abandoned(w.down)
            if not router.is_banned(w.down, now):
                ev = router.ban(w.down, reason, now)
                self.events.append({"event": "ban", "peer": ev.peer, "reason": reason, "count": ev.count,
                                    "duration_s": ev.duration_s, "step": step, "delegate": w.delegated,
                                    "time": time.time()})
        if self.worker.spec.is_first and not w.task:  # a delegate keeps its leader's attempt, as an inner stage
            if heads.term_of(w.attempt + 1) != self.head_term:
                raise NodeError(f"stage 0 head at step {step}: microbatch {w.mb} was re-sent "
                                f"{heads.ATTEMPT_STRIDE} times (last to peer {w.down or 'none'}): giving up")
            w.attempt += 1  # a new attempt id; the old one's late answers are discarded
        w.down = ""
        self._rerouted += 1
        if w.delegated:
            del self._work[(step, w.mb)]
            self._next_attempt[(step, w.mb)] = w.attempt
            self._pending.appendleft((step, w.mb))
        else:
            self._queue.append((step, w.mb))

    async def _dispatch(self) -> None:
        """Send queued work to replicas with room (oldest step first)."""
        now = trio.current_time()
        while self._queue:
            key = self._queue[0]
            w = self._work.get(key)
            if w is None or w.down:
                self._queue.popleft()
                continue
            peer = self.router.choose(self._candidates(), now)
            if peer is None:
                return
            self._queue.popleft()
            w.down, w.sent_at = peer, now
            self.router.sent(peer)
            ch = self.down[peer]
            try:
                await ch.send_data(frames.Kind.ACTIVATION, key[0], w.mb, w.payload, w.window, attempt=w.attempt)
            except NodeError:
                self._abandon(w, key[0], "lost")

    def _check_timeouts(self) -> None:
        now = trio.current_time()
        for (step, _), w in list(self._work.items()):
            if not w.down:
                continue
            ch = (self.delegates if w.delegated else self.down).get(w.down)
            if ch is None or ch.failure is not None:
                self._abandon(w, step, "lost")
            elif now - w.sent_at > self.rc.replica_timeout_s:
                self._abandon(w, step, "timeout")

    # -- frames ------------------------------------------------------------------------------------

    async def _take_frames(self) -> list[tuple[ActChannel, Received]]:
        got: list[tuple[ActChannel, Received]] = []
        for peer, ch in list(self.up.items()) + list(self.down.items()):
            while True:
                try:
                    r = await ch.try_recv()
                except NodeError:
                    # a lost channel: its work is re-routed by _check_timeouts; upstream ones are just dropped
                    if self.up.get(peer) is ch:
                        del self.up[peer]
                    break
                if r is None:
                    break
                got.append((ch, r))
            self._take_commits_of(ch)
        return got

    def _take_commits(self) -> None:
        """Record the COMMIT frames every channel from the previous stage received (a head replica's links from
        its leader are read by `_take_tasks`)."""
        for ch in self.up.values():
            self._take_commits_of(ch)

    def _take_tasks(self) -> list[tuple[DelegateLink, Task]]:
        """Tasks (and COMMITs) from our leaders' links, or DONEs from our delegates' links, since the last call; a
        link that ended is dropped once read out (its outstanding tasks are then re-generated: `_check_timeouts`)."""
        got: list[tuple[DelegateLink, Task]] = []
        for links in (self.delegates, self.leaders):
            for peer, link in list(links.items()):
                got.extend((link, t) for t in link.take())
                self._take_commits_of(link)
                if link.failure is not None:
                    del links[peer]
        return got

    def _take_commits_of(self, ch: ActChannel | DelegateLink) -> None:
        """Record the COMMIT frames `ch` received (and, replica_exchange = step, their `yours` verdicts)."""
        while ch.commits:
            c = ch.commits.pop(0)
            self.store.commit(c["step"], c["commit"])
            if c.get("yours") is not None:
                self._verdicts.setdefault(c["step"], {})[ch.peer] = set(c["yours"])

    async def _on_activation(self, step: int, ch: ActChannel, r: Received) -> None:
        h = r.frame.header
        w = self.worker
        key = self._key(h.microbatch, h.attempt)
        if w.stash_ids(h.step, key) is not None or (h.step, h.microbatch) in self._work and \
                self._work[(h.step, h.microbatch)].attempt == h.attempt:
            return  # a duplicate of an attempt we already hold
        window, h_in = r.value
        if w.spec.is_last:
            (loss, vec) = await self._compute(self._grads_after, w.forward, h.step, key, window, h_in)
            self._ahead += h.step > self.current_step
            grad = await self._compute(w.backward, h.step, key, None)
            if not await self._contribute(h.step, h.microbatch, h.attempt, vec, float(loss), up=ch.peer):
                return  # no stage peer could hold it: not committed, the upstream re-routes the microbatch
            try:
                await ch.send_data(frames.Kind.GRADIENT, h.step, h.microbatch, grad, attempt=h.attempt)
            except NodeError:
                pass
            self._forwarded_one()
            return
        out = await self._compute(w.forward, h.step, key, window, h_in)
        self._ahead += h.step > self.current_step
        self._work[(h.step, h.microbatch)] = _Work(h.microbatch, h.attempt, out, r.frame.window, up=ch.peer)
        self._queue.append((h.step, h.microbatch))

    async def _on_task(self, link: DelegateLink, t: Task) -> None:
        """A head replica: its leader handed it microbatch `t` of a step it works on. It reads the window, runs stage
        0 and queues the activation for stage 1 (a task it holds already is ignored)."""
        step = t.step
        if heads.term_of(t.attempt) != link.term:
            self.events.append({"event": "delegation_refused", "peer": link.peer, "step": t.step, "time": time.time(),
                                "error": f"task attempt {t.attempt} is not of the leader's term {link.term}"})
            link.refuse(link.peer, "delegation_term")
            await link.close()
            return
        w = self.worker
        key = self._key(t.mb, t.attempt, task=True)
        held = self._work.get((step, t.mb))
        if w.stash_ids(step, key) is not None or (held is not None and held.attempt == t.attempt):
            return
        window = await self._compute(w.head_window, step, t.mb)
        out = await self._compute(w.forward, step, key, window, None)
        self._ahead += step > self.current_step
        self._work[(step, t.mb)] = _Work(t.mb, t.attempt, out, window_to_bytes(window, w.id_bytes), up=link.peer,
                                         task=True)
        self._queue.append((step, t.mb))

    async def _park_task(self, step: int, link: DelegateLink, t: Task) -> None:
        """Keep a task of a later step until we get there (the leader starts a step once the bundles of the last
        are in, so a delegate with no work in it can lag): up to `keep_steps` ahead, fewer than `num_microbatches`
        per step. One further ahead is dropped (the leader generates it again after its timeout); more tasks of
        one step than it has microbatches end the link, counted against the leader."""
        if t.step > step + self.window + self.rc.keep_steps:
            return
        if sum(1 for _, f in self._future_tasks if f.step == t.step) < self.m:
            self._future_tasks.append((link, t))
            return
        self.events.append({"event": "delegation_refused", "peer": link.peer, "step": step, "time": time.time(),
                            "error": f"more than {self.m} tasks of step {t.step} while this replica is at step {step}"})
        link.refuse(link.peer, "delegation_step")
        await link.close()

    async def _on_done(self, link: DelegateLink, t: Task) -> None:
        """The leading head replica: a delegate finished task `t` (its gradient is kept there): committed, unless
        the microbatch was generated again meanwhile."""
        step = t.step
        w = self._work.get((step, t.mb))
        if w is None or not w.delegated or w.attempt != t.attempt or w.down != link.peer:
            return  # late: the microbatch was handed to another replica or generated here since
        del self._work[(step, t.mb)]
        self._accepted.setdefault(step, {})[t.mb] = link.peer
        self.delegate_router.answered(link.peer, trio.current_time() - w.sent_at)
        self._commits.setdefault(step, {})[t.mb] = t.attempt
        self._delegated[step] += 1
        if self.discovery.stage_peers(self.stage):  # TEST hook: a leader dies right after a commit
            self._forwarded_one()

    async def _delegate(self, step: int, mb: int, peer: str) -> None:
        """The leading head replica hands microbatch `mb` to the head replica `peer` (not computed here)."""
        w = _Work(mb, self._attempt_for(step, mb), b"", b"", down=peer, sent_at=trio.current_time(), delegated=True)
        self._work[(step, mb)] = w
        self.delegate_router.sent(peer)
        self._assigned[(step, peer)] += 1
        try:
            await self.delegates[peer].send_task(step, mb, w.attempt)
        except NodeError:
            self._abandon(w, step, "lost")

    def _helper(self, step: int, now: float, fair: bool) -> str | None:
        """The delegate the leader's next microbatch (of `step`) goes to: one with fewer than `max_tasks`
        outstanding (the router's choice among them) and, when the leader can compute it itself (`fair`), fewer
        microbatches of the step so far than an even share among the leader and its delegates; None: the leader
        computes it."""
        live = self._live_delegates()
        share = -(-self.m // (len(live) + 1))
        return self.delegate_router.choose([p for p in live if not fair or self._assigned[(step, p)] < share], now)

    def _attempt_for(self, step: int, mb: int) -> int:
        """The attempt the leader's next generation of (`step`, `mb`) takes (the term's first, or one past an
        abandoned one)."""
        return self._next_attempt.get((step, mb), heads.attempt_base(self.head_term))

    async def _on_gradient(self, step: int, ch: ActChannel, r: Received) -> None:
        h = r.frame.header
        w = self._work.get((h.step, h.microbatch))
        if r.value is None or w is None or w.attempt != h.attempt or w.down != ch.peer or w.delegated \
                or not step <= h.step <= step + self.window:
            return  # late: the attempt was abandoned or re-routed
        del self._work[(h.step, h.microbatch)]
        self._accepted.setdefault(h.step, {})[h.microbatch] = ch.peer
        self.router.answered(ch.peer, trio.current_time() - w.sent_at)
        key = self._key(h.microbatch, h.attempt, task=w.task)
        grad, vec = await self._compute(self._grads_after, self.worker.backward, h.step, key, r.value)
        held = await self._contribute(h.step, h.microbatch, h.attempt, vec, None, up=w.up)
        while not held and self.worker.spec.is_first and not w.task:  # a head replica: its own commit waits for a
            held = await self._hold(h.step, h.microbatch, h.attempt, vec, None)  # holder
        if not held:
            return  # not committed: the upstream re-routes the microbatch after its timeout
        if w.task:  # a delegate: its leader commits the microbatch
            link = self.leaders.get(w.up)
            if link is not None and link.failure is None:
                try:
                    await link.send_done(h.step, h.microbatch, h.attempt)
                except NodeError:
                    pass
            self._forwarded_one()
            return
        if self.worker.spec.is_first:
            self._commits.setdefault(h.step, {})[h.microbatch] = h.attempt
            if self.discovery.stage_peers(self.stage):  # TEST hook: a leader dies right after a commit a standby holds
                self._forwarded_one()
            return
        up = self.up.get(w.up)
        if up is not None and up.failure is None:
            try:
                await up.send_data(frames.Kind.GRADIENT, h.step, h.microbatch, grad, attempt=h.attempt)
            except NodeError:
                pass
            self._forwarded_one()

    def _forwarded_one(self) -> None:
        """A gradient went upstream, or a leading head committed a microbatch while a standby head replica is
        announced (TEST ONLY hook: `debug_exit_after_forwards` kills the node here)."""
        self._forwards += 1
        if self.rc.debug_exit_after_forwards and self._forwards >= self.rc.debug_exit_after_forwards:
            time.sleep(0.2)  # blocks the event loop (nothing more is served) while the kernel sends the gradient
            os.kill(os.getpid(), signal.SIGKILL)

    # -- the step ----------------------------------------------------------------------------------

    async def _wait(self, limit: float) -> None:
        self._wake = trio.Event()
        with trio.move_on_after(limit):
            await self._wake.wait()

    async def run_step(self, step: int) -> StepOutcome:
        """Run global step `step` on this replica until its commit is applied."""
        t0 = time.perf_counter()
        self._compute_s = 0.0
        self._compute_cpu_s = 0.0
        self._rerouted = 0
        self._ahead = 0
        self.current_step = step
        self._bundled(step - 1)  # the steps before this one are applied (or were fetched): their bundles are done
        last = step + self.window  # the newest step whose work runs now (the async schedule's window)
        w = self.worker
        head = self.leads
        standby = w.spec.is_first and not head
        if head:
            # a leader adopts the commits of the step its held contributions prove (after a takeover, the old
            # leader's); the steps of the window after it were opened by earlier calls (async) or are opened now
            self._commits[step] = {**heads.held_commits(self.store.pairs(step)), **self._commits.get(step, {})}
            self._open_steps(step)
        no_replica_since: float | None = None
        tick = min(0.25, self.rc.replica_timeout_s / 4, self.rc.commit_poll_s)
        # frames (and delegated tasks) that arrived early for the steps now in the window
        early = [(ch, r) for ch, r in self._future if r.frame.header.step <= last]
        self._future = [(ch, r) for ch, r in self._future if r.frame.header.step > last]
        early_tasks = [(link, t) for link, t in self._future_tasks if t.step <= last]
        self._future_tasks = [(link, t) for link, t in self._future_tasks if t.step > last]
        prep = self._early.pop(step, None)  # async window: set once the step's finish (all but the update) ran;
        # started already when a finish of earlier steps ran beside it (`_finish_early`)
        started_early = prep is not None
        failure: NodeError | None = None  # raised once the nursery is closed (no exception groups)
        async with trio.open_nursery() as finishing:  # the async window keeps working while a step finishes
            try:
                while True:
                    if self.fatal is not None:
                        raise self.fatal
                    self.check_rollback()
                    for link, t in early_tasks + self._take_tasks():
                        if step <= t.step <= last:
                            await (self._on_done(link, t) if link.leading else self._on_task(link, t))
                        elif t.step > last and not link.leading:  # the leader may be ahead while we finish a step
                            await self._park_task(step, link, t)
                    early_tasks = []
                    arrived = early + await self._take_frames()
                    early = []
                    for ch, r in arrived:
                        h = r.frame.header
                        if h.step > last:
                            self._future.append((ch, r))
                        elif h.step < step:
                            continue
                        elif h.kind == frames.Kind.ACTIVATION:
                            await self._on_activation(step, ch, r)
                        else:
                            await self._on_gradient(step, ch, r)
                    if standby and step not in self.store.commits:
                        held = heads.held_commits(self.store.pairs(step))
                        claim = self._leader_claim(step)
                        if claim is not None:  # the leader's complete commit, with its bundle (delegated head work)
                            self.store.commit(step, claim)
                        elif len(held) == self.m:  # every microbatch's committed contribution is here: the leader's commit
                            self.store.commit(step, held)
                    if prep is not None:  # the async window: the step finishes beside this loop
                        if not standby:
                            self._finish_early(step, last)
                        if prep.is_set():
                            break
                    elif self._commit_known(step):
                        if not self.window:  # gpipe / 1f1b: the step finishes after the loop (`_finish`)
                            if head:
                                await self._lead_commit(step)
                            break
                        prep = trio.Event()
                        finishing.start_soon(self._finish_in_window, step, prep)
                    if standby and prep is None and await self._leader_lost(step):
                        if self.delegating:  # a head replica the lost leader's COMMIT reached may hold it: not lost then
                            with trio.move_on_after(self.rc.avg_timeout_s):
                                await self.pull_commit(step, 0.0, every_peer=True)
                            if step in self.store.commits:
                                continue
                        self._take_over(step)
                        for link in self.leaders.values():
                            await link.close()
                        self.leaders.clear()
                        for key, v in list(self._work.items()):  # the lost leader's tasks: never committed now
                            if v.task:
                                if v.down:
                                    self.router.abandoned(v.down)
                                del self._work[key]
                        head, standby = True, False
                        self._commits = {step: heads.held_commits(self.store.pairs(step))}
                        self._opened, self._pending, self._next_attempt, self._assigned = set(), deque(), {}, Counter()
                        self._open_steps(step)
                        continue
                    if head and w.spec.is_first:
                        self._check_rival(step)
                    if not w.spec.is_last:
                        self._check_timeouts()
                        if head and self._pending and not self._queue:
                            now = trio.current_time()
                            k, mb = self._pending[0]
                            here = self.router.choose(self._candidates(), now) is not None
                            helper = self._helper(k, now, fair=here) if self.delegates else None
                            if helper is not None:  # a head replica with room takes it (`node.replicas.delegation`)
                                self._pending.popleft()
                                await self._delegate(k, mb, helper)
                                self.poke()
                            elif here:
                                self._pending.popleft()
                                window = await self._compute(w.head_window, k, mb)
                                out = await self._compute(w.forward, k, mb, window, None)
                                self._ahead += k > step
                                self._work[(k, mb)] = _Work(mb, self._attempt_for(k, mb), out,
                                                            window_to_bytes(window, w.id_bytes))
                                self._queue.append((k, mb))
                                self.poke()
                        await self._dispatch()
                        now = trio.current_time()
                        waiting = bool(self._queue) or (head and bool(self._pending))
                        usable = self._candidates_usable(now)
                        self._had_next = self._had_next or usable
                        if waiting and not usable:
                            no_replica_since = no_replica_since if no_replica_since is not None else now
                            # before any replica of the next stage was ever usable (a swarm starting on a loaded machine)
                            # the wait is discovery's, for a peer serving a needed stage
                            limit = self.rc.no_replica_timeout_s if self._had_next else \
                                max(self.rc.no_replica_timeout_s, self.cfg.discovery.discovery_timeout_s)
                            if now - no_replica_since > limit:
                                lost = self.router.events[-1].peer if self.router.events else ""
                                raise NoReplicaError(
                                    f"stage {self.stage}: no usable replica of stage {self.stage + 1} within "
                                    f"replicas.no_replica_timeout_s={self.rc.no_replica_timeout_s} (discovery.discovery_timeout_s="
                                    f"{self.cfg.discovery.discovery_timeout_s} before the first) at step {step}"
                                    + (f" (last lost: peer {lost})" if lost else ""), lost, self.stage + 1)
                        else:
                            no_replica_since = None
                    if not w.spec.is_first:
                        self._check_upstream(step)
                    if self._wake.is_set():
                        self._wake = trio.Event()
                        continue
                    await self._wait(tick)
            except NodeError as exc:
                failure = exc
                finishing.cancel_scope.cancel()
        if failure is not None:
            raise failure
        if self.window:
            out = await self._apply(step, t0)
            out.extra["finished_early"] = started_early
            return out
        self._phase(step, "loop_s", time.perf_counter() - t0)  # gpipe: the step's work, the leader's commit and the
        # commit reaching this replica
        return await self._finish(step, t0)

    def _finish_early(self, step: int, last: int) -> None:
        """`replicas.pipelined_finish`, the async window while `step` finishes: start the finish of each later step of
        the window (up to `last`) whose commit is known here, in step order, in the engine's nursery: its COMMIT, bundle
        and the peers' contributions then travel while the steps before it finish. The updates stay in step order (each
        step's run_step applies it); a standby head replica never starts one (it may take over)."""
        if not self.rc.pipelined_finish or self.finishing is None:
            return
        k = max(self._early, default=step) + 1  # the steps it holds are all after `step`
        while k <= min(last, self.cfg.runtime.steps - 1) and self._commit_known(k):
            done = self._early[k] = trio.Event()
            self.finishing.start_soon(self._finish_in_window, k, done)
            k += 1

    def _commit_known(self, step: int) -> bool:
        """Whether this replica knows `step`'s commit: the leader once every microbatch is committed, any other
        replica once the commit reached its store."""
        return len(self._commits.get(step, {})) == self.m if self.leads else step in self.store.commits

    def _open_steps(self, step: int) -> None:
        """A leading head at `step`: queue for generation every microbatch not yet committed of each step of the
        window not opened yet (the run's last step at most)."""
        for k in range(step, min(step + self.window, self.cfg.runtime.steps - 1) + 1):
            if k not in self._opened:
                self._opened.add(k)
                done = self._commits.setdefault(k, {})
                self._pending.extend((k, mb) for mb in range(self.m) if mb not in done)

    @property
    def leads(self) -> bool:
        """True on the head stage's step authority (a single head replica always leads)."""
        return self.worker.spec.is_first and self.head_term >= 0

    def _head_peers(self) -> list[Any]:
        peers = self.discovery.stage_peers(0)
        self._terms_seen.update(e.head_term for e in peers if e.head_term >= 0)
        return peers

    def _check_rival(self, step: int) -> None:
        """A leader outranked by another announced leader stops (two leaders must not both commit)."""
        r = heads.rival(self.discovery.me.peer_id, self.head_term, self._head_peers())
        if r is not None:
            raise NodeError(f"stage 0 head replica at step {step}: peer {r.peer_id} leads in term {r.head_term}, "
                            f"this one in term {self.head_term}: stopping, the step authority is theirs")

    async def _leader_lost(self, step: int) -> bool:
        """A standby head replica: True when it must take over the step authority now.

        Every `commit_poll_s` (at most every third of `head_takeover_s`) it pings the announced leader (a
        pull of `heads.PING_STEP`, which nobody holds: an empty answer; the step's contributions come by push,
        or by `commit_poller`'s pull when idle). The leader is lost once every ping for `head_takeover_s`
        failed to connect (a refusal or a slow answer means it is alive), or when no leader is announced any
        more; the lowest-id reachable standby then takes over (`heads.successor`).
        """
        now = trio.current_time()
        if now - self._last_probe < min(self.rc.commit_poll_s, self.rc.head_takeover_s / 3):
            return False
        self._last_probe = now
        peers = self._head_peers()
        lead = heads.leader(peers)
        if lead is not None and lead.addrs:
            try:
                await averaging.pull(self.host, lead.addrs[0], self.spec_hash, 0, heads.PING_STEP, self.store.size,
                                     0.0, self.rc.avg_timeout_s, codec=self.store.codec, pool=self.avg_streams)
            except (trio.TooSlowError, AveragingError):  # slow or refusing: alive
                self._leader_down_since = None
                return False
            except Exception:  # dial or stream failures of many libp2p / OS types: it may be gone
                self._leader_down_since = self._leader_down_since if self._leader_down_since is not None else now
                if trio.current_time() - self._leader_down_since < self.rc.head_takeover_s:
                    return False
            else:
                self._leader_down_since = None
                return False
        standbys = [e.peer_id for e in peers if e.head_term < 0 and e.addrs
                    and self._unreachable.get(e.peer_id, 0.0) <= now]
        return heads.successor(self.discovery.me.peer_id, standbys)

    async def _hand_to_standbys(self, step: int) -> None:
        """A leader's step is complete: before its COMMIT goes downstream, every reachable standby gets each
        committed contribution no push gave it yet (one that joined mid-step missed the earlier ones), so a
        standby never lacks a step the pipeline applied. Every announced standby is tried, even one in
        backoff (it may be back); one that fails or is slower than `avg_timeout_s` is skipped."""
        committed = self._commits.get(step, {})
        keys = [k for k, covers in self.store.entries(step) if all(committed.get(mb) == a for mb, a in covers)]
        for e in self._head_peers():
            if not e.addrs:
                continue
            for mb, a in keys:
                if e.peer_id in self._holders.get((step, mb, a), set()):
                    continue
                try:
                    await self._push_held(e.addrs[0], step, (mb, a), self.rc.avg_timeout_s)
                except trio.TooSlowError:
                    self._peer_failed(e.peer_id)
                    break
                except Exception:  # refused or unreachable (many libp2p / OS types)
                    self._peer_failed(e.peer_id)
                    self._unreachable[e.peer_id] = self._peer_failures[e.peer_id][1]
                    break
                self._holders.setdefault((step, mb, a), set()).add(e.peer_id)

    def _take_over(self, step: int) -> None:
        """Become the leader in the next term (announced at once); NodeError past the last term, or when the
        next stage already applied this step (its commit went downstream without this standby holding it)."""
        lost = heads.leader(self._head_peers())
        ahead = [e for e in self.discovery.stage_peers(1) if e.next_step > step]
        if ahead:
            raise NodeError(f"stage 0 head replica at step {step}: cannot take over from peer "
                            f"{lost.peer_id if lost else 'unknown'}: stage 1 peer {ahead[0].peer_id} already applied "
                            f"step {step}, whose committed contributions this standby does not all hold")
        attempts = self.store.attempts()
        term = heads.next_term(self._terms_seen, attempts)
        try:
            heads.attempt_base(term)
        except ValueError as exc:
            raise NodeError(f"stage 0 head replica at step {step}: cannot take over from peer "
                            f"{lost.peer_id if lost else 'unknown'}: {exc}") from exc
        self.head_term = term
        self._terms_seen.add(term)
        self.discovery.update_me(head_term=term)
        self.events.append({"event": "takeover", "peer": lost.peer_id if lost else "", "term": term, "step": step,
                            "adopted": len(heads.held_commits(self.store.pairs(step))), "time": time.time()})

    def _check_upstream(self, step: int) -> None:
        """A non-head replica waiting for its step: UpstreamLostError once no replica of the previous stage has had
        a channel open to it for `no_replica_timeout_s` (before the first one: at least `discovery_timeout_s`, as
        the head waits that long for its start quorum), naming the last one, the stage and the step."""
        now = trio.current_time()
        live = [p for p, ch in self.up.items() if ch.failure is None]
        if live:
            self._had_up, self._upless_since, self._last_up = True, None, live[0]
            return
        if self._upless_since is None:
            self._upless_since = now
            return
        limit = self.rc.no_replica_timeout_s if self._had_up else \
            max(self.rc.no_replica_timeout_s, self.cfg.discovery.discovery_timeout_s)
        if now - self._upless_since > limit:
            raise UpstreamLostError(
                f"stage {self.stage} replica at step {step}: no replica of stage {self.stage - 1} had a channel open "
                f"to it for {limit:g} s (replicas.no_replica_timeout_s={self.rc.no_replica_timeout_s}"
                + ("" if self._had_up else
                   f", discovery.discovery_timeout_s={self.cfg.discovery.discovery_timeout_s} before the first")
                + ")" + (f"; last: peer {self._last_up}" if self._last_up else "") + ": the pipeline upstream is gone",
                self._last_up, self.stage - 1)

    def _candidates_usable(self, now: float) -> bool:
        return any(not self.router.is_banned(p, now) for p in self._candidates())

    async def _forward_commit(self, step: int, owned: set[int]) -> None:
        """Send `step`'s commit to every next-stage replica; replica_exchange = step: with the microbatches of
        `owned` (this replica's own) whose gradient it took from that replica (`yours`)."""
        if step in self._forwarded or self.worker.spec.is_last:
            return
        self._forwarded.add(step)
        commit = self.store.commits[step]
        for link in list(self.delegates.values()):  # the head replicas that worked on it learn it first
            if link.failure is None:
                try:
                    await link.send_commit(step, commit)
                except NodeError:
                    pass
        accepted = self._accepted.get(step, {})
        for peer, ch in list(self.down.items()):
            if ch.failure is None:
                yours = [mb for mb, d in accepted.items() if d == peer and mb in owned] if self.per_step else None
                try:
                    await ch.send_commit(step, commit, yours)
                except NodeError:
                    pass

    async def pull_commit(self, step: int, wait_s: float, every_peer: bool = False) -> bool:
        """Ask stage peers for `step`'s commit and contributions; True once the commit is known here.

        every_peer: include peers whose last exchange failed (still in their backoff)."""
        peers = [e for e in self.discovery.stage_peers(self.stage) if e.addrs] if every_peer else self._stage_peers()
        for e in peers:
            try:
                commit, items = await averaging.pull(self.host, e.addrs[0], self.spec_hash, self.stage, step,
                                             self.store.size, wait_s, self.rc.avg_timeout_s, codec=self.store.codec,
                                             pool=self.avg_streams)
            except Exception:  # unreachable / refusing peers are skipped
                self._peer_failed(e.peer_id)
                continue
            for h in items:
                try:
                    self.store.add_held(step, h)
                except AveragingError:
                    continue
            if commit is not None:
                self.store.commit(step, commit)
            if step in self.store.commits and not self.store.missing(step):
                return True
        return step in self.store.commits

    async def commit_poller(self) -> None:
        """A replica idle for `commit_poll_s` without its step's commit asks its stage peers for it.

        While it is behind (frames of later steps are waiting) and pulls succeed, it pulls the next step
        `catchup_poll_s` after the last one is applied, so a replica that just fetched the stage state
        replays the steps since at network speed instead of one step per `commit_poll_s`.

        If the pipeline is already past our step and no peer can give us its commit within
        `no_replica_timeout_s`, our state is lost (the peers that held it are gone): the engine fails
        with a StateLostError (the runner rolls the swarm back, or stops) instead of waiting forever.
        """
        stuck_since: float | None = None
        catching_up = False  # the last pull gave a step while we were behind: pull the next one soon
        while True:
            await trio.sleep(self.rc.catchup_poll_s if catching_up else self.rc.commit_poll_s)
            step = self.current_step
            idle = trio.current_time() - self._last_event >= self.rc.commit_poll_s
            behind = any(r.frame.header.step > step for _, r in self._future)
            if self.leads or step in self.store.commits:
                stuck_since = None
                catching_up = catching_up and behind  # the engine is applying the pulled step
                continue
            catching_up = False
            if idle or behind:
                if await self.pull_commit(step, 0.0):
                    self.poke()
                    stuck_since = None
                    catching_up = behind  # replay the steps we missed at network speed, not one per poll
                    continue
                ahead = [e.peer_id for e in self.discovery.stage_peers(self.stage) if e.next_step > step]
                self._ahead_peers = ahead or self._ahead_peers  # the last peers known to hold the newer state
                peer_steps = [e.next_step for e in self.discovery.stage_peers(self.stage)]
                # a standby head whose leader stopped answering goes on by itself (it holds what it needs, or
                # takes over): re-fetching the state would only wait for the dead leader
                if peer_steps and max(peer_steps) > step + 1 and not (self.worker.spec.is_first
                                                                      and self._leader_down_since is not None):
                    self.fatal = ResyncNeededError(
                        f"stage {self.stage} replica is at step {step}, a stage peer is at step {max(peer_steps)} and "
                        f"none gave step {step}'s commit: fetching the stage state again")
                    self.poke()
                    return
            now = trio.current_time()
            if not behind:
                stuck_since = None
            elif stuck_since is None:
                stuck_since = now
            elif now - stuck_since > self.rc.no_replica_timeout_s:
                newest = max(r.frame.header.step for _, r in self._future)
                self.fatal = StateLostError(
                    f"stage {self.stage} replica is at step {step} while the pipeline is at step {newest}, and no "
                    f"peer of its stage gave step {step}'s commit within replicas.no_replica_timeout_s="
                    f"{self.rc.no_replica_timeout_s}: the stage's newer state is lost (last held by peer "
                    f"{', '.join(self._ahead_peers) or 'unknown'})", step, tuple(self._ahead_peers))
                self.poke()
                return

    async def _lead_commit(self, step: int) -> None:
        """The leading head completed `step`: its bundle (every committed microbatch it computed) goes to the stage
        peers and each standby gets what it lacks before the commit is recorded (and sent downstream). In the async
        window with delegated head work one head replica holding the bundle is enough before the COMMIT goes on (the
        others learn the commit from its claim or the COMMIT over their link, and pull a bundle they lack): the rest
        is pushed while the step finishes (`_prepare`), beside the delegates' own bundles."""
        early = self._early_commit()
        if self.per_step and step not in self._owned:
            dense = self._dense.get(step, {})
            await self._bundle(step, sorted(p for p in self._commits[step].items() if p in dense), first_holder=early)
        if not early:
            await self._hand_to_standbys(step)
        self.store.commit(step, self._commits[step])

    def _early_commit(self) -> bool:
        """Whether this leader sends its COMMIT on once one head replica holds its bundle (`_lead_commit`)."""
        return self.window > 0 and self.delegating and self.leads

    async def _finish_in_window(self, step: int, done: trio.Event) -> None:
        """The async window: finish `step` (the leader's commit, the COMMIT on, the bundle, every committed
        contribution) alongside the work of later steps, then wake the step loop to apply the update."""
        try:
            if self.leads and step not in self.store.commits:
                await self._lead_commit(step)
            await self._prepare(step)
        except NodeError as exc:  # the step loop raises it (a re-sync, a rollback, a lost state)
            self.fatal = exc
        else:
            done.set()
        self.poke()

    async def _finish(self, step: int, t0: float) -> StepOutcome:
        """Finish `step` (`_prepare`) and apply its update (`_apply`)."""
        await self._prepare(step)
        return await self._apply(step, t0)

    async def _prepare(self, step: int) -> None:
        """Everything of finishing `step` but the update: the COMMIT on (with this replica's own pairs), this
        replica's bundle, and every committed contribution of the stage here (else a re-sync or a rollback)."""
        w = self.worker
        commit = self.store.commits[step]
        t = time.perf_counter()
        if self.per_step and step not in self._owned:
            dense = self._dense.get(step, {})
            owned = await self._owned_pairs(step) if not w.spec.is_first else \
                sorted(p for p in dense if commit.get(p[0]) == p[1])
            self._phase(step, "verdicts_s", time.perf_counter() - t)
            await self._forward_commit(step, {mb for mb, _ in owned})
            await self._bundle(step, owned)
        else:
            await self._forward_commit(step, {mb for mb, _ in self._owned.get(step, [])})
        self._phase(step, "bundle_s", time.perf_counter() - t)  # with the verdicts' wait and the encoding
        t = time.perf_counter()
        if self._early_commit():
            self._commits_sent += 1
            if self.rc.debug_exit_after_commits and self._commits_sent >= self.rc.debug_exit_after_commits:
                time.sleep(0.2)  # TEST ONLY: the kernel sends the COMMIT frames, then the leader dies
                os.kill(os.getpid(), signal.SIGKILL)
            await self._rest_of_bundle(step)
        deadline = trio.current_time() + self.rc.avg_timeout_s
        while self.store.missing(step) and trio.current_time() < deadline:
            with trio.move_on_after(min(0.5, max(0.0, deadline - trio.current_time()))):
                await self.store.changed.wait()
            if self.store.missing(step):  # a push may have been lost: ask every stage peer, backoff or not
                with trio.move_on_after(max(0.0, deadline - trio.current_time())):
                    await self.pull_commit(step, 0.0, every_peer=True)
        if self.store.missing(step):  # never applied without every committed contribution
            since = trio.current_time()
            self.events.append({"event": "contributions_missing", "step": step,
                                "microbatches": self.store.missing(step), "time": time.time()})
            while self.store.missing(step):
                await self._await_missing(step, since)
        self._phase(step, "contributions_s", time.perf_counter() - t)  # the rest of the leader's bundle, then the
        # wait for every committed contribution of the stage

    def _phase(self, step: int, name: str, seconds: float) -> None:
        """Add `seconds` to phase `name` of `step` (its progress record's "phases")."""
        phases = self._phases.setdefault(step, {})
        phases[name] = phases.get(name, 0.0) + seconds

    async def _apply(self, step: int, t0: float) -> StepOutcome:
        """Apply `step`'s update from the committed contributions (`_prepare` ran) and drop what the step held."""
        w = self.worker
        commit = self.store.commits[step]
        dropped = self.store.missing(step)  # always empty: kept in the record for exactly-once checks
        items = self.store.committed(step)
        t_update = time.perf_counter()
        update_cpu_s = 0.0
        async with self.lock:
            if items:
                flat, update_cpu_s = await trio.to_thread.run_sync(
                    thread_cpu, averaging.combine, [h.vec for h in items], self.m, self.rc.aggregation,
                    self.store.codec, [len(h.covers) for h in items])
            else:
                flat = torch.zeros(self.store.size)
            w.drop_step(step)  # forwards of abandoned attempts; the gradients were taken per microbatch
            _, opt_cpu_s = await trio.to_thread.run_sync(thread_cpu, self._install_and_step, step, flat)
            update_cpu_s += opt_cpu_s
        update_s = time.perf_counter() - t_update
        phases = {k: round(v, 4) for k, v in self._phases.get(step, {}).items()}
        # abandoned attempts of this step
        for k, v in self._work.items():
            if k[0] <= step and v.down:
                (self.delegate_router if v.delegated else self.router).abandoned(v.down)
        for link in self.delegates.values():
            link.forget(step)
        self._work = {k: v for k, v in self._work.items() if k[0] > step}
        self._queue = deque(k for k in self._queue if k[0] > step)
        self._pending = deque(k for k in self._pending if k[0] > step)
        self._next_attempt = {k: v for k, v in self._next_attempt.items() if k[0] > step}
        self._assigned = Counter({k: v for k, v in self._assigned.items() if k[0] > step})
        self._opened = {k for k in self._opened if k > step}
        self._commits.pop(step, None)
        losses = [loss for h in items for loss in h.losses if loss is not None]
        computed = self._computed.pop(step, [])
        mine = sorted(self._owned[step]) if self.per_step else sorted(x for x in computed if commit.get(x[0]) == x[1])
        for d in (self._dense, self._accepted, self._verdicts, self._owned, self._phases):
            for old in [old for old in d if old <= step]:
                del d[old]  # type: ignore[attr-defined]
        tokens = self.m * w.microbatch_size * w.config.seq_len
        mine_tokens = len(computed) * w.microbatch_size * w.config.seq_len
        if mine_tokens and self._compute_s > 0:
            self.throughput = mine_tokens / self._compute_s
        self.store.prune(step + 1 - self.rc.keep_steps)
        self._holders = {k: v for k, v in self._holders.items() if k[0] > step}
        wire = self.endpoint.totals
        bytes_in, bytes_out = wire.bytes_in - self._wire_seen[0], wire.bytes_out - self._wire_seen[1]
        self._wire_seen = (wire.bytes_in, wire.bytes_out)
        return StepOutcome(
            step=step, loss=sum(losses) / len(losses) if losses and w.spec.is_last else None,
            applied=sorted([mb, a] for h in items for mb, a in h.covers), mine=mine, computed=sorted(computed), dropped=dropped,
            rerouted=self._rerouted, seconds=time.perf_counter() - t0, compute_s=self._compute_s, tokens=tokens,
            compute_cpu_s=self._compute_cpu_s, update_cpu_s=update_cpu_s,
            extra={"ahead": self._ahead, "update_s": update_s, "phases": phases, "bytes_in": bytes_in,
                   "bytes_out": bytes_out, **({"delegated": self._delegated.pop(step, 0)} if w.spec.is_first else {})})

    def _install_and_step(self, step: int, flat: torch.Tensor) -> None:
        """The combined gradient installed on the weights `step` computed with, and the optimizer step (a worker
        thread's job: a whole stage's parameters twice over)."""
        averaging.set_grads(self.worker.weights_for(step), flat)
        self.worker.step(step)

    def _live_stage_peers(self) -> list[Any]:
        """Stage peers of our generation that showed a sign of life within `discovery.liveness_s()` (their own
        announcement, as for rollbacks) and whose last dial did not fail (`_unreachable`)."""
        fresh = {e.peer_id for e in self.discovery.recent(self.cfg.discovery.liveness_s())}
        now = trio.current_time()
        return [e for e in self.discovery.stage_peers(self.stage)
                if e.peer_id in fresh and self._unreachable.get(e.peer_id, 0.0) <= now]

    async def _await_missing(self, step: int, since: float) -> None:
        """`step` is committed but some committed contributions are still not here `avg_timeout_s` after the
        commit (since `since`). The step is never applied without them: every replica must apply the same update
        and a committed microbatch must be applied. One round: pull them from every stage peer; when a live peer
        has already applied the step, fetch its state instead (ResyncNeededError); when no live stage peer is
        left, or none gave them within `no_replica_timeout_s`, they are lost with their holder: StateLostError
        (the runner rolls the swarm back to a step every stage holds, or stops naming the peer, the stage and the
        step)."""
        if self.fatal is not None:
            raise self.fatal
        self.check_rollback()  # a peer that found the same contributions lost may have started the rollback
        with trio.move_on_after(0.5):
            await self.store.changed.wait()
        if not self.store.missing(step):
            return
        with trio.move_on_after(self.rc.avg_timeout_s):
            await self.pull_commit(step, 0.0, every_peer=True)
        if not self.store.missing(step):
            return
        live = self._live_stage_peers()
        ahead = [e for e in live if e.next_step > step]
        what = (f"stage {self.stage} replica at step {step} lacks the committed contributions of microbatches "
                f"{self.store.missing(step)} after replicas.avg_timeout_s={self.rc.avg_timeout_s}")
        if ahead:
            raise ResyncNeededError(f"{what}; peer {ahead[0].peer_id} of the stage already applied the step: "
                                    "fetching the stage state again")
        if live and trio.current_time() - since <= self.rc.no_replica_timeout_s:
            return
        gone = sorted({e.peer_id for e in self.discovery.stage_peers(self.stage)} - {e.peer_id for e in live})
        lost = tuple(gone or self._ahead_peers)
        raise StateLostError(
            f"{what} and no live peer of its stage gave them"
            + (f" within replicas.no_replica_timeout_s={self.rc.no_replica_timeout_s}" if live else "")
            + f": they are lost with their holder (last stage peers: {', '.join(lost) or 'none'})", step, lost)

    def plan(self, me: str) -> Move | None:
        """This node's rebalancing move, if the announcements call for one (head replicas never move: a
        standby head computes nothing and stays for the takeover)."""
        if self.worker.spec.is_first:
            return None
        nodes = [(e.peer_id, e.stage, e.throughput) for e in self.discovery.entries()
                 if e.spec_hash == self.spec_hash and e.num_stages == self.worker.spec.num_stages and e.stage > 0]
        nodes.append((me, self.stage, self.throughput))
        move = plan_move(nodes, self.worker.spec.num_stages, self.rc.rebalance_threshold)
        return move if move is not None and move.peer_id == me else None
