"""replica_exchange = "step": one contribution per replica and step (the sum of the committed microbatches whose
gradient the previous stage took from it), instead of one per microbatch.

The store's bundle rules and the combination's exactness are checked here; a bundle with malformed or overlapping
pairs, or pushed at a stage that exchanges per microbatch, is refused over real hosts and counted against the
sender, the store intact; and a swarm of real node processes (a standby head, two middle replicas) applies every
microbatch exactly once per stage, keeps the replicas of each stage bit-identical and moves fewer averaging bytes
than one contribution per microbatch would."""

from __future__ import annotations

import math

import pytest
import torch
import trio

from node.config import NodeConfig
from node.errors import AveragingError
from node.net.host import full_addrs
from node.net.peerscore import PeerGuardConfig
from node.replicas.averaging import ContributionCodec, ContributionStore, Held, combine, push
from pmn.spec import ModelProposal, TrainingRecipe, proposal_from_dict
from sharding import PRESETS, OptimConfig, build_stage, partition
from tests.node.avg_pushes import serve
from tests.node.conftest import running_host
from tests.node.eval_check import checkpoint_val_loss
from tests.node.replica_swarm import (
    STEP_ROLLBACK,
    B,
    M,
    check_exactly_once,
    check_identical_weights,
    check_rollback,
    records,
    run_to_end,
)

STEPS = 6


def test_bundles_cover_the_commit_exactly_once_and_combine_to_the_sum() -> None:
    """Two bundles (3 microbatches and 1) cover a 4-microbatch commit; their mean weighted by count is the sum of
    the four gradients, as one contribution per microbatch gives; a bundle with an uncommitted attempt does not
    count, and one overlapping a held bundle, with repeated or unsorted microbatches or the wrong loss count is
    refused with nothing stored."""
    torch.manual_seed(0)
    grads = [torch.randn(10) / 4 for _ in range(4)]  # each already scaled by 1/M
    store = ContributionStore(10, exchange="step")
    store.commit(3, {0: 0, 1: 5, 2: 0, 3: 0})
    store.add_bundle(3, [(0, 0), (1, 5), (2, 0)], grads[0] + grads[1] + grads[2], [1.0, 2.0, 3.0])
    assert store.missing(3) == [3]
    store.add_bundle(3, [(3, 1)], grads[3] * 9)  # attempt 1 of mb 3 is not committed: it does not count
    assert store.missing(3) == [3]
    store.add_bundle(3, [(3, 0)], grads[3], [4.0])
    assert store.missing(3) == []
    held = store.committed(3)
    assert [h.covers for h in held] == [((0, 0), (1, 5), (2, 0)), ((3, 0),)]
    assert [x for h in held for x in h.losses] == [1.0, 2.0, 3.0, 4.0]
    out = combine([h.vec for h in held], 4, counts=[len(h.covers) for h in held])
    total = torch.stack(grads).sum(dim=0)
    assert torch.allclose(out, total, atol=1e-6)
    assert torch.allclose(combine(grads, 4), total, atol=1e-6)  # per microbatch: the same update
    before = {k: v.clone() for k, v in store.vecs[3].items()}
    for covers, losses, why in (([(2, 0), (3, 0)], None, "overlaps"), ([(1, 0), (1, 1)], None, "distinct"),
                                ([(2, 0), (1, 5)], None, "distinct"), ([(5, 0)], [1.0, 2.0], "losses"),
                                ([], None, "covers 1"), ([(1, -1)], None, "integers")):
        with pytest.raises(AveragingError, match=why):
            store.add_bundle(3, covers, torch.zeros(10), losses)
    assert store.vecs[3].keys() == before.keys()
    assert all(torch.equal(store.vecs[3][k], before[k]) for k in before)
    with pytest.raises(AveragingError, match="one contribution per microbatch"):
        ContributionStore(10).add_bundle(3, [(0, 0)], torch.zeros(10))


