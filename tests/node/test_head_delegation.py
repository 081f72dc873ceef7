"""Delegated head work (`node.replicas.delegation`): with the step exchange the leading head replica hands
microbatches to the other head replicas, which compute stage 0 and route them on.

Over real hosts: a link is refused for another model (counted against the dialler) or by a head replica that does
not see the dialler lead (not counted: its own view), and a malformed, out-of-range, unexpected or oversized
message, or a DONE for a task the link never carried, ends the link with an error naming it, counted against the
sender. With real node processes: a leader killed in the middle of a step is taken over by the head replica it
delegated to, which generates the step again in its own term, and a delegate lost after its DONE costs a rollback;
every microbatch is applied exactly once per stage (per generation). `--stage auto` counts the head stage once
head replicas work."""

from __future__ import annotations

import math
import signal
from typing import Any

import pytest
import trio

from node.errors import DelegationError
from node.net import msgio
from node.net.discovery import Announcement
from node.net.host import full_addrs
from node.net.peerscore import PeerGuardConfig
from node.replicas.delegation import DelegateLimits, DelegateLink, DelegationService, Task, open_link
from node.replicas.heads import attempt_base
from node.replicas.runner import choose_replica_stage
from tests.node.conftest import running_host
from tests.node.replica_swarm import (
    STEP_ROLLBACK,
    M,
    check_exactly_once,
    check_one_takeover,
    check_rollback,
    records,
    run_to_end,
)

FULL = {0: 0, 1: 0, 2: 0, 3: 0}  # a commit of a 4-microbatch step


async def _until(cond: Any, what: str) -> None:
    """Wait (at most 10 s) until `cond()` holds."""
    with trio.move_on_after(10) as scope:
        while not cond():
            await trio.sleep(0.01)
    assert not scope.cancelled_caught, f"timed out waiting for {what}"


def test_delegation_links_refuse_bad_input_and_count_it_against_the_sender() -> None:
    limits = DelegateLimits(max_message_bytes=4096, guard=PeerGuardConfig(ban_score=-100.0))

    async def main() -> None:
        async with running_host(71) as (server, _), running_host(72) as (client, _):
            taken: list[DelegateLink] = []
            why = ["peer x is not the leader of stage 0 this replica sees announced (none)"]

            def accept(link: DelegateLink) -> str:
                if why[0]:
                    return why[0]
                taken.append(link)
                return ""

            svc = DelegationService(server, "aa", accept, lambda: 4, limits=limits)
            addr = full_addrs(server)[0]
            me = client.get_id().pretty()
            with pytest.raises(DelegationError, match="another model"):
                await open_link(client, addr, "bb", 4, limits, 5.0)
            assert sum(svc.gate.refused.values()) == 1 and svc.gate.scores.score(me) < 0  # counted against it
            score = svc.gate.scores.score(me)
            with pytest.raises(DelegationError, match="is not the leader of stage 0"):
                await open_link(client, addr, "aa", 4, limits, 5.0)
            # the delegate's own view (an announcement on its way): refused, not counted against the dialler
            assert sum(svc.gate.refused.values()) == 1 and svc.gate.scores.score(me) == score
            why[0] = ""
            refused: list[tuple[str, str]] = []

            async with trio.open_nursery() as n:
                async def fresh() -> tuple[DelegateLink, DelegateLink]:
                    had = len(taken)
                    link = await open_link(client, addr, "aa", 4, limits, 5.0, lambda p, r: refused.append((p, r)))
                    n.start_soon(link.run_reader)
                    assert len(taken) == had + 1  # the delegate took it before it answered
                    return link, taken[-1]

                # the good path: a task and the commit reach the delegate; its DONE reaches the leader
                lead, dele = await fresh()
                await lead.send_task(0, 1, 5)
                await lead.send_commit(0, FULL)
                await _until(lambda: dele.inbox and dele.commits, "the task and the commit")
                assert dele.take() == [Task(0, 1, 5)] and dele.commits[0]["commit"] == FULL
                await dele.send_done(0, 1, 5)
                await _until(lambda: lead.inbox, "the done")
                assert lead.take() == [Task(0, 1, 5)] and not lead.sent
                # a DONE for a task the link never carried: the leader's end refuses it and counts it
                await dele.send_done(0, 2, 5)
                await _until(lambda: lead.failure is not None, "the leader's refusal")
                assert "a task this link never carried" in str(lead.failure) and refused == [(lead.peer, "delegation_malformed")]
                before = sum(svc.gate.refused.values())
                bad: list[tuple[Any, str]] = [
                    ({"op": "task", "step": 0, "mb": 4, "attempt": 0}, "'mb'"),  # out of the step's 4 microbatches
                    ({"op": "task", "step": -1, "mb": 0, "attempt": 0}, "'step'"),
                    ({"op": "task", "step": 0, "mb": 0, "attempt": 1 << 16}, "'attempt'"),
                    ({"op": "done", "step": 0, "mb": 0, "attempt": 0}, "unexpected op 'done'"),  # a leader sends none
                    ({"op": "commit", "step": 0, "commit": [[0, 0], [0, 1], [2, 0], [3, 0]]}, "each microbatch once"),
                    ({"op": "commit", "step": 0, "commit": [[0, 0]]}, "every one of the step's 4 microbatches"),
                    ([1, 2], "must be an object"),
                    ({"op": "task", "pad": "x" * 5000}, "exceeds the limit of 4096"),
                ]
                for i, (msg, what) in enumerate(bad, start=1):
                    lead, dele = await fresh()
                    await msgio.write_json(lead.stream, msg)
                    await _until(lambda d=dele: d.failure is not None, what)
                    assert what in str(dele.failure), (what, dele.failure)
                    assert sum(svc.gate.refused.values()) == before + i  # counted against the sender
                    assert not dele.inbox and not dele.commits  # nothing of it was taken
                n.cancel_scope.cancel()

    trio.run(main)


