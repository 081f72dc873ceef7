"""`pmn simulate wan --vs datacenter`: the protocolnanogpt model on home links against the same on 100 Gb/s.

Both runs: 8 stages x 16 replicas, the preset's device and tokens per step (64 x 8 sequences of 1024
tokens, here as 256 microbatches of 2 sequences so that every replica pipeline gets 16), one
optimiser step per batch. WAN: 200 Mb/s uplinks and 50 ms one-way, the subspace boundary codec, the
given schedule (async with a staleness bound by default) and replica averaging option. Datacenter:
100 Gb/s and 0.01 ms, dense bf16 boundaries, 1F1B, dense averaging. Time to the target loss = steps to
target x simulated seconds per step; the WAN's steps to target are the public dense run's times the
steps multipliers of its loss penalties at equal tokens (subspace codec, async schedule, compressed
averaging), each from a measurement where one exists and labelled assumed otherwise. Seconds per step are
the steady ones: `SIMULATED_STEPS` steps, timed over the second half. Beside it,
`slowdown_vs_bubble_free_datacenter` divides by the datacenter's busiest-stage compute per step, a bound no
synchronous schedule reaches (1F1B idles through its bubble; an interleaved schedule would shrink it). The async penalty is
the one measured at the WAN's staleness bound over the training length nearest the target's steps
(`simulations.async_loss`, from `benchmarks/async_recipe.py`); failing that, `benchmarks/wan.py`'s.

For the node's async with replicated stages, `floors` gives the WAN step's lower bounds (`simulations.bounds`: the
busiest replica's compute, its uplink, and the node's window rule) and the slowdown each floor would give with the
same loss penalties: `as_run` with the run's exchange (the node's: bundles pushed directly), `sharded_exchange` with
a reduce-scatter and all-gather of them in the two rounds of a code linear across replicas (`--collective sharded`, a
what-if: not built in the node, whose PowerSGD is not linear; `sharding.sharedpowersgd`). Each also gives the
floor of the node's own finish protocol (`step_as_built_s`, `slowdown_as_built`; `slowdown_floor` keys ending in
`_node_finish`): its leader's early COMMIT and the exchange, one after another, in the window. A goal below a
floor's slowdown needs more than a faster finish.

The averaging penalty is the one measured for the WAN's own averaging option (rank and factor bits):
from `simulations.averaging_loss` (`benchmarks/wan_averaging.py` runs, the median over seeds, with the async
penalty's optimiser where measured), else `benchmarks/wan.py`'s when it ran that option.

`--overlap-averaging` sends DiLoCo's outer exchange on the WAN nodes' uplinks while they compute (the outer
step then lands one round late: `benchmarks/wan_averaging.py --math` measures that variant, diloco-delayed)
instead of holding their compute for it; with PowerSGD it runs the node's own exchange: each microbatch's
factors (a whole rank-R contribution: 16 per replica and step in this layout) pushed to every other replica right
after its backward, behind frames, the update waiting for the last (`WanConfig.sync_push`). Until session 22 the
comparison sent one contribution per replica and step, spread over its backwards: 16 times fewer bytes than the
node moves. `--contributions step` is the node's `replica_exchange = "step"` (session 23): one contribution per
replica and step, pushed once the step's commit has come down to the replica's stage (in the flushed schedules; under
async with `--head leader` or `delegated` when the replica finishes the step, as the node does, see below; async with
`--head lanes` pushes it after the replica's last backward: an optimistic timing); its loss penalty is the one measured
with that exchange where recorded; `--microbatch-seqs` trades fewer contributions for fewer, larger
microbatches on the WAN side (the datacenter keeps its layout). Without overlap averaging holds compute, over the
faster of a ring all-reduce and direct pushes. The WAN head stage runs as the node runs it. `--head leader` (the node
with `--contributions microbatch`, or with replicas.head_delegation = false): one head replica leads, computes every
microbatch of stage 0 and pushes each one's contribution to the 15 standbys, which compute nothing. `--head
delegated` (the node with `--contributions step`, replicas.head_delegation on; `WanConfig.head_delegation`): the
leader hands each microbatch to a head replica with fewer than `NODE_MAX_TASKS` (16, the node's `replicas.max_tasks`;
`WanConfig.tasks_per_delegate`) tasks outstanding (a TASK, one link latency) and, while it could send one to stage 1
itself, handed fewer than an even share of the step's microbatches (16 of 256 among 16 head replicas), computing the
rest itself; with no stage-1 room of its own it hands one to any delegate under the task cap. It counts a microbatch
done when the delegate's DONE is in (one latency after its backward); the delegates push their bundles once the
leader's COMMIT reaches them (one latency after the step's last DONE; under async, below, after the leader's first
bundle push). With `--contributions microbatch` a what-if
under gpipe or 1f1b (the node then does not delegate) and refused under async (the node runs async with replicas only with
runtime.replica_exchange = step). Before the node had replicas.max_tasks a delegate held at
most the in-flight cap's 2 tasks with no share (`--tasks-per-delegate 2` gives that figure: the share never binds
there). `--tasks-per-delegate N` sets the task cap (0: none); the output's `task_cap` names the one used. `--head
lanes` (every head replica a share with no TASK, DONE or COMMIT: the comparison's layout until session 23) is
delegation's uncoordinated upper bound, a what-if the node does not have.

`--schedule async` with `--contributions step` and `--head leader` or `delegated` is the node's async schedule with
replicated stages (runtime.schedule = async, runtime.max_staleness = `--max-staleness`; `WanConfig.replicated_async`):
every node runs the work of steps a .. a + S only (a: the updates it applied), the leader hands out the microbatches
of those steps oldest first as above, step k is committed once all its microbatches are back, and each node finishes
step k (the COMMIT from upstream, every sender's verdict, its COMMIT on, its bundle to its 15 stage peers, theirs in,
the update), the updates in step order, as the node runs it since session 25: the finish runs beside its work (later
steps of its window computed, dispatched and handed out meanwhile, its bundle on its uplink behind its frames) and
only the update (the optimizer step's time) blocks it; since session 32 a node starts a step's finish as soon as it
knows the step's commit, beside the finishes of earlier steps still running (`WanConfig.pipelined_finish`; the
standby head replicas still one at a time), where before it waited for the update of the step before
(`serial_finish=True`, no CLI flag); `finish_blocks=True` (no CLI flag) is the node before session 25, computing and
dispatching nothing while it finishes. With `--head delegated` and `--max-staleness` >= 1 the leader's finish is
ordered as the node's `_early_commit` (session 25): its bundle to one head peer, that push's answer, its COMMIT (to
the delegates and downstream), then its bundle to the 14 other head peers while the delegates push theirs (the head's
finish chain: one push and its round trip, the COMMIT's 50 ms, then the 14 or 15 pushes side by side). Otherwise
the leader pushes its bundle to all 15 before its COMMIT (any delegates' pushes following the whole of it): the node
as built with `--head leader` or at `--max-staleness 0`, and the node before session 25 (`finish_blocks`, or
`WanConfig.leader_bundle_first` with the concurrent finish; no CLI flags). Its step time runs between the last node's
successive updates. Other async
runs (per-microbatch contributions, no PowerSGD pushes, `--head lanes`) are the
earlier async model, each replica's update after its own last backward, labelled not built. The node as built
(`--schedule gpipe`, the node's replicated engine having no 1F1B gate whatever runtime.schedule says, or the async
above; with `--head leader`, or `--head delegated` with `--contributions step`) also routes as the node does: a sender (the head
leader and each delegate too) has at most `NODE_MAX_INFLIGHT` (4, the node's `replicas.max_inflight`) microbatches
outstanding at one downstream replica, and gpipe's every-forward-first barrier goes (`WanConfig.inflight_per_replica`;
the head leader has 2 x 16 in flight to stage 1); before this cap the comparison ran the schedule's own rule (gpipe:
every forward first; 1f1b: num_stages - stage per node). `--inflight-per-replica N` sets that cap for any
configuration (0: none); the output's `inflight_cap` names the one used. `--async-loss-ratio` / `--averaging-loss-ratio` are what-ifs: loss penalties the caller gives
instead of the calibration file's, labelled "given by the caller" in the output.
"""