def test_bad_bundles_are_refused_over_real_hosts_and_the_store_is_kept() -> None:
    """A server whose stage exchanges per step takes a good bundle (and the commit it claims, kept under its sender)
    and refuses, counting each against the sender: a bundle overlapping it, one whose first pair is not its
    mb/attempt, one with a loss per pair missing, one claiming a commit without its own pairs; a
    server whose stage exchanges per microbatch refuses any bundle. Nothing of a refused push is stored."""
    codec = ContributionCodec([(8,)])
    good = torch.arange(8, dtype=torch.float32)
    guard = PeerGuardConfig(ban_score=-100.0, max_streams_per_peer=16)

    async def main() -> None:
        for exchange in ("step", "microbatch"):
            store = ContributionStore(codec.words, codec, exchange=exchange)
            async with running_host(61) as (server, _), running_host(62) as (client, _):
                svc = serve(server, store, guard)
                addr = full_addrs(server)[0]
                me = client.get_id().pretty()
                bundles = [Held(((0, 0), (1, 0)), good, (None, None))]
                cases = [(Held(((1, 0), (2, 0)), good, (None, None)), 1, 0, "overlaps"),
                         (Held(((3, 0), (4, 0)), good, (None, None)), 2, 0, "first pair"),
                         (Held(((5, 0), (6, 0)), good, (None,)), 5, 0, "losses")]
                claims: list[dict[int, int] | None] = [None, None, None]
                if exchange == "step":  # a leading head's bundle claims the step's whole commit
                    await push(client, addr, "aa", 0, 5, 0, 0, good, None, 5.0, bundle=bundles[0],
                               claim={0: 0, 1: 0, 2: 0, 3: 0})
                    assert store.claims[5] == {me: {0: 0, 1: 0, 2: 0, 3: 0}}
                    cases.append((Held(((7, 0), (8, 0)), good, (None, None)), 7, 0, "in the commit it claims"))
                    claims.append({7: 0, 8: 1})  # a claim that does not hold the bundle's own pairs
                else:
                    cases, claims = [(bundles[0], 0, 0, "per microbatch")], [None]
                for i, ((h, mb, a, why), claim) in enumerate(zip(cases, claims, strict=True), start=1):
                    before = svc.gate.scores.score(me)
                    with pytest.raises(Exception) as info:
                        await push(client, addr, "aa", 0, 5, mb, a, h.vec, None, 5.0, bundle=h, claim=claim)
                    assert isinstance(info.value, AveragingError) and why in str(info.value) or \
                        not isinstance(info.value, AveragingError)  # the server's reset may overtake its message
                    assert svc.gate.scores.score(me) < before
                    assert sum(svc.gate.refused.values()) == i
                assert list(store.vecs.get(5, {})) == ([(0, 0)] if exchange == "step" else [])
                if exchange == "step":
                    assert store.covers[5][(0, 0)] == ((0, 0), (1, 0))
                    assert torch.equal(store.vecs[5][(0, 0)], good)
                    assert store.claims[5] == {me: {0: 0, 1: 0, 2: 0, 3: 0}}  # the refused claim was not kept

    trio.run(main)


def test_the_exchange_is_a_spec_option_that_keeps_old_hashes() -> None:
    old = ModelProposal(PRESETS["tiny"], TrainingRecipe())
    assert b"replica_exchange" not in old.canonical_json()
    same = proposal_from_dict({"model": {"preset": "tiny"}, "training": {"replica_exchange": "microbatch"}})
    assert same.content_hash() == old.content_hash()
    step = proposal_from_dict({"model": {"preset": "tiny"}, "training": {"replica_exchange": "step"}})
    assert b'"replica_exchange":"step"' in step.canonical_json() and step.content_hash() != old.content_hash()
    with pytest.raises(Exception, match="replica_exchange"):
        proposal_from_dict({"model": {"preset": "tiny"}, "training": {"replica_exchange": "replica"}})
    cfg = NodeConfig()
    cfg.runtime.replica_exchange = "replica"
    with pytest.raises(ValueError, match="runtime.replica_exchange"):
        cfg.validate()