@pytest.mark.network
@pytest.mark.timeout(600)
def test_a_leader_killed_mid_step_is_taken_over_by_its_delegate_exactly_once(tmp_path) -> None:
    """The leader hands microbatches to the standby head; it is SIGKILLed right after its 6th commit (in step 1,
    before that step's COMMIT went out). The standby takes over in term 1, generates the whole step again in its
    own attempts (the tasks it had computed for the dead leader are never committed), and the swarm trains to the
    end, every microbatch applied once per stage."""
    steps = 6
    flags = ["--replica-exchange", "step", "--no-replica-timeout", "120"]
    nodes, codes = run_to_end(tmp_path, [0, 0, 1, 2], steps, common=flags,
                              extra={0: ["--replicas-debug-exit-after-forwards", "6"]}, timeout_s=420)
    lead, standby, mid, tail = nodes
    assert codes == [-signal.SIGKILL, 0, 0, 0], codes
    lr, sr = records(lead), records(standby)
    assert sum(r["delegated"] for r in lr.values()) >= 1  # the leader had handed microbatches over
    assert sum(len(r["mine"]) for s, r in sr.items() if s in lr) == sum(r["delegated"] for r in lr.values())
    s = check_one_takeover(lead, standby)
    for t in range(s, steps):
        assert sr[t]["head_term"] == 1 and sorted(mb for mb, _ in sr[t]["mine"]) == list(range(M))
        assert all(a >= attempt_base(1) for _, a in sr[t]["applied"])
    for stage_nodes in ([lead, standby], [mid], [tail]):
        check_exactly_once(stage_nodes, range(steps))
    losses = [records(tail)[t]["loss"] for t in range(steps)]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


@pytest.mark.network
@pytest.mark.timeout(600)
def test_a_delegate_lost_after_its_done_costs_the_head_stage_a_rollback_not_a_wrong_update(tmp_path) -> None:
    """The standby head dies right after its 5th DONE (in step 1 or 2: it gets 2 or 3 of a step's 4 microbatches,
    and a step 0 lost would leave no step every stage holds; the leader committed microbatches whose dense
    gradients only the delegate held, its bundle not yet out). The leader never applies that step without them:
    it finds stage 0's newer state lost and the swarm rolls back to a step every stage holds (a checkpoint every
    step), then trains to the end with the leader computing stage 0 alone, exactly once per generation."""
    steps = 6
    nodes, codes = run_to_end(tmp_path, [0, 0, 1, 2], steps, common=STEP_ROLLBACK,
                              extra={0: ["--no-replica-timeout", "8"], 1: ["--replicas-debug-exit-after-forwards", "5"]},
                              timeout_s=480)
    lead, standby, mid, tail = nodes
    assert codes[0] == 0 and codes[2:] == [0, 0] and codes[1] == -signal.SIGKILL, codes
    lost_step = max(records(standby), default=-1) + 1  # the step the delegate died in
    assert lost_step >= 1
    assert lost_step not in records(lead, gen=0)  # the leader never applied it without the lost gradients
    gen1, rolled_to = check_rollback([lead, mid, tail], lost_step, steps)
    check_exactly_once([lead, standby], list(range(rolled_to)), gen=0)
    assert all(math.isfinite(gen1[2][t]["loss"]) for t in range(rolled_to, steps))


def test_auto_placement_counts_the_head_stage_once_head_replicas_work() -> None:
    """`--stage auto`: stage 0 first; then, where head replicas add throughput (delegation), the least-served stage
    of all, else the least-served of the others (a standby head computes nothing)."""
    def ann(pid: str, stage: int, capacity: int = 1) -> Announcement:
        return Announcement(pid, (), "aa", 3, stage, capacity)

    assert choose_replica_stage([], "aa", 3, head_works=True) == 0
    served = [ann("a", 0), ann("b", 1), ann("c", 2)]
    assert choose_replica_stage(served, "aa", 3, head_works=True) == 0  # ties: the lowest stage, the head
    assert choose_replica_stage(served, "aa", 3, head_works=False) == 1  # never a standby head by itself
    heavy_head = [ann("a", 0, 4), ann("b", 1), ann("c", 2, 2)]
    assert choose_replica_stage(heavy_head, "aa", 3, head_works=True) == 1
    assert choose_replica_stage([*heavy_head, ann("x", 0, 9)], "bb", 3, head_works=True) == 0  # another model's