from __future__ import annotations

import math
from typing import Any

from .async_loss import pick as pick_async_loss
from .averaging import Averaging, sync_bytes_per_step
from .averaging_loss import pick as pick_averaging_loss
from .bounds import step_floors
from .params import LinkConfig, Schedule, WanConfig
from .pipeline import simulate
from .presets import (
    ASSUMED_SUBSPACE_LOSS_RATIO,
    PUBLIC_DENSE_STEPS,
    DeviceAssumption,
    _wire,
    calibration_ratio,
    protocolnanogpt_model,
    stage_params,
    stage_times,
    steps_multiplier,
)

STAGES, REPLICAS = 8, 16
STEP_SEQS, MICROBATCH_SEQS = 512, 2  # sequences per step (524,288 tokens, as the protocolnanogpt preset); per
# microbatch: the datacenter's (16 microbatches per replica pipeline keep 1F1B's bubble small), the WAN's default
MICROBATCHES = STEP_SEQS // MICROBATCH_SEQS
SLOWDOWN_GOAL = 1.3
DATACENTER_LINK = LinkConfig(bandwidth_mbps=100_000.0, latency_ms=0.01)
WAN_LINK = LinkConfig(bandwidth_mbps=200.0, latency_ms=50.0)
# loss penalties at equal tokens used when nothing measured is recorded (labelled in the output)
ASSUMED_ASYNC_LOSS_RATIO = 1.0
ASSUMED_ASYNC_SOURCE = ("none measured at this scale; the local benchmark's ratio (benchmarks/wan.py "
                        "loss_ratio_async) is used when recorded in the calibration file")
