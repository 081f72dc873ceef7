"""Typed parameters of the WAN pipeline simulation; every field is validated by `validate()`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

Schedule = Literal["gpipe", "1f1b", "async"]
SCHEDULES: tuple[Schedule, ...] = ("gpipe", "1f1b", "async")
SYNC_COLLECTIVES = ("ring", "direct", "fastest", "sharded")  # WanConfig.sync_collective values


def _positive(owner: str, name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{owner}.{name}={value!r}: must be a finite number > 0")


def _non_negative(owner: str, name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{owner}.{name}={value!r}: must be a finite number >= 0")


def _count(owner: str, name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}.{name}={value!r}: must be an integer >= 1")


@dataclass(frozen=True)
class LinkConfig:
    """Per-node access links: bandwidth drawn per node, latency drawn per (sender, receiver) pair."""

    bandwidth_mbps: float = 200.0  # median uplink bandwidth of a node, megabits per second
    bandwidth_sigma: float = 0.0  # sigma of the lognormal spread of node bandwidth (0 = every node equal)
    latency_ms: float = 50.0  # median one-way latency of a link, milliseconds
    latency_sigma: float = 0.0  # sigma of the lognormal spread of link latency (0 = every link equal)

    def validate(self) -> LinkConfig:
        """Raise ValueError naming the bad field; return self."""
        _positive("LinkConfig", "bandwidth_mbps", self.bandwidth_mbps)
        _non_negative("LinkConfig", "bandwidth_sigma", self.bandwidth_sigma)
        _non_negative("LinkConfig", "latency_ms", self.latency_ms)
        _non_negative("LinkConfig", "latency_sigma", self.latency_sigma)
        return self


@dataclass(frozen=True)
class ChurnConfig:
    """Nodes leave after an exponential uptime and their slot is refilled after an exponential downtime."""

    mean_uptime_s: float | None = None  # mean seconds a node stays before leaving; None = no churn
    mean_downtime_s: float = 60.0  # mean seconds before a departed node's slot is taken by a joiner
    join_sync_bytes: int = 0  # bytes a joiner downloads (its stage's weights) before it serves

    def validate(self) -> ChurnConfig:
        """Raise ValueError naming the bad field; return self."""
        if self.mean_uptime_s is not None:
            _positive("ChurnConfig", "mean_uptime_s", self.mean_uptime_s)
        _positive("ChurnConfig", "mean_downtime_s", self.mean_downtime_s)
        if isinstance(self.join_sync_bytes, bool) or not isinstance(self.join_sync_bytes, int) or self.join_sync_bytes < 0:
            raise ValueError(f"ChurnConfig.join_sync_bytes={self.join_sync_bytes!r}: must be an integer >= 0")
        return self


@dataclass(frozen=True)
class WanConfig:
    """One pipeline-parallel training run: stages x replicas over WAN links, for `steps` optimizer steps."""

    num_stages: int  # pipeline stages
    fwd_s: tuple[float, ...]  # forward seconds per microbatch of each stage on a reference-speed node
    bwd_s: tuple[float, ...]  # backward seconds per microbatch of each stage on a reference-speed node
    opt_s: tuple[float, ...] = ()  # optimizer-step seconds of each stage per step (empty = 0)
    replicas: int = 1  # nodes serving each stage (data-parallel inside a stage)
    microbatches: int = 8  # microbatches per optimizer step, over all replicas
    microbatch_tokens: int = 1024  # tokens per microbatch (batch size x sequence length)
    steps: int = 4  # optimizer steps to simulate (async: steps x microbatches microbatches)
    schedule: Schedule = "1f1b"  # gpipe (flush, all forwards first), 1f1b (flush), async (no flush; with head_leader and
    # push_per_step the node's async with replicated stages, `replicated_async`)
    fwd_bytes_per_token: float = 4096.0  # wire bytes per token of a forward activation (codec + token ids)
    bwd_bytes_per_token: float = 4096.0  # wire bytes per token of a backward gradient frame
    grad_sync_bytes: tuple[int, ...] = ()  # bytes each stage's replicas all-reduce per step (empty = 0)
    sync_every: int = 1  # steps between two averagings (DiLoCo outer period H); its time is spread over them
    overlap_sync: bool = False  # averaging bytes go out on the nodes' uplinks in the background while compute goes on
    # (a DiLoCo outer step applied one round late); False: each step's share holds the stage's compute (upper bound)
    sync_chunk_bytes: int = 1 << 16  # overlap_sync: bytes per uplink hold (frames queued meanwhile go first)
    sync_push: bool = False  # the node's per-microbatch pushes (sync_every 1, sync_collective direct): each backward's
    # share of the step's averaging goes out on the uplink right after it, behind frames, and the step's update waits
    # for the last share to arrive (a gradient is needed by the step it updates: PowerSGD, dense), not holding compute
    push_per_step: bool = False  # sync_push: a replica's averaging bytes of a step go out at once after its last
    # backward of the step (one contribution per replica and step) instead of a share after every backward
    head_leader: bool = False  # the node's replicated head stage: the live stage-0 replica of lowest index leads and
    # computes every microbatch of stage 0 (its averaging bytes: every microbatch's contribution, to each other replica);
    # the others stand by, compute nothing and only receive. False: every stage-0 replica computes a share (data parallel)
    head_delegation: bool = False  # with head_leader, the node's delegated head work (replicas.head_delegation): for
    # each stage-0 microbatch, while the leader could send one itself (a stage-1 replica under its
    # inflight_per_replica), it hands it to the live head replica (not itself) with the fewest tasks outstanding
    # among those under tasks_per_delegate that were handed fewer than an even share, ceil(microbatches / (live
    # delegates + 1)), of the step's microbatches, else computes it itself (once its own last forward is done); while
    # it could not, to any delegate under tasks_per_delegate (share ignored), else waits. A TASK takes one link
    # latency before the delegate starts; the delegate computes stage 0 and sends on its own uplink (under
    # inflight_per_replica), and the microbatch counts as committed one latency after its backward (the DONE
    # reaching the leader); push_per_step: each head replica that computed one of the step's microbatches pushes one
    # bundle once the step's COMMIT reaches it (the leader at once, a delegate one latency later). Flushed schedules,
    # or async with push_per_step (`replicated_async`: the node delegates only with replica_exchange = step)
    tasks_per_delegate: int | None = None  # head_delegation: the leader's tasks one delegate may hold at once (handed,
    # DONE not back yet; the node's replicas.max_tasks, node.config.ReplicaConfig.max_tasks). None = no cap
    sync_collective: str = "ring"  # how replicas average: ring (all-reduce: 2 (r - 1) / r x bytes each, 2 (r - 1)
    # latencies), direct (each pushes its bytes to every other replica, as the node's /pmn/avg pushes: (r - 1) x bytes,
    # one latency; fits small compressed contributions) or fastest (whichever of the two takes less time); sharded
    # (replicated_async only, a what-if not built in the node: each replica sends every other the share of its bundle
    # that one owns, the owners sum their share and send it to every replica: 2 (r - 1) / r x bytes, two latencies)
    frame_overhead_s: float = 0.0  # runtime seconds per forward/backward frame on a node's compute slot (framing, receipts, acks)
    step_overhead_s: float = 0.0  # fixed seconds each stage spends at every step boundary (barrier, bookkeeping)
    startup_s: float = 0.0  # seconds before the first step starts (process start, model build, connects)
    first_step_extra_s: float = 0.0  # extra seconds of the first step only (cold kernels, allocator, caches)
    warmup_steps: int = 0  # leading steps left out of WanResult.steady_tokens_per_s
    speed_sigma: float = 0.0  # sigma of the lognormal spread of node compute speed (0 = all equal)
    link: LinkConfig = field(default_factory=LinkConfig)  # access-link model
    churn: ChurnConfig = field(default_factory=ChurnConfig)  # join/leave model
    shared_cpus: int | None = None  # all nodes share this many compute slots (a local swarm on one host)
    host_cores: float | None = None  # all nodes on one host of this many cores, shared fairly (processor sharing)
    background_load: float = 0.0  # with host_cores: other runnable threads sharing them thread-fairly
    cores_by_busy: tuple[float, ...] = ()  # with host_cores: cores the nodes get when n of them are busy
    # (entry n-1; the last entry holds for more); replaces host_cores/background_load when given
    in_flight_per_stage: int | None = None  # 1F1B/async warm-up depth cap; None = num_stages - stage (not used by
    # replicated_async: each node's window of max_staleness steps is its gate)
    inflight_per_replica: int | None = None  # the node's routing rule (node.config.ReplicaConfig.max_inflight): the
    # microbatches one sender may have outstanding at one downstream replica (sent, gradient not back yet); a sender
    # with no live receiver under it waits for a gradient (the head computes a forward only once a receiver has room).
    # gpipe: replaces the every-forward-first barrier (a backward runs when its gradient comes back, the step still
    # flushes), the node's replicated engine; 1f1b/async: applies on top of their depth gates (replicated_async: of
    # the nodes' windows). None = no such cap
    max_staleness: int | None = None  # async: the head starts step k once update k - S - 1 is done (None: depth window
    # only); replicated_async: every node runs the work of steps a .. a + S only, a its updates applied (None: 0)
    finish_blocks: bool = False  # replicated_async: the node before session 25: its loop blocked while finishing (its
    # compute slot held from the finish's start until the update is applied: nothing computed, dispatched or handed
    # out). False: the node as built, the finish (COMMIT on, bundle pushed, the peers' bundles in) running beside the
    # node's work, only the update blocking its loop
    pipelined_finish: bool = False  # replicated_async: a node's finish of step k (`_prepare`: COMMIT on, bundle
    # pushed, the peers' bundles in) starts once it knows k's commit, beside the finishes of earlier steps still
    # running (the updates stay in step order). False: it starts only once update k - 1 is applied
    leader_bundle_first: bool = False  # replicated_async with head_delegation, max_staleness >= 1 and the concurrent
    # finish: the node before session 25: the async leader pushed its bundle to every head peer before its COMMIT
    # (the delegates' bundles then went out one whole push of the leader's later). False: the node as built, the
    # leader pushes its bundle to one head peer, sends its COMMIT once that push is answered, then pushes it to the
    # other head peers beside the delegates' bundles (its `_lead_commit`, `_early_commit`, `_rest_of_bundle`)
    max_sim_s: float = 1e9  # simulated-seconds bound; exceeding it raises DeadlockError
    seed: int = 0  # seed of every random draw (bandwidths, latencies, speeds, churn)

    def stage_list(self, values: tuple[float, ...] | tuple[int, ...], name: str) -> list[float]:
        """Per-stage values, zeros when empty."""
        if not values:
            return [0.0] * self.num_stages
        if len(values) != self.num_stages:
            raise ValueError(
                f"WanConfig.{name} has {len(values)} entries for num_stages={self.num_stages}: give one per stage"
            )
        return [float(v) for v in values]

    def validate(self) -> WanConfig:
        """Raise ValueError naming the bad field and the fix; return self."""
        for name in ("num_stages", "replicas", "microbatches", "microbatch_tokens", "steps", "sync_every",
                     "sync_chunk_bytes"):
            _count("WanConfig", name, getattr(self, name))
        for name in ("fwd_s", "bwd_s", "opt_s", "grad_sync_bytes"):
            values = getattr(self, name)
            if name in ("fwd_s", "bwd_s") and len(values) != self.num_stages:
                raise ValueError(
                    f"WanConfig.{name} has {len(values)} entries for num_stages={self.num_stages}: "
                    "give one per stage"
                )
            for v in self.stage_list(values, name):
                _non_negative("WanConfig", name, v)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"WanConfig.schedule={self.schedule!r}: use one of {list(SCHEDULES)}")
        if self.sync_collective not in SYNC_COLLECTIVES:
            raise ValueError(f"WanConfig.sync_collective={self.sync_collective!r}: use one of {list(SYNC_COLLECTIVES)}")
        if self.push_per_step and not self.sync_push:
            raise ValueError("WanConfig.push_per_step needs sync_push (it says when a replica's pushes go out)")
        if self.sync_push and (self.overlap_sync or self.sync_every != 1 or self.sync_collective not in ("direct", "sharded")):
            raise ValueError(f"WanConfig.sync_push needs sync_every = 1, sync_collective = 'direct' (or 'sharded') and "
                             f"no overlap_sync (got {self.sync_every}, {self.sync_collective!r}, {self.overlap_sync}): "
                             f"pushes carry one step's gradients to every replica")
        if self.sync_collective == "sharded" and not (self.schedule == "async" and self.head_leader and self.push_per_step):
            raise ValueError("WanConfig.sync_collective='sharded' exchanges the bundles of the node's async with "
                             "replicated stages (schedule async, head_leader, sync_push, push_per_step)")
        _non_negative("WanConfig", "fwd_bytes_per_token", self.fwd_bytes_per_token)
        _non_negative("WanConfig", "bwd_bytes_per_token", self.bwd_bytes_per_token)
        _non_negative("WanConfig", "speed_sigma", self.speed_sigma)
        _non_negative("WanConfig", "frame_overhead_s", self.frame_overhead_s)
        _non_negative("WanConfig", "step_overhead_s", self.step_overhead_s)
        _non_negative("WanConfig", "startup_s", self.startup_s)
        _non_negative("WanConfig", "first_step_extra_s", self.first_step_extra_s)
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or not (
            0 <= self.warmup_steps < self.steps
        ):
            raise ValueError(f"WanConfig.warmup_steps={self.warmup_steps!r}: must be an integer in [0, steps)")
        _positive("WanConfig", "max_sim_s", self.max_sim_s)
        if self.shared_cpus is not None:
            _count("WanConfig", "shared_cpus", self.shared_cpus)
        if self.host_cores is not None:
            _positive("WanConfig", "host_cores", self.host_cores)
            for v in self.cores_by_busy:
                _positive("WanConfig", "cores_by_busy", v)
            if self.shared_cpus is not None:
                raise ValueError("WanConfig.host_cores and shared_cpus are two CPU models: set one of them")
        _non_negative("WanConfig", "background_load", self.background_load)
        if not isinstance(self.head_leader, bool) or not isinstance(self.head_delegation, bool):
            raise ValueError(f"WanConfig.head_leader={self.head_leader!r}, head_delegation={self.head_delegation!r}: "
                             f"must be True or False")
        if self.head_delegation and not self.head_leader:
            raise ValueError("WanConfig.head_delegation needs head_leader=True: the leader (the step authority) hands "
                             "out stage 0's microbatches; set both")
        if self.head_delegation and self.schedule == "async" and not self.push_per_step:
            raise ValueError("WanConfig.head_delegation under the async schedule needs push_per_step (sync_push with one "
                             "bundle per replica and step): the node runs async with replicated stages only with "
                             "runtime.replica_exchange = step, and delegates head work only with it")
        if not isinstance(self.finish_blocks, bool):
            raise ValueError(f"WanConfig.finish_blocks={self.finish_blocks!r}: must be True or False")
        if not isinstance(self.leader_bundle_first, bool):
            raise ValueError(f"WanConfig.leader_bundle_first={self.leader_bundle_first!r}: must be True or False")
        if self.leader_bundle_first and not (self.replicated_async and self.head_delegation
                                             and (self.max_staleness or 0) >= 1 and not self.finish_blocks):
            raise ValueError("WanConfig.leader_bundle_first keeps the old order of the async leader's finish (its bundle "
                             "to every head peer before its COMMIT): it applies only where the node's leader sends its "
                             "COMMIT once one head peer holds its bundle, the async schedule with replicated stages "
                             "(schedule async, head_leader, push_per_step) with head_delegation, max_staleness >= 1 "
                             "and finish_blocks=False (finish_blocks already has the old order; without delegation or "
                             "with max_staleness 0 the node keeps it); leave it False")
        if self.replicated_async and self.churn.mean_uptime_s is not None:
            raise ValueError("WanConfig.churn: the node's async schedule with replicated stages (schedule async, "
                             "head_leader, push_per_step) is modelled without churn; set churn.mean_uptime_s=None")
        if self.tasks_per_delegate is not None:
            if (isinstance(self.tasks_per_delegate, bool) or not isinstance(self.tasks_per_delegate, int)
                    or self.tasks_per_delegate < 1):
                raise ValueError(f"WanConfig.tasks_per_delegate={self.tasks_per_delegate!r}: must be None (no cap) or an "
                                 f"integer >= 1 (the leader's tasks one head delegate may hold at once)")
            if not self.head_delegation:
                raise ValueError("WanConfig.tasks_per_delegate caps the tasks of delegated head work: it needs "
                                 "head_delegation=True (or leave it None)")
        if self.in_flight_per_stage is not None:
            _count("WanConfig", "in_flight_per_stage", self.in_flight_per_stage)
        if self.inflight_per_replica is not None and (isinstance(self.inflight_per_replica, bool) or not isinstance(
                self.inflight_per_replica, int) or self.inflight_per_replica < 1):
            raise ValueError(f"WanConfig.inflight_per_replica={self.inflight_per_replica!r}: must be None (no cap) or an "
                             f"integer >= 1 (microbatches one sender may have outstanding at one downstream replica)")
        if self.max_staleness is not None and (isinstance(self.max_staleness, bool) or
                                               not isinstance(self.max_staleness, int) or self.max_staleness < 0):
            raise ValueError(f"WanConfig.max_staleness={self.max_staleness!r}: must be None or an integer >= 0")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"WanConfig.seed={self.seed!r}: must be an integer >= 0")
        self.link.validate()
        self.churn.validate()
        return self

    @property
    def replicated_async(self) -> bool:
        """The node's async schedule with replicated stages (runtime.schedule = async, replica_exchange = step): every
        node applies the updates in step order itself, finishing each beside its work and blocked only for the update
        (`finish_blocks`: blocked throughout its finish; `simulations.pipeline`)."""
        return self.schedule == "async" and self.head_leader and self.push_per_step

    @property
    def leader_commits_early(self) -> bool:
        """The node's async leader with delegated head work (its `_early_commit`): once a step is complete it pushes its
        bundle to one head peer, sends its COMMIT once that push is answered and pushes the bundle to the other head
        peers meanwhile, beside the delegates' own (`replicated_async` with head_delegation and max_staleness >= 1,
        the concurrent finish, not `leader_bundle_first`). False: the bundle to every head peer before the COMMIT."""
        return (self.replicated_async and self.head_delegation and (self.max_staleness or 0) >= 1
                and not self.finish_blocks and not self.leader_bundle_first)

    @property
    def tokens_per_step(self) -> int:
        """Tokens consumed by one optimizer step."""
        return self.microbatches * self.microbatch_tokens