@pytest.mark.network
@pytest.mark.timeout(540)
def test_a_swarm_exchanging_per_step_applies_every_microbatch_once_and_keeps_replicas_identical(tmp_path) -> None:
    """A leading and a standby head, two middle replicas and a tail, PowerSGD int4 contributions, one per replica
    and step: every step applies each microbatch exactly once per stage, no committed microbatch is claimed by two
    replicas, the two replicas of each replicated stage end bit-identical, the loss falls, and the middle stage's
    averaging server moved less than one contribution per microbatch would (the per-microbatch exchange pushes
    each of the M contributions of a step to the other replica). The leading head records the validation loss of
    every third step's weights."""
    flags = ["--replica-averaging", "powersgd", "--powersgd-rank", "2", "--powersgd-bits", "4",
             "--replica-exchange", "step", "--no-replica-timeout", "120", "--eval-every", "3", "--eval-batches", "2"]
    nodes, codes = run_to_end(tmp_path, [0, 0, 1, 1, 2], STEPS, common=flags, timeout_s=420)
    assert codes == [0] * 5
    head_a, head_b, mid_a, mid_b, tail = nodes
    check_exactly_once([mid_a, mid_b], range(STEPS))
    check_exactly_once([head_a, head_b], range(STEPS))
    losses = [records(tail)[s]["loss"] for s in range(STEPS)]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    check_identical_weights([[head_a, head_b], [mid_a, mid_b]])
    # a replica's bundle holds the committed microbatches it computed: over the run both middle replicas had work,
    # and so did the standby head, which the leader handed microbatches to (`node.replicas.delegation`)
    assert all(any(r["mine"] for r in records(n).values()) for n in (mid_a, mid_b, head_b))
    assert sum(r["delegated"] for r in records(head_a).values()) == sum(len(r["mine"]) for r in records(head_b).values())
    assert all(r["head_term"] == -1 and r["delegated"] == 0 for r in records(head_b).values())
    codec = ContributionCodec.for_module(build_stage(PRESETS["tiny"], partition(PRESETS["tiny"], 3)[1]),
                                         "powersgd", 2, bits=4)
    moved = sum(records(n)[STEPS - 1]["avg_wire_bytes"] for n in (mid_a, mid_b))
    assert moved >= 4 * codec.words  # at least one bundle crossed
    assert moved < STEPS * M * 4 * codec.words
    # evaluated after steps 2 and 5 on /pmn/eval through one replica per stage (node.pipeline.evaluation): the
    # leading head recorded both, the last in the run's last record, and it is the final weights' validation loss
    lead = records(head_a)
    evals = {int(s): v for r in lead.values() for s, v in r.get("val_losses", [])}
    assert set(evals) == {2, 5} and lead[STEPS - 1]["val_step"] == 5, lead
    assert sum(len(r.get("val_losses", [])) for r in lead.values()) == 2
    assert all("val_loss" not in r for n in nodes[1:] for r in records(n).values())  # only the leader records it
    assert evals[5] == pytest.approx(checkpoint_val_loss([head_a.data_dir, mid_a.data_dir, tail.data_dir],
                                                         OptimConfig(), B, 2), abs=1e-4)
    # each push the middle servers stored is counted with its bytes: one bundle of the codec's size plus framing
    for n in (mid_a, mid_b):
        last = records(n)[STEPS - 1]
        assert 0 < last["avg_pushes_in"] <= STEPS and last["avg_push_bytes"] <= last["avg_wire_bytes"], last
        per_push = last["avg_push_bytes"] / last["avg_pushes_in"]
        assert 4 * codec.words < per_push < 4 * codec.words + 4096, (per_push, 4 * codec.words)


@pytest.mark.network
@pytest.mark.timeout(900)
def test_a_replica_lost_before_its_step_bundle_costs_a_rollback_not_a_wrong_update(tmp_path) -> None:
    """One contribution per replica and step trades churn tolerance for bytes: a middle replica that dies after
    sending gradients upstream but before its step's bundle leaves takes committed microbatches of its stage with
    it. Its stage peer never applies the step without them: it finds the stage's newer state lost and the swarm
    rolls back to the step every stage holds (a checkpoint every step here), then trains to the end with the
    survivor, every microbatch applied once per stage in each generation. The tail, the only replica of its
    stage, owns the pairs the dead replica routed to it without waiting for its verdict: only the middle stage
    lost anything."""
    steps = 8
    # mid_a dies right after its 7th gradient upstream (about 2 a step: in step 3, its bundle not yet out); mid_b
    # declares the state lost 8 s after the commit's contributions failed to come
    nodes, codes = run_to_end(tmp_path, [0, 1, 1, 2], steps, common=STEP_ROLLBACK,
                              extra={1: ["--replicas-debug-exit-after-forwards", "7"], 2: ["--no-replica-timeout", "8"]},
                              timeout_s=600)
    head, mid_a, mid_b, tail = nodes
    assert codes[0] == 0 and codes[2:] == [0, 0] and codes[1] != 0  # mid_a was killed by its test hook
    lost_step = max(records(mid_a)) + 1  # the step mid_a died in
    gen1, rolled_to = check_rollback([head, mid_b, tail], lost_step, steps)
    check_exactly_once([mid_a, mid_b], list(range(rolled_to)), gen=0)
    # the survivor never applied the step whose bundle was lost in generation 0
    assert lost_step not in records(mid_b, gen=0)
    losses = [gen1[2][s]["loss"] for s in range(rolled_to, steps)]
    assert all(math.isfinite(x) for x in losses)