ASSUMED_AVERAGING_LOSS_RATIO = {"dense": 1.0, "powersgd": 1.0, "diloco": 1.0}
ASSUMED_AVERAGING_SOURCE = ("no loss ratio of this averaging option recorded in the calibration file "
                            "(benchmarks/wan_averaging.py measures PowerSGD's at a rank and factor width): no penalty "
                            "assumed (optimistic)")
# optimiser steps simulated: the async pipeline and the PowerSGD pushes' backlog settle over about 8 steps, and the
# second half's steady steps are what time to target uses (4 steps, the first left out, understated the WAN step
# by 8 % at staleness 3 with int8 factors)
SIMULATED_STEPS = 16
NODE_MAX_INFLIGHT = 4  # node.config.ReplicaConfig.max_inflight's default: microbatches one sender may have outstanding
# at one downstream replica (node.replicas.routing.Router.choose); the node-as-built comparison's in-flight cap
NODE_MAX_TASKS = 16  # node.config.ReplicaConfig.max_tasks's default: the leader's tasks one head delegate may hold at
# once (node.replicas.engine's delegate router); the node-as-built comparison's task cap with --head delegated
CONTRIBUTIONS = {  # --contributions: how a WAN replica's PowerSGD factors leave, as the output names it
    "microbatch": "one per microbatch a replica computes, pushed after its backward (the node's default, "
                  "replica_exchange = microbatch)",
    "step": "one per replica and step (the node's replica_exchange = step), pushed once the step's commit reaches "
            "its stage (flushed schedules; async with head leader or delegated: when the replica finishes the step, "
            "beside its work as the node's finish runs; async with head lanes: after its last backward, which is "
            "optimistic)",
}
HEADS = {  # --head: who computes stage 0 on the WAN side, as the output names it
    "leader": "one head replica leads and computes every microbatch of stage 0, the 15 others stand by and receive "
              "its contributions (the node); with replica_exchange = step only under replicas.head_delegation = false",
    "delegated": "one head replica leads (the step authority) and hands each microbatch of stage 0 to another head "
                 "replica with room (a TASK; at most the task cap's tasks outstanding at each and, while the leader "
                 "could send one itself, at most an even share of the step's microbatches, the leader computing the "
                 "rest); the delegate sends its activation on its own uplink and reports DONE, "
                 "and once every DONE is in the leader's COMMIT sets the delegates' bundles going (the node's "
                 "replicas.head_delegation, with replica_exchange = step; async: the steps of the leader's window, "
                 "oldest first)",
    "lanes": "every head replica computes a share of stage 0's microbatches, as the other stages do, with no "
             "leader's TASK, DONE or COMMIT: the uncoordinated upper bound of delegated head work (a what-if: not "
             "built in the node)",
}


