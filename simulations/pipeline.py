"""SimPy model of pipeline-parallel training over WAN links (stages x replicas, churn, schedules).

Each node has one compute slot (backward work has priority over forward work), one uplink that
sends one frame at a time (bytes / min(sender, receiver bandwidth), then the link latency), and for
1F1B/async a gate of `num_stages - stage` in-flight microbatches (the 1F1B warm-up depth). GPipe holds
every backward until all of the step's forwards reached the tail, unless `inflight_per_replica` N is set: then, as
the node's replicated engine routes (`replicas.max_inflight`), a sender sends to a downstream replica only while
fewer than N of its microbatches are outstanding there (its gradient not back yet), waits for a gradient otherwise
(the head computes a forward only once a receiver has room), and backwards run as their gradients come back. Async with `max_staleness` S (the
node's schedule) starts step k's microbatches once every microbatch of step k - S - 1 came back. A microbatch is routed to the
least-loaded live replica of each stage and returns through the same nodes; if any of them left in
the meantime the attempt is lost and the microbatch restarts from the head. `head_leader` puts stage 0 on one
leader; `head_delegation` has that leader hand stage-0 microbatches to the other head replicas as tasks (a TASK
and a DONE, one link latency each, around every delegated microbatch; at most `tasks_per_delegate` tasks at a
delegate): while the leader could send a microbatch itself, a delegate gets at most an even share of the step's
microbatches and the leader computes the rest; while it could not, any delegate with room takes one.

Async with `head_leader` and `push_per_step` (`WanConfig.replicated_async`) is the node's async schedule with
replicated stages (runtime.schedule = async, replica_exchange = step; node.replicas.engine): every node counts the
updates it applied, a, and runs the forwards of steps a .. a + S only (S = `max_staleness`; later work waits at the
node). The head leader hands out the microbatches of steps a .. a + S oldest first, as under gpipe (tasks to its
delegates with `head_delegation`). Step k is committed at the leader once all its microbatches are back; a node
finishes step k once it knows the commit (the leader: at once; a head replica: from the leader's COMMIT; below the
head: from the first COMMIT of a previous-stage node) and has applied k - 1: it waits for the COMMIT of every
previous-stage node that sent it one of the step's microbatches, sends its COMMIT on, pushes its one bundle to its
stage peers (its uplink, behind the frames it sends, then the push's round trip), waits for every stage peer's bundle
and applies the update. The leader orders its part of that finish (its `_lead_commit`) in one of two ways. With
`head_delegation`, max_staleness >= 1 and the concurrent finish (`WanConfig.leader_commits_early`, the node's
`_early_commit` since session 25) it pushes its bundle to one head peer and waits for that push's answer
(`_bundle(first_holder=True)`), sends its COMMIT (to the delegates over their links and downstream), then pushes the
bundle to the other head peers (`_rest_of_bundle`): the delegates, whose bundles go out once the COMMIT reaches them,
push theirs beside the leader's rest, so the head's finish chain is one push and its round trip, the COMMIT's latency
and then the longer of the two pushes to the other peers. Otherwise it pushes its bundle to every head peer and only
then sends its COMMIT, so the delegates' pushes follow the whole of the leader's: the node as built without delegates
or with max_staleness 0, and the node before session 25 (`finish_blocks`, or `leader_bundle_first` with the concurrent
finish). As the node runs it (its window's `_finish_in_window`), all of the finish but the update runs alongside the
node's work: meanwhile it computes the forwards and backwards of the later steps of its window, dispatches them and
(the leader) hands out microbatches; only the update (combining the bundles and the optimizer step, `opt_s`) runs in
its loop: its loop is blocked from the end of the finish until the update is applied (nothing dispatched or handed
out), and the update takes the compute slot ahead of any queued work once the running computation ends. `finish_blocks` (the node before session 25) holds the compute slot and blocks the
loop from the finish's start: a finishing node then computes and dispatches nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Generator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import simpy

from .averaging import SHARDED_ROUNDS, exchange_cost
from .errors import DeadlockError
from .params import WanConfig

FWD, BWD, OPT = "fwd", "bwd", "opt"
_PRIO = {BWD: 0, OPT: 0, FWD: 1}
_FINISH_PRIO = -1  # replicated async: a node's update (finish_blocks: its whole finish) takes its compute slot
# before any queued work


@dataclass
class TraceEvent:
    """One compute interval (recorded only when tracing is on)."""

    mb: int  # global microbatch id
    attempt: int  # attempt number of that microbatch (0 = first)
    stage: int  # stage index
    replica: int  # replica index inside the stage
    kind: str  # "fwd", "bwd" or "opt"
    start: float  # simulated start time, seconds
    end: float  # simulated end time, seconds
    lost: bool = False  # the node left during this interval, so its result was lost


@dataclass
class BundlePush:
    """Replicated async: one push of a node's bundle of a step to `peers` of its stage peers (always recorded)."""

    step: int  # the step whose bundle it is
    stage: int  # the pushing node's stage
    replica: int  # the pushing node's replica index
    peers: int  # stage peers it goes to (the async leader's early COMMIT: 1, then the others)
    start: float  # simulated time the push began (its bytes queued on the uplink, behind frames)
    sent: float  # its last byte left the uplink
    answered: float  # the peers' answers back (one latency to them, one back)


@dataclass
class WanResult:
    """Outputs of one simulation run."""

    sim_time_s: float  # simulated seconds until the last step finished
    tokens_per_s: float  # trained tokens per simulated second
    utilisation: float  # mean over nodes of compute-busy time / sim time
    bubble_fraction: float  # idle fraction of the busiest stage (1 - its busy time / (replicas x sim time))
    mean_step_s: float  # mean seconds per optimizer step
    step_times_s: list[float]  # seconds of each step (async: between every `microbatches` completions; replicated
    # async: between the times the last node applied two successive updates, the first from startup_s)
    microbatches_expected: int  # steps x microbatches
    microbatches_completed: int  # microbatches whose forward and backward both finished
    failed_attempts: int  # attempts lost to a departed node
    forward_passes: list[int]  # forward computations started-and-finished per stage (incl. lost ones)
    backward_passes: list[int]  # backward computations finished per stage (incl. lost ones)
    departures: int  # node departures (churn)
    bytes_sent: float  # bytes put on the wire by all nodes
    stage_busy_s: list[float]  # compute-busy seconds per stage, summed over its replicas
    startup_s: float = 0.0  # simulated seconds before the first step started (included in sim_time_s)
    steady_tokens_per_s: float = 0.0  # tokens/s over the steps after `warmup_steps` (start-up excluded)
    trace: list[TraceEvent] = field(default_factory=list)  # compute intervals when tracing

    def to_dict(self, with_trace: bool = False) -> dict[str, Any]:
        """JSON-ready dict (the trace only when asked)."""
        out = asdict(self)
        if not with_trace:
            out.pop("trace")
        return out


