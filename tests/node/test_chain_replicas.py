"""Replicated stages on chain: receipts, audits and shares cover every replica's work.

Node processes on the embedded chain served over JSON-RPC: 2 stages x 2 replicas (`--replicated`), the async
schedule with a staleness bound of 1, PowerSGD int4 contributions once per replica and step, stage-0 work handed
to the second head replica as tasks. Every hop is signed by its sender and countersigned by the replica that
received it; attesters gather the receipts, settle each epoch's root, spot-check every checkable hop (audit rate
1.0: the head's or the delegate's activation, the tail replica's gradient) against the state each replica recorded
before each update (the stashed weights the hop ran on), and after the challenge window every node claims its
leaf and is minted shares for exactly the hops it computed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from contracts.chain import advance_time
from node.cli import parse_config
from node.model import training_section
from node.services.audit import attester_role, fetch_epoch_receipts, spot_check
from node.testing.swarm import NodeProcess, stop_nodes
from protocol.accounting import accounting_function_hash
from protocol.epoch import EpochContext, build_epoch
from protocol.modelspec import proposal_spec_hash
from protocol.receipts import BACKWARD, FORWARD, Domain, StaticKeyRegistry
from protocol.settlement import attest, claim_all, submit_epoch
from protocol.spotcheck import SpotCheckConfig
from sharding.config import PRESETS
from sharding.partition import partition
from tests.node.chain_swarm import Chain, assign, deployed_chain, register, wait_serving
from tests.node.replica_swarm import FAST, M, launch, records

pytestmark = [pytest.mark.network, pytest.mark.timeout(420)]

MODEL, CODEC = "tiny", "dense"
STAGES, STEPS, EPOCH_LENGTH, WINDOW_S = 2, 4, 2, 600
LAYOUT = [0, 0, 1, 1]  # the stage of each node: two head replicas, two tail replicas
REPLICATED = ["--model", MODEL, "--codec", CODEC, "--lr", "3e-3", "--schedule", "async", "--max-staleness", "1",
              "--replica-exchange", "step", "--replica-averaging", "powersgd", "--powersgd-rank", "2",
              "--powersgd-bits", "4"]


@pytest.fixture
def chain(tmp_path: Path) -> Iterator[Chain]:
    yield from deployed_chain(tmp_path)


def test_every_replica_is_credited_for_the_hops_it_computed_and_audited(chain: Chain, tmp_path: Path) -> None:
    c = chain
    # the proposal's training section is what these nodes run (replica averaging and schedule included)
    args = ["--stages", str(STAGES), "--steps", str(STEPS), *FAST, *REPLICATED]
    training = training_section(parse_config(args)).to_dict()
    assert training["replica_averaging"] == "powersgd" and training["pipeline_schedule"] == "async"
    model_id = c.client.propose_model(c.researcher, proposal_spec_hash(PRESETS[MODEL], training), "test:replicas",
                                      STAGES, accounting_function_hash(), EPOCH_LENGTH, WINDOW_S, 10_000, 0)
    c.client.start_training(c.researcher, model_id)
    idents = [register(c, tmp_path / f"node{i}") for i in range(len(LAYOUT))]
    for ident, stage in zip(idents, LAYOUT, strict=True):
        assign(c, ident, model_id, stage)
    # a generous replica timeout: no microbatch re-sent to another replica on a loaded machine, so that each
    # credited hop is the one attempt its sender computed; one microbatch in flight per sender and downstream
    # replica, so that the leader's second microbatch in flight goes to the other tail replica and, with both
    # full, stage-0 work to the delegate: every replica computes
    on_chain = [*REPLICATED, "--replica-timeout", "30", "--max-inflight", "1", "--rpc-url", c.rpc_url, "--deployment", str(c.deployment), "--model-id", str(model_id),
                "--linger"]
    nodes: list[NodeProcess] = []
    try:
        nodes = launch(tmp_path, LAYOUT, STEPS, common=on_chain)
        wait_serving(nodes, 300)
        address = [n.ready["address"] for n in nodes]
        peers = {a: n.ready["addrs"][0] for a, n in zip(address, nodes, strict=True)}
        # what each node computed, from its own progress records: (step, mb) pairs of its forwards at the head,
        # of its backwards at the tail
        computed = {a: {(s, int(mb)) for s, r in records(n).items() for mb, _ in r["computed"]}
                    for a, n in zip(address, nodes, strict=True)}
        assert all(computed.values()), computed  # every replica got work: the delegate and both tail replicas

        domain = Domain(c.client.chain_id, c.client.ledger.address)
        registry = StaticKeyRegistry(i.address for i in idents)
        model, specs = PRESETS[MODEL], tuple(partition(PRESETS[MODEL], STAGES))
        check = SpotCheckConfig(audit_rate=c.client.get_model(model_id).terms.audit_rate_bps / 10_000)
        results, checked = [], set()
        for epoch in range(STEPS // EPOCH_LENGTH):
            gathered = fetch_epoch_receipts(model_id, list(peers.values()), epoch, account=c.validators[0])
            result = build_epoch(gathered, EpochContext(model_id, epoch, model, specs, domain), registry)
            submit_epoch(c.client, c.validators[0], result, attest(domain, result, c.validators[:2]))
            results.append(result)
            steps = range(epoch * EPOCH_LENGTH, (epoch + 1) * EPOCH_LENGTH)
            # one credited hop per microbatch and direction, its sender the replica that computed it
            fwd = {(r.receipt.step, r.receipt.microbatch): r.receipt.sender for r in result.receipts
                   if r.receipt.direction == FORWARD}
            bwd = {(r.receipt.step, r.receipt.microbatch): r.receipt.sender for r in result.receipts
                   if r.receipt.direction == BACKWARD}
            assert set(fwd) == set(bwd) == {(s, mb) for s in steps for mb in range(M)}
            for a in address:
                stage = LAYOUT[address.index(a)]
                sent = {k for k, who in (fwd if stage == 0 else bwd).items() if who == a}
                assert sent == {k for k in computed[a] if k[0] in steps}, (a, stage, sent, computed[a])
            for v in c.validators:  # three attesters, each auditing the stage the published rule gives it
                report = spot_check(model_id, peers, result.receipts, model, specs, CODEC, M, check,
                                    role=attester_role(c.client, v, model_id, epoch))
                assert not report.errors and not report.evidence, report.errors
                assert all(r.passed for r in report.results) and len(report.results) == report.checked
                checked |= {(r.key, r.node) for r in report.results}
        # audit rate 1.0: every checkable hop (the head's activation, the tail's gradient) was re-executed, against
        # the replica that computed it
        assert checked == {(r.receipt.key, r.receipt.sender) for res in results for r in res.receipts}
        assert len(checked) == STEPS * M * 2
        advance_time(c.w3, WINDOW_S + 1)
        for result in results:
            claim_all(c.client, c.validators[0], result)
        for a in address:  # (a replica may have computed nothing in one of the epochs: no leaf there)
            assert c.client.balance_of(model_id, a) == sum(r.totals.get(a, 0) for r in results) > 0
    finally:
        stop_nodes(nodes)