def _config(calibration: dict[str, Any], codec: str, schedule: Schedule, link: LinkConfig, averaging: Averaging,
            max_staleness: int | None, steps: int, seed: int, overlap: bool = False,
            collective: str = "fastest", push: bool = False, per_step: bool = False,
            microbatch_seqs: int = MICROBATCH_SEQS, head_leader: bool = False, head_delegation: bool = False,
            inflight_per_replica: int | None = None, tasks_per_delegate: int | None = None,
            finish_blocks: bool = False, serial_finish: bool = False) -> WanConfig:
    """push: the node's exchange, one contribution per microbatch a replica computes (per_step: one per replica and
    step: the node's replica_exchange = step, `WanConfig.push_per_step`). head_leader: stage 0 as the node runs it, one leader
    computing every microbatch (and pushing each one's contribution) while the other head replicas stand by;
    head_delegation (with head_leader): the leader hands them out as tasks (`WanConfig.head_delegation`; per-microbatch
    contributions are pushed by whoever computed the microbatch).
    inflight_per_replica: `WanConfig.inflight_per_replica` (None: the schedule's own rule). tasks_per_delegate:
    `WanConfig.tasks_per_delegate` (head_delegation only; None: no cap). finish_blocks: `WanConfig.finish_blocks`
    (replicated async: the node before session 25, blocked while it finishes a step). serial_finish: replicated async
    without `WanConfig.pipelined_finish` (the node before session 32: one step's finish at a time)."""
    from sharding.partition import partition

    device = DeviceAssumption()
    model = protocolnanogpt_model(16 if codec == "subspace" else None)
    specs = partition(model, STAGES)
    tokens = microbatch_seqs * model.seq_len
    microbatches = STEP_SEQS // microbatch_seqs
    fwd, bwd = stage_times(model, specs, tokens, device.effective_tflops * 1e12, calibration_ratio(calibration))
    opt = tuple(stage_params(model, s) * device.optimizer_bytes_per_param / (device.memory_gbps * 1e9)
                for s in specs)
    fwd_b, bwd_b = _wire(model, codec) if codec == "subspace" else (model.d_model * 2 + 2, model.d_model * 2)
    # contributions a replica sends per step: the node pushes one per microbatch it computed
    contributions = [(microbatches if head_leader and i == 0 else -(-microbatches // REPLICAS))
                     if push and not per_step else 1 for i in range(STAGES)]
    return WanConfig(num_stages=STAGES, fwd_s=fwd, bwd_s=bwd, opt_s=opt, replicas=REPLICAS, microbatches=microbatches,
                     microbatch_tokens=tokens, steps=steps, schedule=schedule, fwd_bytes_per_token=float(fwd_b),
                     bwd_bytes_per_token=float(bwd_b),
                     grad_sync_bytes=tuple(int(sync_bytes_per_step(model, s, averaging) * averaging.outer_steps
                                               * n) for s, n in zip(specs, contributions, strict=True)),
                     sync_every=averaging.outer_steps, overlap_sync=overlap, head_leader=head_leader,
                     head_delegation=head_delegation,
                     sync_collective=collective, sync_push=push, push_per_step=push and per_step,
                     link=link, max_staleness=max_staleness if schedule == "async" else None, seed=seed,
                     inflight_per_replica=inflight_per_replica, tasks_per_delegate=tasks_per_delegate,
                     finish_blocks=finish_blocks, pipelined_finish=not (finish_blocks or serial_finish),
                     warmup_steps=max(1, steps // 2) if steps > 1 else 0)  # the steady second half


def run_vs_datacenter(calibration: dict[str, Any], schedule: Schedule = "async", max_staleness: int = 4,
                      averaging: str = "powersgd:64", steps: int = SIMULATED_STEPS, seed: int = 0,
                      overlap_averaging: bool = False, contributions: str = "microbatch",
                      microbatch_seqs: int = MICROBATCH_SEQS, head: str = "leader",
                      async_loss_ratio: float | None = None,
                      averaging_loss_ratio: float | None = None,
                      inflight_per_replica: int | None = None,
                      tasks_per_delegate: int | None = None,
                      finish_blocks: bool = False, collective: str = "direct",
                      serial_finish: bool = False) -> dict[str, Any]:
    """Time to the target loss on home links over the same on 100 Gb/s; `slowdown_vs_datacenter` and its inputs.

    overlap_averaging: the WAN replicas' averaging goes out on their uplinks while they compute (a DiLoCo outer step
    applied one round late; PowerSGD factors pushed during the step) instead of holding their compute.
    contributions: with PowerSGD overlapped, `microbatch` (the node: one contribution per microbatch a replica computes,
    each pushed after its backward) or `step` (the node's replica_exchange = step: one per replica and step, pushed
    once the step's commit reaches its stage; under async with head leader or delegated when the replica finishes the
    step, as the node's replicated async does (`WanConfig.replicated_async`); with head lanes after its last backward,
    an optimistic timing).
    microbatch_seqs: sequences per WAN microbatch (a divisor of STEP_SEQS; the datacenter keeps MICROBATCH_SEQS):
    fewer, larger microbatches mean fewer per-microbatch contributions.
    head: who computes stage 0 on the WAN side (`HEADS`): `leader` (the node with replica_exchange = microbatch: one
    head replica computes every microbatch of stage 0 and pushes each one's contribution to the 15 standbys),
    `delegated` (the node with replica_exchange = step: the leader hands the microbatches to the other head replicas
    as tasks; with contributions = microbatch a what-if under gpipe or 1f1b, labelled so, and refused under async:
    the node's async with replicas needs replica_exchange = step) or `lanes` (every head
    replica a share with no coordination, the upper bound of delegation: a what-if, not built in the node, labelled
    so in the output).
    async_loss_ratio / averaging_loss_ratio: loss penalties at equal tokens given by the caller (what-ifs; labelled
    so in the output) instead of the calibration file's.
    inflight_per_replica: microbatches a WAN sender may have outstanding at one downstream replica
    (`WanConfig.inflight_per_replica`; the leader's and every delegate's own sends too); None: the node's
    `NODE_MAX_INFLIGHT` when the configuration is the node as built (schedule gpipe, or async with contributions =
    step; head leader, or delegated with contributions = step), no cap otherwise; 0: no cap. Named in the output's
    `inflight_cap`.
    tasks_per_delegate: head `delegated` only, the leader's tasks one delegate may hold at once
    (`WanConfig.tasks_per_delegate`); None: the node's `NODE_MAX_TASKS` when the configuration is the node as built,
    no cap otherwise; 0: no cap. Named in the output's `task_cap`.
    finish_blocks: async with head leader or delegated and contributions = step only, the node before session 25 (a
    what-if, `WanConfig.finish_blocks`): each node's loop blocked throughout its finish of a step, not only for the
    update; labelled not built.
    serial_finish: the same configurations only, the node before session 32 (a what-if, `WanConfig.pipelined_finish`
    off): each node starts a step's finish only once it applied the step before; labelled not built.
    collective: how the WAN replicas' bundles reach their stage peers under the node's async with replicated stages
    (schedule async, head leader or delegated, contributions step): `direct` (the node: each pushes its bundle to every
    peer) or `sharded` (a what-if, not built: a reduce-scatter to shard owners, then an all-gather of the sums, in the
    two rounds of a code linear across replicas, `sharding.sharedpowersgd`; `WanConfig.sync_collective`; the loss
    penalty stays the node's PowerSGD's unless `averaging_loss_ratio` gives the linear code's)."""
    avg = Averaging.parse(averaging)
    for name, value in (("async_loss_ratio", async_loss_ratio), ("averaging_loss_ratio", averaging_loss_ratio)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name}={value!r}: must be a positive finite loss ratio (e.g. 1.014)")
    if overlap_averaging and avg.mode == "dense":
        raise ValueError("overlap_averaging needs averaging=diloco:<H> (an outer step a round late) or "
                         "powersgd:<R> (factors pushed during the step); dense gradients are a ring all-reduce here")
    if (isinstance(microbatch_seqs, bool) or not isinstance(microbatch_seqs, int) or microbatch_seqs < 1
            or STEP_SEQS % microbatch_seqs or STEP_SEQS // microbatch_seqs < REPLICAS):
        raise ValueError(f"microbatch_seqs={microbatch_seqs!r}: must divide the {STEP_SEQS} sequences of a step and "
                         f"leave every one of the {REPLICAS} replicas a microbatch (1 .. {STEP_SEQS // REPLICAS})")
    if contributions not in CONTRIBUTIONS:
        raise ValueError(f"contributions={contributions!r}: use one of {', '.join(CONTRIBUTIONS)}")
    if head not in HEADS:
        raise ValueError(f"head={head!r}: use one of {', '.join(HEADS)}")
    if inflight_per_replica is not None and (isinstance(inflight_per_replica, bool) or
                                             not isinstance(inflight_per_replica, int) or inflight_per_replica < 0):
        raise ValueError(f"inflight_per_replica={inflight_per_replica!r}: must be an integer >= 1 (microbatches one "
                         f"sender may have outstanding at one downstream replica) or 0 (no cap)")
    if tasks_per_delegate is not None and (isinstance(tasks_per_delegate, bool) or
                                           not isinstance(tasks_per_delegate, int) or tasks_per_delegate < 0):
        raise ValueError(f"tasks_per_delegate={tasks_per_delegate!r}: must be an integer >= 1 (the leader's tasks one "
                         f"head delegate may hold at once) or 0 (no cap)")
    if tasks_per_delegate is not None and head != "delegated":
        raise ValueError(f"tasks_per_delegate={tasks_per_delegate!r} caps the tasks of delegated head work: it needs "
                         f"head='delegated' (got head={head!r})")
    push = overlap_averaging and avg.mode == "powersgd"
    if contributions == "step" and not push:
        raise ValueError("contributions='step' sets when PowerSGD pushes go out: it needs averaging=powersgd:<R> "
                         "with overlap_averaging")
    if schedule == "async" and head == "delegated" and contributions != "step":
        raise ValueError("head='delegated' with schedule='async' needs contributions='step': the node runs "
                         "runtime.schedule = async with replicas only with runtime.replica_exchange = step, and "
                         "delegates head work only with it")
    not_built = []  # what this WAN configuration runs that the node does not
    if serial_finish and not (schedule == "async" and head in ("leader", "delegated") and contributions == "step"):
        raise ValueError("serial_finish finishes the steps of the node's async schedule with replicated stages one at "
                         "a time: it needs schedule async, head leader or delegated and contributions step")
    if finish_blocks and not (schedule == "async" and head in ("leader", "delegated") and contributions == "step"):
        raise ValueError("finish_blocks blocks a node while it finishes a step of the node's async schedule with "
                         "replicated stages: it needs schedule='async', head='leader' or 'delegated' and "
                         "contributions='step'")
    if collective not in ("direct", "sharded"):
        raise ValueError(f"collective={collective!r}: use direct (the node) or sharded (a what-if)")
    if collective == "sharded":
        if not (schedule == "async" and head in ("leader", "delegated") and contributions == "step" and push):
            raise ValueError("collective='sharded' exchanges the bundles of the node's async with replicated stages: "
                             "it needs schedule='async', head='leader' or 'delegated', contributions='step' and "
                             "averaging=powersgd:<R> with overlap_averaging")
    if schedule == "async":
        what_if = _async_what_if(head, contributions == "step")
        if what_if:
            not_built.append(what_if)
    if schedule == "1f1b":
        not_built.append("1F1B's per-node gate with replicated stages (the node's replicated engine routes by its "
                         "in-flight caps whatever runtime.schedule says: --schedule gpipe with the node's caps is "
                         "what it runs)")
    if head == "lanes":
        not_built.append("a data-parallel head stage with no coordination (--head lanes; the node's head replicas "
                         "take stage 0's microbatches from one leader: as tasks with replica_exchange = step, "
                         "--head delegated, else all on the leader, --head leader)")
    if head == "delegated" and contributions != "step":
        not_built.append("delegated head work with per-microbatch contributions (--head delegated without "
                         "--contributions step; the node delegates only with replica_exchange = step, and with "
                         "microbatch its leader computes all of stage 0: --head leader)")
    if inflight_per_replica is None and not not_built:
        cap: int | None = NODE_MAX_INFLIGHT
        cap_label = (f"{cap} per sender and downstream replica: the node's replicas.max_inflight default (node as "
                     f"built; gpipe without its every-forward-first barrier, async within each node's window)")
    elif inflight_per_replica:
        cap, cap_label = inflight_per_replica, (f"{inflight_per_replica} per sender and downstream replica: given by "
                                                f"the caller (--inflight-per-replica)")
    else:
        cap, cap_label = None, ("none: the schedule's own rule (gpipe: every forward first; 1f1b: num_stages - stage "
                                "per node; async: its window)")
    tasks: int | None = None
    if head != "delegated":
        task_label = f"none: no tasks (head {head}; only --head delegated hands stage-0 microbatches out)"
    elif tasks_per_delegate is None and not not_built:
        steps_held = max_staleness + 1 if schedule == "async" else 1  # the node's window holds max_staleness + 1
        tasks = NODE_MAX_TASKS * steps_held
        task_label = (f"{tasks} tasks per head delegate: the node's replicas.max_tasks default for each of the "
                      f"{steps_held} step(s) its window holds (node as built; a delegate gets at most an even share "
                      f"of a step's microbatches while the leader could send one itself)")
    elif tasks_per_delegate:
        tasks, task_label = tasks_per_delegate, (f"{tasks_per_delegate} tasks per head delegate: given by the caller "
                                                 f"(--tasks-per-delegate)")
    else:
        task_label = ("none: a head delegate holds any number of tasks (an even share of the step's microbatches "
                      "while the leader could send one itself)")
    if collective == "sharded":  # after the caps: the node's caps, with an exchange it does not have
        not_built.append("a sharded exchange of the replicas' bundles (--collective sharded: a reduce-scatter to "
                         "shard owners and an all-gather of their sums, in the two rounds of PowerSGD with a common Q, "
                         "sharding.sharedpowersgd, the code it needs; the node factorises each replica's gradient on "
                         "its own, which sums to no contribution, and pushes each bundle to every stage peer; the "
                         "averaging loss penalty is the node's code's unless --averaging-loss-ratio gives another)")
    if serial_finish and not finish_blocks:
        not_built.append("the serial finish (the node before session 32: a step's finish started only once the step "
                         "before it was applied; the node now starts it once the step's commit is known)")
    if finish_blocks:  # after the caps: the node's caps, with the finish the node had before session 25
        not_built.append("the blocking finish (the node before session 25: its loop blocked from a step's finish to "
                         "its update; the node now finishes a step beside its work, blocked only for the update)")
    wan_cfg = _config(calibration, "subspace", schedule, WAN_LINK, avg, max_staleness, steps, seed,
                      overlap=overlap_averaging and not push, collective=collective if push else "fastest", push=push,
                      per_step=contributions == "step", microbatch_seqs=microbatch_seqs,
                      head_leader=head in ("leader", "delegated"), head_delegation=head == "delegated",
                      inflight_per_replica=cap, tasks_per_delegate=tasks, finish_blocks=finish_blocks,
                      serial_finish=serial_finish)
    dc_cfg = _config(calibration, "dense", "1f1b", DATACENTER_LINK, Averaging(), None, steps, seed)
    wan, dc = simulate(wan_cfg), simulate(dc_cfg)
    wan_step = wan_cfg.tokens_per_step / (wan.steady_tokens_per_s or wan.tokens_per_s)
    dc_step = dc_cfg.tokens_per_step / (dc.steady_tokens_per_s or dc.tokens_per_s)
    stored = calibration.get("wan_benchmark")
    bench: dict[str, Any] = stored if isinstance(stored, dict) else {}
    async_ratio, async_source = ASSUMED_ASYNC_LOSS_RATIO, ASSUMED_ASYNC_SOURCE
    by_length = pick_async_loss(calibration.get("async_loss"), wan_cfg.max_staleness or 0, PUBLIC_DENSE_STEPS)
    if schedule == "async" and by_length is not None:
        async_ratio, async_source = by_length.ratio, by_length.label
    elif schedule == "async" and bench.get("loss_ratio_async") is not None:
        async_ratio = float(bench["loss_ratio_async"])
        async_source = (f"measured: benchmarks/wan.py loss_ratio_async (max_staleness {bench.get('max_staleness')}, "
                        f"{bench.get('loss_steps') or 'unrecorded'} steps)")
    if schedule != "async":
        async_ratio, async_source = 1.0, "synchronous schedule: exact"
    avg_ratio, avg_source = ASSUMED_AVERAGING_LOSS_RATIO[avg.mode], ASSUMED_AVERAGING_SOURCE
    measured = bench.get("averaging") if isinstance(bench.get("averaging"), dict) else {}
    recipe = (calibration.get("async_loss") or {}).get("optimizer") if schedule == "async" else None
    by_option = pick_averaging_loss(calibration.get("averaging_loss"), avg.label(), recipe,
                                    "step" if push and contributions == "step" else "microbatch")
    if by_option is not None:
        avg_ratio, avg_source = by_option.ratio, by_option.label
    elif (avg.mode == "powersgd" and bench.get("loss_ratio_compressed_avg") is not None and measured
          and int(measured.get("rank") or 0) == avg.rank and int(measured.get("bits") or 16) == avg.bits):
        avg_ratio = float(bench["loss_ratio_compressed_avg"])  # measured at this rank and factor width
        bits = int(measured.get("bits") or 16)
        avg_source = (f"measured: benchmarks/wan.py loss_ratio_compressed_avg (PowerSGD rank {measured.get('rank')}, "
                      f"{f'int{bits}' if bits < 16 else 'bf16'} factors, "
                      f"{measured.get('iterations', 1)} power iteration(s), against "
                      f"{measured.get('dense_baseline', 'dense')}, {measured.get('model')} model, "
                      f"{measured.get('steps')} steps)")
    if schedule == "async" and async_loss_ratio is not None:
        async_ratio, async_source = async_loss_ratio, "given by the caller (--async-loss-ratio)"
    if averaging_loss_ratio is not None:
        avg_ratio, avg_source = averaging_loss_ratio, "given by the caller (--averaging-loss-ratio)"
    async_ratio, async_source = _no_gain(async_ratio, async_source)
    avg_ratio, avg_source = _no_gain(avg_ratio, avg_source)
    mult = {"subspace": steps_multiplier(ASSUMED_SUBSPACE_LOSS_RATIO), "async": steps_multiplier(async_ratio),
            "averaging": steps_multiplier(avg_ratio)}
    steps_factor = mult["subspace"] * mult["async"] * mult["averaging"]
    wan_steps = PUBLIC_DENSE_STEPS * steps_factor
    wan_time, dc_time = wan_steps * wan_step, PUBLIC_DENSE_STEPS * dc_step
    slowdown = wan_time / dc_time
    # the datacenter's step with no pipeline bubble at all (its busiest stage's compute): a bound no synchronous
    # schedule reaches, reported beside the 1F1B comparison so the bubble's share of the gap is visible
    per_replica = -(-MICROBATCHES // REPLICAS)
    dc_floor = max(per_replica * (f + b) + o for f, b, o in zip(dc_cfg.fwd_s, dc_cfg.bwd_s, dc_cfg.opt_s, strict=True))
    floors: dict[str, Any] = {}
    if wan_cfg.replicated_async:  # what no finish of the node's async could beat, and with a sharded exchange
        for name, exchange in (("as_run", None), ("sharded_exchange", "sharded")):
            f = step_floors(wan_cfg, exchange)
            floors[name] = {**f.to_dict(), "slowdown": f.step_s * steps_factor / dc_step,
                            "slowdown_as_built": f.step_as_built_s * steps_factor / dc_step}
    return {
        "slowdown_vs_datacenter": slowdown,
        "slowdown_vs_bubble_free_datacenter": wan_time / (PUBLIC_DENSE_STEPS * dc_floor),
        "goal_slowdown": SLOWDOWN_GOAL,
        "goal_met": slowdown <= SLOWDOWN_GOAL,
        "node_as_built": not not_built,
        "not_built": not_built,
        "inflight_cap": cap_label,
        "task_cap": task_label,
        "wan": {"schedule": schedule, "max_staleness": wan_cfg.max_staleness, "averaging": avg.label(),
                "averaging_overlapped": overlap_averaging, "averaging_collective": wan_cfg.sync_collective,
                "contributions": (CONTRIBUTIONS[contributions] if push else
                                  "one exchange per step (the option's bytes per replica)"),
                "head": HEADS[head], "codec": "subspace", "step_s": wan_step, "utilisation": wan.utilisation,
                "bubble_fraction": wan.bubble_fraction, "steps_to_target": wan_steps, "time_to_target_s": wan_time,
                "replica_bytes_per_step": [b / wan_cfg.sync_every for b in wan_cfg.grad_sync_bytes],
                "link": "200 Mb/s, 50 ms one-way", "microbatches": wan_cfg.microbatches,
                "microbatch_seqs": microbatch_seqs, "inflight_per_replica": cap, "tasks_per_delegate": tasks},
        "datacenter": {"schedule": "1f1b", "averaging": "dense", "codec": "dense bf16", "step_s": dc_step,
                       "utilisation": dc.utilisation, "bubble_fraction": dc.bubble_fraction,
                       "bubble_free_step_s": dc_floor,
                       "steps_to_target": float(PUBLIC_DENSE_STEPS), "time_to_target_s": dc_time,
                       "replica_bytes_per_step": list(dc_cfg.grad_sync_bytes), "link": "100 Gb/s, 0.01 ms"},
        "steps_multipliers": mult,
        "floors": floors,
        "slowdown_floor": {**{name: f["slowdown"] for name, f in floors.items()},
                           **{f"{name}_node_finish": f["slowdown_as_built"] for name, f in floors.items()}},
        "inputs": {"assumed": {"subspace_loss_ratio": ASSUMED_SUBSPACE_LOSS_RATIO, "async_loss_ratio": async_ratio,
                               "async_loss_source": async_source, "averaging_loss_ratio": avg_ratio,
                               "averaging_loss_source": avg_source, "device": DeviceAssumption().name,
                               "layout": f"{STAGES} stages x {REPLICAS} replicas, {STEP_SEQS} x 1024 tokens per step: "
                                         f"datacenter {MICROBATCHES} microbatches of {MICROBATCH_SEQS} sequences, "
                                         f"WAN {wan_cfg.microbatches} of {microbatch_seqs}"}},
        "stages": STAGES, "replicas": REPLICAS, "seed": seed,
    }


def _async_what_if(head: str, step_exchange: bool) -> str:
    """What an async WAN run models that the node does not run ('' for the node's async with replicated stages: head
    leader or delegated with one contribution per replica and step, `WanConfig.replicated_async`)."""
    if not step_exchange:
        return ("the async schedule with replicated stages without the step exchange (the node runs "
                "runtime.schedule = async with replicas only with runtime.replica_exchange = step: --contributions "
                "step with PowerSGD overlapped; this run is the earlier async model, each replica's update after its "
                "own last backward of a step, with no commit)")
    if head == "lanes":
        return ("the async schedule with no commit (--head lanes runs the earlier async model: each replica pushes "
                "its bundle after its own last backward of a step and updates once its peers' are in, with no "
                "COMMIT; the node's async is --head delegated or leader)")
    return ""


def _no_gain(ratio: float, source: str) -> tuple[float, str]:
    """A measured penalty below 1 (the WAN method beat its synchronous control in one run) counts as 1: the
    comparison credits no method with beating the datacenter's recipe."""
    if ratio >= 1.0:
        return ratio, source
    return 1.0, f"{source}; measured {ratio:.4f}, below 1: counted as 1 (no gain credited)"


def with_bench(calibration: dict[str, Any], bench: dict[str, Any] | None) -> dict[str, Any]:
    """The calibration with a wan benchmark record on top (tests, what-ifs)."""
    return calibration if bench is None else {**calibration, "wan_benchmark": bench}