class _SharedHost:
    """Processor sharing: n busy jobs each run at min(1, cores / (n + background)) core-speed, or at
    min(1, by_busy[n-1] / n) when a per-n table of granted cores is given.

    This is how the OS shares a host's cores among runnable single-threaded processes (the local swarm's
    nodes, each one torch thread). With autogroup scheduling the host's other sessions take their fair
    share as groups, which the `by_busy` table expresses (see `swarm_run.LoadSampler`).
    """

    def __init__(self, env: simpy.Environment, cores: float, background: float, by_busy: tuple[float, ...] = ()):
        self.env = env
        self.cores = cores
        self.background = background
        self.by_busy = by_busy  # cores granted to n busy jobs (entry n-1), e.g. under group-fair scheduling
        self.jobs: dict[int, list[Any]] = {}  # job id -> [remaining core-seconds, done event]
        self.next_id = 0
        self.last = env.now
        self.kick = env.event()
        env.process(self._run())

    def rate(self) -> float:
        """Core-seconds per second each busy job gets now."""
        n = len(self.jobs)
        if not n:
            return 0.0
        if self.by_busy:
            return min(1.0, self.by_busy[min(n, len(self.by_busy)) - 1] / n)
        return min(1.0, self.cores / (n + self.background))

    def _advance(self) -> None:
        dt = self.env.now - self.last
        if dt > 0 and self.jobs:
            r = self.rate()
            for job in self.jobs.values():
                job[0] -= dt * r
        self.last = self.env.now

    def work(self, core_seconds: float) -> simpy.Event:
        """An event that fires once `core_seconds` of work got done at the shared rate."""
        self._advance()
        done = self.env.event()
        self.jobs[self.next_id] = [core_seconds, done]
        self.next_id += 1
        if not self.kick.triggered:
            self.kick.succeed()
        return done

    def _run(self) -> Generator[simpy.Event, Any, None]:
        while True:
            if not self.jobs:
                yield self.kick
                self.kick = self.env.event()
                continue
            self._advance()
            for key in [k for k, job in self.jobs.items() if job[0] <= 1e-9]:
                self.jobs.pop(key)[1].succeed()
            if not self.jobs:
                continue
            wait = min(job[0] for job in self.jobs.values()) / self.rate()
            if self.kick.triggered:
                self.kick = self.env.event()
            yield self.env.any_of([self.env.timeout(wait), self.kick])
            if self.kick.triggered:
                self.kick = self.env.event()


class _Node:
    """One node: compute slot, uplink, 1F1B gate, liveness."""

    def __init__(self, env: simpy.Environment, stage: int, replica: int, speed: float, bw: float, depth: int):
        self.stage = stage
        self.replica = replica
        self.speed = speed  # multiplier on reference speed
        self.bw = bw  # uplink bytes per second
        self.compute = simpy.PriorityResource(env, capacity=1)
        self.uplink = simpy.PriorityResource(env, capacity=1)  # frames before background averaging chunks
        self.gate = simpy.Resource(env, capacity=depth)
        self.alive = True
        self.generation = 0
        self.busy = 0.0
        self.pending = 0  # microbatches routed here whose forward has not finished yet
        self.routed = 0  # microbatches ever routed here (tie-breaker)
        self.bwd_since_opt = 0  # async: backward passes since this node's last optimizer step
        self.syncs: list[simpy.Process] = []  # overlapped averaging: this node's background sends, oldest first
        self.pushes: list[simpy.Process] = []  # sync_push: this step's per-microbatch sends so far
        self.bwd_unpushed = 0  # push_per_step: backward passes of this step whose bytes have not gone out yet
        self.arrival: simpy.Process | None = None  # sync_push, async: the last step's pushes arriving
        self.room = env.event()  # inflight_per_replica: fires when a microbatch this node sent comes back
        self.tasks = 0  # head_delegation: tasks the head leader has outstanding at this replica (DONE not back yet)
        self.bundle_step = -1  # push_per_step, flushed: the last step this node's bundle went out for (one a step)
        self.applied = 0  # replicated async: updates this node applied (its oldest unapplied step)
        self.advanced = env.event()  # replicated async: fires when this node applies an update (then replaced)
        self.blocked: simpy.Event | None = None  # replicated async: while its loop is blocked (from the end of a finish
        # until the update is applied; finish_blocks: the whole finish), fires when the update is applied
        self.owned: Counter[int] = Counter()  # replicated async: step -> its microbatches this node computed
        self.senders: dict[int, set[_Node]] = {}  # replicated async: step -> previous-stage nodes that sent it one
        self.heard: dict[int, set[_Node]] = {}  # replicated async: step -> nodes whose COMMIT of it arrived here
        self.told = env.event()  # replicated async: fires when a COMMIT arrives here (then replaced)
        self.prepared: dict[int, simpy.Event] = {}  # replicated async, pipelined_finish: step -> fires once this
        # node's finish of it but the update ran
        self.prepare_start: dict[int, float] = {}  # the same steps: when that finish started
        self.bundles: dict[int, simpy.Event] = {}  # replicated async: step -> fires once its bundle reached the peers
        self.first_held: dict[int, simpy.Event] = {}  # replicated async, the leader committing early: step -> fires
        # once its bundle reached its first holder (`PipelineSim._first_holder`)
        self.scattered: dict[int, simpy.Event] = {}  # replicated async, sync_collective sharded: step x SHARDED_ROUNDS
        # + round -> fires once this node's parts of the round reached their owners (the reduce-scatter)
        self.round_done: dict[int, simpy.Event] = {}  # the same keys: fires once this node's summed part of the round
        # reached every stage peer (the round's all-gather); after the last round `bundles` fires
        self.finishes: list[tuple[float, float]] = []  # replicated async: (start, update applied) of each step's finish
        self.blocks: list[tuple[float, float]] = []  # replicated async: (loop blocked, update applied) of each step


class PipelineSim:
    """Build with a config, call `run()` once."""

    def __init__(self, config: WanConfig, trace: bool = False):
        self.cfg = config.validate()
        self.env = simpy.Environment()
        self.rng = np.random.default_rng(config.seed)
        self.tracing = trace
        self.trace: list[TraceEvent] = []
        cfg = self.cfg
        s_n, r_n = cfg.num_stages, cfg.replicas
        self.fwd = [t + cfg.frame_overhead_s for t in cfg.stage_list(cfg.fwd_s, "fwd_s")]
        self.bwd = [t + cfg.frame_overhead_s for t in cfg.stage_list(cfg.bwd_s, "bwd_s")]
        self.opt = cfg.stage_list(cfg.opt_s, "opt_s")
        self.sync_bytes = cfg.stage_list(cfg.grad_sync_bytes, "grad_sync_bytes")
        speeds = self._lognormal(1.0, cfg.speed_sigma, (s_n, r_n))
        bws = self._lognormal(cfg.link.bandwidth_mbps * 1e6 / 8.0, cfg.link.bandwidth_sigma, (s_n, r_n))
        # latency[s][a][b]: one-way seconds from replica a of stage s to replica b of stage s+1 (and back)
        self.latency = self._lognormal(cfg.link.latency_ms / 1e3, cfg.link.latency_sigma, (max(s_n - 1, 1), r_n, r_n))
        self.nodes: list[list[_Node]] = []
        for s in range(s_n):
            depth = cfg.in_flight_per_stage if cfg.in_flight_per_stage is not None else s_n - s
            if cfg.schedule == "async" and cfg.max_staleness is not None:  # the node's async: the bound is the gate
                depth = (cfg.max_staleness + 1) * cfg.microbatches
            self.nodes.append(
                [_Node(self.env, s, r, float(speeds[s, r]), float(bws[s, r]), depth) for r in range(r_n)]
            )
        self.cpu = simpy.PriorityResource(self.env, capacity=cfg.shared_cpus) if cfg.shared_cpus else None
        self.host = _SharedHost(self.env, cfg.host_cores, cfg.background_load, cfg.cores_by_busy) if cfg.host_cores else None
        self.stage_up = [self.env.event() for _ in range(s_n)]
        # the node's async with replicated stages: per-node windows and finishes replace the depth gate
        self.node_async = cfg.replicated_async
        self.gated = cfg.schedule in ("1f1b", "async") and not self.node_async
        self.completed = 0
        self.failed = 0
        self.departures = 0
        self.bytes_sent = 0.0
        self.fwd_passes = [0] * s_n
        self.bwd_passes = [0] * s_n
        self.step_times: list[float] = []
        self.completion_times: list[float] = []
        # async with a staleness bound: microbatches of each step still to complete, and its completion event
        self.step_left = [cfg.microbatches] * cfg.steps
        self.step_done = [self.env.event() for _ in range(cfg.steps)]
        self.gpipe_gate: simpy.Event | None = None
        self.capped = cfg.inflight_per_replica is not None
        # inflight_per_replica: microbatches outstanding per (sender, receiver); the most each pair ever held, by
        # ((stage, replica), (stage, replica)); times a sender found no receiver under the cap; and, when tracing,
        # every change as (time, sender, receiver, +1 sent / -1 gradient back or attempt lost)
        self.outstanding: dict[tuple[_Node, _Node], int] = {}
        self.pair_peak: dict[tuple[tuple[int, int], tuple[int, int]], int] = {}
        self.cap_waits = 0
        self.pair_trace: list[tuple[float, tuple[int, int], tuple[int, int], int]] = []
        self.tail_done: set[int] = set()
        # head_delegation: fires when a delegate's task slot frees or a stage-0 forward ends (the leader may dispatch
        # again); the most tasks each stage-0 replica held at once, by replica; stage-0 attempts delegated and taken
        # by the leader itself; tasks handed to each delegate, by (step, replica) (the node's per-step _assigned);
        # tasks handed past the even share because the leader had no stage-1 room itself
        self.delegating = cfg.head_delegation
        self.head_room = self.env.event()
        self.task_peak: dict[int, int] = {}
        self.delegated = 0
        self.led = 0
        self.assigned: Counter[tuple[int, int]] = Counter()
        self.past_share = 0
        # the head's microbatches are handed out by `_pick_head` (delegated head work, or the replicated async driver)
        self.head_picks = self.delegating or self.node_async
        self.staleness = cfg.max_staleness or 0  # replicated async: steps past the oldest unapplied one a node runs
        # replicated async: when the last node applied each step's update, and the nodes' finishing processes
        self.last_apply = [0.0] * cfg.steps
        self.finishers: list[simpy.Process] = []
        # replicated async: the leader commits once one head peer holds its bundle (`WanConfig.leader_commits_early`);
        # every bundle push, in the order they were answered
        self.early_commit = cfg.leader_commits_early
        self.bundle_pushes: list[BundlePush] = []
        self.sharded = cfg.sync_collective == "sharded"  # the bundles' sharded exchange (a what-if)
        self.churn_on = cfg.churn.mean_uptime_s is not None
        self.finished = False

    def _lognormal(self, median: float, sigma: float, shape: tuple[int, ...]) -> np.ndarray:
        if sigma == 0:
            return np.full(shape, median, dtype=float)
        return median * np.exp(sigma * self.rng.standard_normal(shape))

    # ------------------------------------------------------------------ building blocks
    def _pick(self, stage: int) -> Generator[simpy.Event, Any, _Node]:
        """Least-loaded live replica of `stage` (stage 0 with `head_leader`: the leader, the live replica of lowest
        index); waits for a joiner when the stage is empty."""
        while True:
            live = [n for n in self.nodes[stage] if n.alive]
            if live and stage == 0 and self.cfg.head_leader:
                live = live[:1]
            if live:
                node = min(live, key=self._load)
                node.pending += 1
                node.routed += 1
                return node
            yield self.stage_up[stage]

    @staticmethod
    def _load(n: _Node) -> tuple[float, int]:
        return (n.pending + len(n.compute.queue) + len(n.compute.users) + 1) / n.speed, n.routed

    def _pick_capped(self, sender: _Node, stage: int) -> Generator[simpy.Event, Any, _Node]:
        """inflight_per_replica: the least-loaded live replica of `stage` holding fewer than the cap of `sender`'s
        microbatches, counted as one more; waits for one of `sender`'s microbatches to come back (or a joiner) when
        every live one is full, for a joiner when the stage is empty."""
        cap = self.cfg.inflight_per_replica
        assert cap is not None
        while True:
            live = [n for n in self.nodes[stage] if n.alive]
            room = [n for n in live if self.outstanding.get((sender, n), 0) < cap]
            if room:
                node = min(room, key=self._load)
                node.pending += 1
                node.routed += 1
                held = self.outstanding[(sender, node)] = self.outstanding.get((sender, node), 0) + 1
                key = ((sender.stage, sender.replica), (node.stage, node.replica))
                self.pair_peak[key] = max(self.pair_peak.get(key, 0), held)
                if self.tracing:
                    self.pair_trace.append((self.env.now, key[0], key[1], 1))
                return node
            if live:
                self.cap_waits += 1
                yield self.env.any_of([sender.room, self.stage_up[stage]])
            else:
                yield self.stage_up[stage]

    def _has_room(self, sender: _Node, stage: int) -> bool:
        """A live replica of `stage` would take a microbatch from `sender` now (under the cap when capped)."""
        if stage >= self.cfg.num_stages:
            return True
        cap = self.cfg.inflight_per_replica
        return any(n.alive and (cap is None or self.outstanding.get((sender, n), 0) < cap) for n in self.nodes[stage])

    def _pick_head(self, step: int) -> Generator[simpy.Event, Any, tuple[_Node, bool]]:
        """head_delegation, a microbatch of `step`: the leader (the live stage-0 replica of lowest index) hands it to
        the other live stage-0 replica with the fewest tasks outstanding among those under the task cap
        (`tasks_per_delegate`; None: no limit) and, while the leader could send one itself (a stage-1 replica has
        room for it), handed fewer than an even share of the step's microbatches (ceil(microbatches / live head
        replicas), as the node's engine `_helper`); counted as one more task. When none qualifies the leader takes
        it itself if it could send one, once its own last forward is done; otherwise waits for a task to come back,
        a forward to end, a stage-1 slot or a joiner. Without `head_delegation` (the replicated async driver's
        leader alone) it never delegates; a leader whose loop is blocked (replicated async: for its update, with
        finish_blocks for its whole finish) hands out nothing until it applied the update. Returns the node and whether
        it is a delegate."""
        cap = self.cfg.tasks_per_delegate
        while True:
            live = [n for n in self.nodes[0] if n.alive]
            if live and live[0].blocked is not None:
                yield live[0].blocked
                continue
            if live:
                leader = live[0]
                here = self._has_room(leader, 1)  # the leader could send a microbatch itself now
                share = -(-self.cfg.microbatches // len(live))
                room = [n for n in live[1:] if self.delegating and (cap is None or n.tasks < cap)
                        and (not here or self.assigned[(step, n.replica)] < share)]
                if room:
                    node = min(room, key=lambda n: (n.tasks, self._load(n)))
                    node.tasks += 1
                    self.task_peak[node.replica] = max(self.task_peak.get(node.replica, 0), node.tasks)
                    self.delegated += 1
                    self.past_share += self.assigned[(step, node.replica)] >= share
                    self.assigned[(step, node.replica)] += 1
                elif here and leader.pending == 0:
                    node = leader
                    self.led += 1
                else:
                    waits = [self.head_room, self.stage_up[0], leader.room]
                    if self.cfg.num_stages > 1:
                        waits.append(self.stage_up[1])
                    yield self.env.any_of(waits)
                    continue
                node.pending += 1
                node.routed += 1
                return node, node is not leader
            yield self.stage_up[0]

    def _wake_head(self) -> None:
        """head_delegation: the leader may dispatch again."""
        event, self.head_room = self.head_room, self.env.event()
        event.succeed()

    def _head_latency(self) -> float:
        """head_delegation: one-way seconds of a TASK, DONE or COMMIT between two head replicas (the median link)."""
        return float(self.cfg.link.latency_ms) / 1e3

    def _came_back(self, sender: _Node, receiver: _Node) -> None:
        """inflight_per_replica: one of `sender`'s microbatches at `receiver` is no longer outstanding."""
        self.outstanding[(sender, receiver)] -= 1
        if self.tracing:
            self.pair_trace.append((self.env.now, (sender.stage, sender.replica), (receiver.stage, receiver.replica), -1))
        room, sender.room = sender.room, self.env.event()
        room.succeed()

    def _compute(self, node: _Node, seconds: float, kind: str, mb: int, attempt: int) -> Generator[simpy.Event, Any, bool]:
        """Run `seconds / speed` of work on `node`; False when the node left before or during it."""
        generation = node.generation
        with node.compute.request(priority=_PRIO[kind]) as req:
            yield req
            return (yield from self._held_work(node, seconds, kind, mb, attempt, generation))

    def _held_work(self, node: _Node, seconds: float, kind: str, mb: int, attempt: int,
                   generation: int) -> Generator[simpy.Event, Any, bool]:
        """`_compute`'s work once the caller holds `node`'s compute slot (the shared CPUs or host still taken here);
        False when the node left since `generation` or during the work."""
        cpu_req = None
        if self.cpu is not None:
            cpu_req = self.cpu.request(priority=_PRIO[kind])
            yield cpu_req
        try:
            if not node.alive or node.generation != generation:
                return False
            duration = seconds / node.speed
            start = self.env.now
            if self.host is not None:
                yield self.host.work(duration)
            else:
                yield self.env.timeout(duration)
            node.busy += self.env.now - start
            if self.tracing:
                lost = not (node.alive and node.generation == generation)
                self.trace.append(TraceEvent(mb, attempt, node.stage, node.replica, kind, start, self.env.now, lost))
        finally:
            if cpu_req is not None and self.cpu is not None:
                self.cpu.release(cpu_req)
        return node.alive and node.generation == generation

    def _send(self, src: _Node, dst: _Node, nbytes: float) -> Generator[simpy.Event, Any, None]:
        """Serialise `nbytes` on the sender's uplink, then wait the link latency."""
        lo = min(src.stage, dst.stage)
        a, b = (src.replica, dst.replica) if src.stage == lo else (dst.replica, src.replica)
        with src.uplink.request() as req:
            yield req
            yield self.env.timeout(nbytes / min(src.bw, dst.bw))
        self.bytes_sent += nbytes
        yield self.env.timeout(float(self.latency[lo, a, b]))

    # ------------------------------------------------------------------ one microbatch
    def _attempt(self, mb: int, attempt: int,
                 head: tuple[_Node, bool] | None = None) -> Generator[simpy.Event, Any, bool]:
        """One attempt of microbatch `mb` through every stage and back; False when a node of its path left. head: the
        stage-0 node already picked for it and whether it is a delegate (the replicated async driver's pick)."""
        cfg = self.cfg
        step = mb // cfg.microbatches
        s_n = cfg.num_stages
        fwd_bytes = cfg.fwd_bytes_per_token * cfg.microbatch_tokens
        bwd_bytes = cfg.bwd_bytes_per_token * cfg.microbatch_tokens
        path: list[_Node] = []
        generations: list[int] = []
        gates: list[tuple[_Node, Any]] = []
        sent: list[tuple[_Node, _Node]] = []  # inflight_per_replica: (sender, receiver) pairs outstanding, in path order
        task: _Node | None = None  # head_delegation: the delegate holding this attempt as a task, until its DONE is in
        if head is not None or self.head_picks:
            node, delegated = head if head is not None else (yield from self._pick_head(step))
            task = node if delegated else None
        else:
            node = yield from self._pick(0)
        try:
            if task is not None:  # the leader's TASK reaches the delegate
                yield self.env.timeout(self._head_latency())
            for s in range(s_n):
                if self.gated:
                    greq = node.gate.request()
                    gates.append((node, greq))
                    yield greq
                if self.node_async:
                    yield from self._in_window(node, step)
                path.append(node)
                generations.append(node.generation)
                nxt: _Node | None = None
                if self.capped and s == 0 and s_n > 1:  # the node's head computes a forward once a receiver has room
                    nxt = yield from self._pick_capped(node, 1)
                    sent.append((node, nxt))
                ok = yield from self._compute(node, self.fwd[s], FWD, mb, attempt)
                node.pending -= 1
                if self.head_picks and s == 0:
                    self._wake_head()
                if not ok:
                    return False
                self.fwd_passes[s] += 1
                if s < s_n - 1 and node.blocked is not None:  # replicated async: dispatched once its loop runs
                    yield node.blocked
                if s < s_n - 1:
                    if nxt is None and self.capped:
                        nxt = yield from self._pick_capped(node, s + 1)
                        sent.append((node, nxt))
                    elif nxt is None:
                        nxt = yield from self._pick(s + 1)
                    yield from self._send(node, nxt, fwd_bytes)
                    node = nxt
            if self.gpipe_gate is not None:
                self.tail_done.add(mb)
                if len(self.tail_done) == cfg.microbatches and not self.gpipe_gate.triggered:
                    self.gpipe_gate.succeed()
                yield self.gpipe_gate
            for s in range(s_n - 1, -1, -1):
                node = path[s]
                if not node.alive or node.generation != generations[s]:
                    return False
                ok = yield from self._compute(node, self.bwd[s], BWD, mb, attempt)
                if not ok:
                    return False
                self.bwd_passes[s] += 1
                if self.gated:
                    gnode, greq = gates.pop()
                    gnode.gate.release(greq)
                if cfg.sync_push and not self.node_async:
                    self._push_share(node, step)
                if cfg.schedule == "async" and not self.node_async:
                    self._maybe_async_opt(node)
                if s > 0:
                    yield from self._send(node, path[s - 1], bwd_bytes)
                    if self.capped:  # the gradient is back at its sender
                        self._came_back(*sent.pop())
            if task is not None:  # the delegate's DONE reaches the leader, which commits the microbatch
                yield self.env.timeout(self._head_latency())
            if self.node_async:
                self._own(path, step)
            return True
        finally:
            for gnode, greq in gates:
                gnode.gate.release(greq)
            for pair in sent:  # the attempt is lost: the sender stops counting it (the node's abandoned())
                self._came_back(*pair)
            if task is not None:  # DONE in, or the attempt lost: the delegate has room for another task
                task.tasks -= 1
                self._wake_head()

    def _microbatch(self, mb: int, head: tuple[_Node, bool] | None = None) -> Generator[simpy.Event, Any, None]:
        """Microbatch `mb` until an attempt completes (head: its first attempt's stage-0 pick, see `_attempt`)."""
        attempt = 0
        while True:
            ok = yield from self._attempt(mb, attempt, head if attempt == 0 else None)
            if ok:
                break
            self.failed += 1
            attempt += 1
        self.completed += 1
        self.completion_times.append(self.env.now)
        step = mb // self.cfg.microbatches
        self.step_left[step] -= 1
        if self.step_left[step] == 0 and step < len(self.step_done):
            self.step_done[step].succeed()

    # ------------------------------------------------------------------ optimizer and churn
    def _opt_node(self, node: _Node) -> Generator[simpy.Event, Any, None]:
        if node.alive and self.opt[node.stage] > 0:
            yield from self._compute(node, self.opt[node.stage], OPT, -1, 0)

    def _sync_share(self, stage: int) -> tuple[list[_Node], float, float]:
        """The live replicas of a stage, the bytes each sends per step of its averaging and the latencies the
        exchange waits, per step (both 0 with fewer than 2 replicas or nothing to average), as the collective sends
        them (`simulations.averaging.exchange_cost`, `WanConfig.sync_collective`); spread over `sync_every` steps."""
        live = [n for n in self.nodes[stage] if n.alive]
        r = len(live)
        if r < 2 or self.sync_bytes[stage] <= 0:
            return live, 0.0, 0.0
        every = self.cfg.sync_every
        nbytes, hops = exchange_cost(r, self.sync_bytes[stage], self.cfg.sync_collective, min(n.bw for n in live),
                                     self._sync_latency(stage))
        return live, nbytes / every, hops / every

    def _sync_latency(self, stage: int) -> float:
        """One-way latency an averaging message of `stage` waits (the stage's slowest link)."""
        return float(np.max(self.latency[min(stage, self.latency.shape[0] - 1)]))

    def _grad_sync_s(self, stage: int) -> float:
        """Averaging time among the live replicas of a stage, per step (`WanConfig.sync_collective`)."""
        live, share, hops = self._sync_share(stage)
        if not share:
            return 0.0
        return share / min(n.bw for n in live) + hops * self._sync_latency(stage)

    def _start_overlapped_sync(self, stage: int, node: _Node | None = None) -> list[simpy.Process]:
        """Overlapped averaging: each live replica (or just `node`, async) sends its averaging share of one
        step on its uplink in `sync_chunk_bytes` pieces, in the background. An outer step may arrive one round
        late, not two: returns the sends older than `sync_every` steps that are still running, which the caller
        must wait for before its next step."""
        live, share, _ = self._sync_share(stage)
        if not share:
            return []
        bw = min(n.bw for n in live)
        late: list[simpy.Process] = []
        for n in live if node is None else [node]:
            n.syncs = [p for p in n.syncs if p.is_alive]
            n.syncs.append(self.env.process(self._background_send(n, share, bw)))
            if len(n.syncs) > self.cfg.sync_every:
                late.append(n.syncs[0])
        return late

    def _push_share(self, node: _Node, step: int) -> None:
        """sync_push: one backward's share of the node's averaging bytes leaves on its uplink, behind frames
        (push_per_step: the whole step's after its last backward; in a flushed schedule, as the node's
        replica_exchange = step, only once the step's commit has come down to the node's stage: every microbatch of
        the step done, then one link latency per stage above it; one bundle from every node that computed one of the
        step's microbatches, however many; head_delegation: a head delegate's one latency after the step is done,
        when the leader's COMMIT reaches it)."""
        live, share, _ = self._sync_share(node.stage)
        if share and node.alive:
            per_node = self._per_node(node.stage, len(live))
            nbytes = share / per_node
            bundle = self.cfg.push_per_step and self.cfg.schedule != "async" and step < len(self.step_done)
            if bundle:  # one bundle per replica and step, however many of the step's microbatches it computed
                if node.bundle_step == step:
                    return
                node.bundle_step, nbytes = step, share
            elif self.cfg.push_per_step:
                node.bwd_unpushed += 1
                if node.bwd_unpushed < per_node:
                    return
                node.bwd_unpushed, nbytes = 0, share
            bw = min(n.bw for n in live)
            if bundle:
                delay = node.stage * float(self.cfg.link.latency_ms) / 1e3
                if self.delegating and node.stage == 0 and node is not live[0]:  # a delegate: the leader's COMMIT
                    delay = self._head_latency()
                node.pushes.append(self.env.process(self._send_after(self.step_done[step], delay, node, nbytes, bw)))
                return
            node.pushes.append(self.env.process(self._background_send(node, nbytes, bw)))

    def _send_after(self, event: simpy.Event, delay: float, node: _Node, nbytes: float,
                    bw: float) -> Generator[simpy.Event, Any, None]:
        """A background send that starts `delay` seconds after `event` (a step's commit reaching a stage)."""
        yield event
        if delay > 0:
            yield self.env.timeout(delay)
        yield from self._background_send(node, nbytes, bw)

    def _per_node(self, stage: int, live: int) -> int:
        """Microbatches a computing replica of `stage` runs per step among `live` replicas (the head leader: all)."""
        if stage == 0 and self.cfg.head_leader:
            return self.cfg.microbatches
        return -(-self.cfg.microbatches // live)

    def _pushed(self, nodes: list[_Node]) -> Generator[simpy.Event, Any, None]:
        """sync_push: wait until the step's pushes of `nodes` are out and one latency later have arrived."""
        sends = [p for n in nodes for p in n.pushes]
        for n in nodes:
            n.pushes = []
        if sends:
            yield self.env.all_of(sends)
            yield self.env.timeout(self._sync_latency(nodes[0].stage))

    def _background_send(self, node: _Node, nbytes: float, bw: float) -> Generator[simpy.Event, Any, None]:
        left = nbytes
        while left > 0 and node.alive and not self.finished:
            chunk = min(left, float(self.cfg.sync_chunk_bytes))
            with node.uplink.request(priority=1) as req:  # queued frames go first
                yield req
                yield self.env.timeout(chunk / min(node.bw, bw))
            self.bytes_sent += chunk
            left -= chunk

    def _stage_step_end(self, stage: int) -> Generator[simpy.Event, Any, None]:
        if self.cfg.sync_push:  # the update needs every replica's pushed contributions
            yield from self._pushed(self.nodes[stage])
            yield self.env.all_of([self.env.process(self._opt_node(n)) for n in self.nodes[stage]])
            yield self.env.timeout(self.cfg.step_overhead_s)
            return
        yield self.env.all_of([self.env.process(self._opt_node(n)) for n in self.nodes[stage]])
        if self.cfg.overlap_sync:
            late = self._start_overlapped_sync(stage)
            if late:
                yield self.env.all_of(late)
            yield self.env.timeout(self.cfg.step_overhead_s)
        else:
            yield self.env.timeout(self._grad_sync_s(stage) + self.cfg.step_overhead_s)

    def _maybe_async_opt(self, node: _Node) -> None:
        node.bwd_since_opt += 1
        if node.bwd_since_opt >= self._per_node(node.stage, self.cfg.replicas):
            node.bwd_since_opt = 0
            self.env.process(self._async_step_end(node))

    def _async_step_end(self, node: _Node) -> Generator[simpy.Event, Any, None]:
        """Async: the node's optimiser step, then its share of the stage's averaging: holding its compute slot (not
        overlapped with compute: an upper bound on what averaging costs), or on its uplink in the background
        (`overlap_sync`). sync_push: the update waits for the step's pushes, off the compute slot; while the pushes
        of the step before have not all arrived, the node holds its compute slot until they have (updates lag at
        most one step)."""
        if self.cfg.sync_push:
            behind, node.arrival = node.arrival, self.env.process(self._pushed([node]))
            self.env.process(self._update_on(node.arrival, node))
            if behind is not None and not behind.triggered and node.alive:  # a step's pushes still out: wait
                with node.compute.request(priority=_PRIO[OPT]) as req:
                    yield req
                    yield behind
            return
        yield from self._opt_node(node)
        if self.cfg.overlap_sync:
            late = self._start_overlapped_sync(node.stage, node)
            if late and node.alive:  # the round before last has not gone out yet: compute waits for it
                with node.compute.request(priority=_PRIO[OPT]) as req:
                    yield req
                    yield self.env.all_of(late)
            return
        sync = self._grad_sync_s(node.stage)
        if node.alive and sync > 0:
            with node.compute.request(priority=_PRIO[OPT]) as req:
                yield req
                yield self.env.timeout(sync)

    def _update_on(self, arrival: simpy.Process, node: _Node) -> Generator[simpy.Event, Any, None]:
        """sync_push, async: the node's optimiser step once its step's pushes have arrived."""
        yield arrival
        yield from self._opt_node(node)

    def _churn(self, node: _Node) -> Generator[simpy.Event, Any, None]:
        churn = self.cfg.churn
        assert churn.mean_uptime_s is not None
        while not self.finished:
            yield self.env.timeout(float(self.rng.exponential(churn.mean_uptime_s)))
            if self.finished:
                return
            node.alive = False
            node.generation += 1
            self.departures += 1
            down = float(self.rng.exponential(churn.mean_downtime_s)) + churn.join_sync_bytes / node.bw
            yield self.env.timeout(down)
            node.alive = True
            event = self.stage_up[node.stage]
            self.stage_up[node.stage] = self.env.event()
            event.succeed()

    # ------------------------------------------------------------------ the node's async with replicated stages
    @property
    def _leader(self) -> _Node:
        """Replicated async: the head leader (modelled without churn: the head replica of index 0)."""
        return self.nodes[0][0]

    def _in_window(self, node: _Node, step: int) -> Generator[simpy.Event, Any, None]:
        """Replicated async: until `step` is in `node`'s window, at most max_staleness past its oldest unapplied step
        (the node parks work of later steps until it applied enough updates)."""
        while step > node.applied + self.staleness:
            yield node.advanced

    def _own(self, path: list[_Node], step: int) -> None:
        """Replicated async: a microbatch of `step` completed along `path`: every node on it computed one of the
        step's microbatches (its bundle sums it); below the head, its sender's COMMIT carries the verdict on it."""
        for s, node in enumerate(path):
            node.owned[step] += 1
            if s > 0:
                node.senders.setdefault(step, set()).add(path[s - 1])

    def _finisher(self, node: _Node) -> Generator[simpy.Event, Any, None]:
        """Replicated async: `node` finishes the steps in order, step k's finish starting once it knows k's commit and
        applied k - 1. As the node's async window runs it (`_finish_in_window`), the finish (`_prepare`) runs beside
        the node's work, which goes on (later steps of its window computed, dispatched and handed out); once it is
        done the node's loop blocks for the update (`_update`, the node's `_apply`), which takes the compute slot
        ahead of any queued work once the running computation ends; then its window moves on. finish_blocks (the
        node before session 25: its `_finish` blocked its event loop): the node takes its compute slot ahead of any
        queued work when the finish starts and holds it until the update is applied, its loop blocked throughout (no
        frame processed, nothing computed or dispatched). pipelined_finish (the node since session 32, its
        `replicas.pipelined_finish`): the finish of step k starts once the node knows k's commit (`_preparer`), beside
        the finishes of earlier steps still running, and only the updates wait for each other; a head replica that is
        not the leader still finishes one step at a time."""
        blocking = self.cfg.finish_blocks
        # pipelined_finish: a head replica other than the leader (a standby that may take over) finishes one at a time
        pipelined = self.cfg.pipelined_finish and not blocking and (node.stage > 0 or node is self._leader)
        if pipelined:
            self.env.process(self._preparer(node))
        for step in range(self.cfg.steps):
            if pipelined:
                yield self._step_event(node.prepared, step)
                start = node.prepare_start.pop(step)  # finishes overlap: each from its own start
            else:
                yield from self._await_commit(node, step)
                start = self.env.now
            blocked_at = self.env.now
            blocked = self.env.event()
            if not blocking and not pipelined:
                yield from self._prepare(node, step)
            if not blocking:
                blocked_at, node.blocked = self.env.now, blocked
            with node.compute.request(priority=_FINISH_PRIO) as req:
                yield req
                if blocking:
                    start = blocked_at = self.env.now
                    node.blocked = blocked
                    yield from self._prepare(node, step)
                yield from self._update(node, step)
                node.finishes.append((start, self.env.now))
                node.blocks.append((blocked_at, self.env.now))
                node.applied += 1
                node.blocked = None
                advanced, node.advanced = node.advanced, self.env.event()
            blocked.succeed()
            advanced.succeed()
            self.last_apply[step] = self.env.now  # the last node's apply is the last write

    def _preparer(self, node: _Node) -> Generator[simpy.Event, Any, None]:
        """Replicated async, pipelined_finish: starts `node`'s finish of each step (`_prepare`) once it knows the
        step's commit, in step order, without waiting for the earlier steps' finishes or updates."""
        for step in range(self.cfg.steps):
            yield from self._await_commit(node, step)
            self.env.process(self._prepare_step(node, step))

    def _prepare_step(self, node: _Node, step: int) -> Generator[simpy.Event, Any, None]:
        node.prepare_start[step] = self.env.now
        yield from self._prepare(node, step)
        self._step_event(node.prepared, step).succeed()

    def _await_commit(self, node: _Node, step: int) -> Generator[simpy.Event, Any, None]:
        """Replicated async: until `node` knows step `step`'s commit: the leader once every microbatch of the step is
        back (its own gradients, its delegates' DONEs), any other node once a COMMIT of the step reached it."""
        if node is self._leader:
            yield self.step_done[step]
            return
        while not node.heard.get(step):
            yield node.told

    def _prepare(self, node: _Node, step: int) -> Generator[simpy.Event, Any, None]:
        """Replicated async: all of step `step`'s finish at `node` but the update, as the node's `_prepare` (and the
        leader's `_lead_commit`) run it. Below the head it waits for the COMMIT of every previous-stage node that sent
        it one of the step's microbatches (their verdicts, `_owned_pairs`). The leader committing early (delegated
        head work, max_staleness >= 1, the concurrent finish: `WanConfig.leader_commits_early`, the node's
        `_early_commit`) pushes its bundle to one head peer (`_first_holder`) and waits for that push's answer
        (`_bundle(first_holder=True)`), sends its COMMIT (to its delegates and downstream) and then pushes the bundle
        to the other head peers (`_rest_of_bundle`), the delegates pushing theirs meanwhile; otherwise the leader
        pushes its bundle to every head peer and then sends its COMMIT (its `_lead_commit` before session 25, and
        still without delegates, with max_staleness 0 or with `leader_bundle_first`). Any other node sends its COMMIT
        on and then pushes its bundle. Then it waits for the bundle of every stage peer that computed one of the
        step's microbatches (the leader's first holder: only for the leader's first push)."""
        while not node.senders.get(step, set()) <= node.heard.get(step, set()):
            yield node.told
        if node is self._leader and self.early_commit:
            yield from self._push_bundle(node, step, first=True)
            self._send_commit(node, step)
            yield from self._push_bundle(node, step, rest=True)
        elif node is self._leader and self.sharded:  # every replica takes part in the exchange: COMMIT first
            self._send_commit(node, step)
            yield from self._push_bundle(node, step)
        elif node is self._leader:
            yield from self._push_bundle(node, step)
            self._send_commit(node, step)
        else:
            self._send_commit(node, step)
            yield from self._push_bundle(node, step)
        peers = [self._held(n, node, step) for n in self.nodes[node.stage]
                 if n is not node and (n.owned[step] or self.sharded)]
        if peers:
            yield self.env.all_of(peers)

    def _update(self, node: _Node, step: int) -> Generator[simpy.Event, Any, None]:
        """Replicated async, `node` holding its compute slot: step `step`'s update (the node's `_apply`: the bundles
        combined and the optimizer step), costed as the stage's optimizer step (`opt_s`)."""
        if self.opt[node.stage] > 0:
            yield from self._held_work(node, self.opt[node.stage], OPT, -1, 0, node.generation)

    def _send_commit(self, node: _Node, step: int) -> None:
        """Replicated async: `node`'s COMMIT of `step` leaves (a small frame: one link latency, no uplink time) for
        every replica of the next stage and, from the leader, for every other head replica over its delegation links
        (head_delegation, or sync_collective sharded; without either a standby head replica learns the commit from the
        leader's bundle)."""
        if node is self._leader:
            told = self.delegating or self.sharded  # by a COMMIT message, not by the leader's bundle
            for other in self.nodes[0][1:]:
                after = None if told else self._bundle_event(node, step)
                self.env.process(self._tell(node, other, step, self._head_latency() if told else 0.0, after))
        if node.stage + 1 < self.cfg.num_stages:
            for nxt in self.nodes[node.stage + 1]:
                delay = float(self.latency[node.stage, node.replica, nxt.replica])
                self.env.process(self._tell(node, nxt, step, delay))

    def _tell(self, src: _Node, dst: _Node, step: int, delay: float,
              after: simpy.Event | None = None) -> Generator[simpy.Event, Any, None]:
        """Replicated async: `src`'s COMMIT of `step` reaches `dst` `delay` seconds after `after` (None: now)."""
        if after is not None:
            yield after
        yield self.env.timeout(delay)
        dst.heard.setdefault(step, set()).add(src)
        told, dst.told = dst.told, self.env.event()
        told.succeed()

    def _step_event(self, table: dict[int, simpy.Event], step: int) -> simpy.Event:
        """The event of `step` in `table`, made on first use (whoever waits and whoever fires it may come first)."""
        if step not in table:
            table[step] = self.env.event()
        return table[step]

    def _bundle_event(self, node: _Node, step: int) -> simpy.Event:
        """Replicated async: fires once `node`'s bundle of `step` reached its stage peers (at once when it has none)."""
        return self._step_event(node.bundles, step)

    def _first_holder(self, node: _Node) -> _Node | None:
        """Replicated async, the leader committing early: the head peer its bundle goes to first (the node's: the stage
        peer whose pushes were answered fastest; here every push of a stage runs at the stage's slowest uplink, so all
        are alike and it is the first live one: modelled without churn, the head replica of index 1), None when it
        has no head peer."""
        peers = [n for n in self.nodes[node.stage] if n is not node and n.alive]
        return peers[0] if peers else None

    def _first_event(self, node: _Node, step: int) -> simpy.Event:
        """Replicated async, the leader committing early: fires once its bundle of `step` reached its first holder."""
        return self._step_event(node.first_held, step)

    def _held(self, src: _Node, dst: _Node, step: int) -> simpy.Event:
        """Replicated async: fires once `src`'s bundle of `step` reached `dst` (the leader committing early: its first
        holder has it after the first push, the others after the rest)."""
        if self.sharded:  # the update needs every owner's summed share, the leader's first holder's too
            return self._bundle_event(src, step)
        if self.early_commit and src is self._leader and dst is self._first_holder(src):
            return self._first_event(src, step)
        return self._bundle_event(src, step)

    def _push_bundle(self, node: _Node, step: int, first: bool = False,
                     rest: bool = False) -> Generator[simpy.Event, Any, None]:
        """Replicated async: `node` pushes its one bundle of `step` (the sum of the step's microbatches it computed) to
        every stage peer as the node's `_bundle` does: (r - 1) x the bundle's bytes on its uplink behind its frames,
        held by the peers one latency later, and awaited until the pushes' answers are back one more latency later.
        The leader committing early pushes it in two parts: `first`, to its first holder alone (one bundle's bytes,
        its `_bundle(first_holder=True)`), then `rest`, to the other r - 2 peers at once (its `_rest_of_bundle`).
        Nothing to push when it computed none of them or the stage averages nothing."""
        if self.sharded and not first:
            yield from self._sharded_exchange(node, step)
            return
        arrived = self._first_event(node, step) if first else self._bundle_event(node, step)
        live = [n for n in self.nodes[node.stage] if n.alive]
        bundle = float(self.sync_bytes[node.stage])  # one step's (sync_push: sync_every 1), a whole one to each peer
        peers = 1 if first else len(live) - (2 if rest else 1)
        if not node.owned[step] or bundle <= 0 or peers < 1:  # nothing to push, or the first holder was the only peer
            arrived.succeed()
            return
        start = self.env.now
        yield from self._background_send(node, bundle * peers, min(n.bw for n in live))
        sent = self.env.now
        latency = self._sync_latency(node.stage)
        yield self.env.timeout(latency)
        arrived.succeed()
        yield self.env.timeout(latency)
        self.bundle_pushes.append(BundlePush(step, node.stage, node.replica, peers, start, sent, self.env.now))

    def _sharded_exchange(self, node: _Node, step: int) -> Generator[simpy.Event, Any, None]:
        """Replicated async, sync_collective sharded (a what-if, not built in the node): the linear code's
        `SHARDED_ROUNDS` rounds (P, then Q; `sharding.sharedpowersgd`), each carrying its share of the bundle. In each
        round `node` sends each stage peer the part it owns ((r - 1) / r of the round's bytes on its uplink; nothing
        when it computed none of the step's microbatches), and once every node's parts reached their owners (one
        latency after the last was sent) it sends its own summed part to every peer ((r - 1) / r again), held one
        latency later. A round starts once the one before reached every node. How the bytes split between the rounds
        changes nothing (no round overlaps another): each gets an equal share."""
        stage, live = node.stage, [n for n in self.nodes[node.stage] if n.alive]
        piece = float(self.sync_bytes[stage]) * (len(live) - 1) / len(live) / SHARDED_ROUNDS
        bw = min(n.bw for n in live)
        start = self.env.now
        for k in range(SHARDED_ROUNDS):
            key = step * SHARDED_ROUNDS + k
            if k:  # the next round needs the summed parts of the last from every owner
                yield self.env.all_of([self._step_event(n.round_done, key - 1) for n in live])
            if node.owned[step] and piece > 0:
                yield from self._background_send(node, piece, bw)
            yield self.env.timeout(self._sync_latency(stage))
            self._step_event(node.scattered, key).succeed()
            yield self.env.all_of([self._step_event(n.scattered, key) for n in live])
            if piece > 0:
                yield from self._background_send(node, piece, bw)
            sent = self.env.now
            yield self.env.timeout(self._sync_latency(stage))
            self._step_event(node.round_done, key).succeed()
        self._bundle_event(node, step).succeed()
        self.bundle_pushes.append(BundlePush(step, stage, node.replica, len(live) - 1, start, sent, self.env.now))

    # ------------------------------------------------------------------ drivers
    def _sync_driver(self) -> Generator[simpy.Event, Any, None]:
        cfg = self.cfg
        if cfg.startup_s > 0:
            yield self.env.timeout(cfg.startup_s)
        for step in range(cfg.steps):
            t0 = self.env.now
            if cfg.schedule == "gpipe" and not self.capped:  # capped: backwards run as gradients come back
                self.gpipe_gate = self.env.event()
                self.tail_done = set()
            base = step * cfg.microbatches
            yield self.env.all_of([self.env.process(self._microbatch(base + i)) for i in range(cfg.microbatches)])
            yield self.env.all_of([self.env.process(self._stage_step_end(s)) for s in range(cfg.num_stages)])
            if step == 0 and cfg.first_step_extra_s > 0:
                yield self.env.timeout(cfg.first_step_extra_s)
            self.step_times.append(self.env.now - t0)

    def _async_driver(self) -> Generator[simpy.Event, Any, None]:
        cfg = self.cfg
        total = cfg.steps * cfg.microbatches
        if cfg.startup_s + cfg.first_step_extra_s > 0:
            yield self.env.timeout(cfg.startup_s + cfg.first_step_extra_s)
        depth0 = cfg.in_flight_per_stage if cfg.in_flight_per_stage is not None else cfg.num_stages
        cap = depth0 * cfg.replicas if cfg.max_staleness is None else (cfg.max_staleness + 1) * cfg.microbatches
        window = simpy.Resource(self.env, capacity=cap)
        procs = []

        def one(mb: int, req: Any) -> Generator[simpy.Event, Any, None]:
            try:
                yield from self._microbatch(mb)
            finally:
                window.release(req)

        for mb in range(total):
            gate = mb // cfg.microbatches - (cfg.max_staleness or 0) - 1  # update the head needs first
            if cfg.max_staleness is not None and gate >= 0 and not self.step_done[gate].triggered:
                yield self.step_done[gate]
            req = window.request()
            yield req
            procs.append(self.env.process(one(mb, req)))
        yield self.env.all_of(procs)
        times = [cfg.startup_s] + [self.completion_times[i] for i in range(cfg.microbatches - 1, total, cfg.microbatches)]
        self.step_times = [b - a for a, b in zip(times[:-1], times[1:], strict=True)]

    def _replicated_async_driver(self) -> Generator[simpy.Event, Any, None]:
        """Replicated async: the head leader hands the microbatches out oldest first, each of step k once k is in its
        window and it could hand one out (`_pick_head`: to a delegate or itself); the run ends once every node
        applied every update. A step's time runs from the last node's update of the step before to its own."""
        cfg = self.cfg
        if cfg.startup_s + cfg.first_step_extra_s > 0:
            yield self.env.timeout(cfg.startup_s + cfg.first_step_extra_s)
        self.finishers = [self.env.process(self._finisher(n)) for stage in self.nodes for n in stage]
        procs = []
        for mb in range(cfg.steps * cfg.microbatches):
            step = mb // cfg.microbatches
            yield from self._in_window(self._leader, step)
            head = yield from self._pick_head(step)
            procs.append(self.env.process(self._microbatch(mb, head)))
        yield self.env.all_of(procs + self.finishers)
        times = [cfg.startup_s] + self.last_apply
        self.step_times = [b - a for a, b in zip(times[:-1], times[1:], strict=True)]

    def _driver(self) -> Generator[simpy.Event, Any, None]:
        """The schedule's driver."""
        if self.node_async:
            return self._replicated_async_driver()
        return self._async_driver() if self.cfg.schedule == "async" else self._sync_driver()

    def run(self) -> WanResult:
        """Simulate every step; raise DeadlockError if the run does not finish within max_sim_s."""
        cfg = self.cfg
        driver = self.env.process(self._driver())
        if self.churn_on:
            for stage in self.nodes:
                for node in stage:
                    self.env.process(self._churn(node))
        bound = self.env.timeout(cfg.max_sim_s)
        try:
            self.env.run(until=self.env.any_of([driver, bound]))
        except RuntimeError as exc:  # event queue ran dry: nothing can progress
            raise DeadlockError(f"pipeline made no progress at t={self.env.now:.3f}s: {exc}") from exc
        if not driver.triggered:
            raise DeadlockError(
                f"pipeline did not finish {cfg.steps} steps within max_sim_s={cfg.max_sim_s}: "
                f"{self.completed} of {cfg.steps * cfg.microbatches} microbatches done"
            )
        self.finished = True
        end = self.env.now
        busy = [sum(n.busy for n in stage) for stage in self.nodes]
        n_nodes = cfg.num_stages * cfg.replicas
        util = sum(busy) / (n_nodes * end) if end > 0 else 0.0
        bubble = 1.0 - max(busy) / (cfg.replicas * end) if end > 0 else 0.0
        tokens = self.completed * cfg.microbatch_tokens
        steady = self.step_times[cfg.warmup_steps:]
        steady_tps = len(steady) * cfg.tokens_per_step / sum(steady) if steady and sum(steady) > 0 else 0.0
        return WanResult(
            sim_time_s=end,
            tokens_per_s=tokens / end if end > 0 else 0.0,
            utilisation=util,
            bubble_fraction=bubble,
            mean_step_s=float(np.mean(self.step_times)) if self.step_times else 0.0,
            step_times_s=list(self.step_times),
            microbatches_expected=cfg.steps * cfg.microbatches,
            microbatches_completed=self.completed,
            failed_attempts=self.failed,
            forward_passes=list(self.fwd_passes),
            backward_passes=list(self.bwd_passes),
            departures=self.departures,
            bytes_sent=self.bytes_sent,
            stage_busy_s=busy,
            startup_s=cfg.startup_s,
            steady_tokens_per_s=steady_tps,
            trace=self.trace,
        )


def simulate(config: WanConfig, trace: bool = False) -> WanResult:
    """Run the SimPy pipeline model once."""
    return PipelineSim(config, trace=trace).run()
