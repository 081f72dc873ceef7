"""On the embedded chain: 3 stages train 2 epochs, roots settle, every node claims shares equal to its units;
an inflating node gets only co-signed work; a lazy node is caught at audit rate 1.0 and slashed."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount

from contracts import chain as chain_mod
from contracts.client import ProtocolContracts
from contracts.config import ChainConfig
from contracts.deploy import DeployParams, deploy_all
from contracts.errors import ContractsError
from protocol.accounting import accounting_function_hash, compute_units
from protocol.epoch import EpochContext, build_epoch
from protocol.errors import EpochError, SettlementError
from protocol.localswarm import Behaviour, LocalSwarm, LocalSwarmConfig
from protocol.payments import ChainKeyRegistry
from protocol.settlement import (
    attest,
    attest_fraud,
    claim_all,
    ledger_domain,
    submit_epoch,
    submit_fraud,
    verify_onchain_epoch,
)
from protocol.spotcheck import SpotCheckConfig, fraud_evidence
from sharding.config import ModelConfig

MODEL = ModelConfig(vocab_size=256, seq_len=16, d_model=32, n_layers=3, n_heads=4)
WINDOW = 3600
FAST = ChainConfig(fixed_gas=3_000_000)


@dataclass
class Chain:
    pc: ProtocolContracts
    validators: list[LocalAccount]
    operators: list[LocalAccount]
    nodes: list[LocalAccount]
    payer: LocalAccount
    model_id: int


def _chain(audit_bps: int = 10_000) -> Chain:
    w3 = chain_mod.connect(None, FAST)
    acc = chain_mod.test_accounts(w3)
    dep = deploy_all(w3, acc[0], [v.address for v in acc[1:4]], 2,
                     DeployParams(stake_per_unit_wei=10**12, unbonding_delay_s=100, slash_bps=5000), FAST)
    pc = ProtocolContracts(w3, dep, FAST)
    model_id = pc.propose_model(acc[4], MODEL.spec_hash(), "test", 3, accounting_function_hash(), 2, WINDOW,
                                audit_bps, 10**12)
    pc.start_training(acc[4], model_id)
    nodes = [Account.from_key((1000 + i).to_bytes(32, "big")) for i in range(3)]
    for op, key in zip(acc[5:8], nodes, strict=True):
        pc.register_node(op, key, 10)
    return Chain(pc, acc[1:4], acc[5:8], nodes, acc[8], model_id)


def _swarm(chain: Chain, tmp_path, behaviours=None) -> LocalSwarm:
    cfg = LocalSwarmConfig(MODEL, num_stages=3, microbatches=2, microbatch_size=2, epoch_length=2,
                           model_id=chain.model_id)
    return LocalSwarm(cfg, chain.nodes, ledger_domain(chain.pc), ChainKeyRegistry(chain.pc), tmp_path, behaviours)


def _context(chain: Chain, swarm: LocalSwarm, epoch: int) -> EpochContext:
    return EpochContext(chain.model_id, epoch, MODEL, tuple(swarm.specs), ledger_domain(chain.pc))


@pytest.mark.timeout(300)
def test_two_epochs_settle_and_shares_equal_units(tmp_path):
    chain = _chain()
    # stage 0 reports 10x its work by fabricating receipts no neighbour countersigned
    swarm = _swarm(chain, tmp_path, {0: Behaviour(inflate=10)})
    registry = ChainKeyRegistry(chain.pc)
    results = []
    for epoch in (0, 1):
        swarm.train_epoch(epoch)
        result = build_epoch(swarm.gathered(epoch), _context(chain, swarm, epoch), registry)
        submit_epoch(chain.pc, chain.payer, result, attest(ledger_domain(chain.pc), result, chain.validators[:2]))
        # anyone can recompute the root from the published file and compare it with the chain
        again = verify_onchain_epoch(chain.pc, chain.model_id, epoch, result.receipts_file, registry)
        assert again.totals == result.totals
        results.append(result)
    hops_per_epoch = 2 * 2  # steps per epoch x microbatches
    for k, key in enumerate(chain.nodes):
        expected = hops_per_epoch * compute_units(MODEL, swarm.specs[k], swarm.tokens_per_hop)
        assert [r.totals[key.address] for r in results] == [expected, expected]
    # the inflating node claimed 10x as many receipts as it was credited for
    assert swarm.self_reported[chain.nodes[0].address] == 10 * (2 * hops_per_epoch)
    assert all(len(r.rejected) == 9 * hops_per_epoch for r in results)

    # a claim before the challenge window closes reverts; after it, every node claims
    with pytest.raises(SettlementError):
        claim_all(chain.pc, chain.payer, results[0])
    chain.pc.advance_time(WINDOW)
    for r in results:
        claim_all(chain.pc, chain.payer, r)
    for k, op in enumerate(chain.operators):
        assert chain.pc.balance_of(chain.model_id, op.address) == sum(r.totals[chain.nodes[k].address] for r in results)
    assert chain.pc.total_supply(chain.model_id) == sum(r.total_units for r in results)

    # the contract's MerkleProof rejects a proof from another epoch, and a second claim
    node = chain.nodes[1].address
    leaf = results[0].tree.leaf_for(node)
    with pytest.raises(ContractsError):
        chain.pc.claim_leaf(chain.payer, chain.model_id, 1, node, leaf.units, results[0].tree.proof(node))
    with pytest.raises(ContractsError):
        chain.pc.claim_leaf(chain.payer, chain.model_id, 0, node, leaf.units, results[0].tree.proof(node))


@pytest.mark.timeout(300)
def test_lazy_node_caught_at_full_audit_rate_and_slashed(tmp_path):
    chain = _chain()
    swarm = _swarm(chain, tmp_path, {1: Behaviour(random_fraction=1.0)})
    registry = ChainKeyRegistry(chain.pc)
    swarm.train_epoch(0)
    result = build_epoch(swarm.gathered(0), _context(chain, swarm, 0), registry)
    domain = ledger_domain(chain.pc)
    submit_epoch(chain.pc, chain.payer, result, attest(domain, result, chain.validators[:2]))

    check = SpotCheckConfig(audit_rate=1.0, seed=3)
    results = swarm.audit(swarm.gathered(0), check)
    failed = [r for r in results if not r.passed]
    assert {r.node for r in failed} == {chain.nodes[1].address}
    assert len(failed) == len(swarm.bad_hops) == 4
    # the honest neighbours pass, including the tail re-executed on the garbage it received
    assert all(r.passed for r in results if r.node != chain.nodes[1].address)

    lazy = chain.nodes[1].address
    bad = next(s for s in swarm.gathered(0) if s.receipt.key == failed[0].key)
    evidence = fraud_evidence(swarm.hop_input(bad), failed[0], check)
    stake_before = chain.pc.node_info(lazy).stake_wei
    with pytest.raises(SettlementError):  # one signature is below the quorum of 2
        submit_fraud(chain.pc, chain.payer, evidence, attest_fraud(domain, evidence, chain.validators[:1]))
    submit_fraud(chain.pc, chain.payer, evidence, attest_fraud(domain, evidence, chain.validators[:2]))
    assert chain.pc.is_leaf_voided(chain.model_id, 0, lazy)
    assert chain.pc.node_info(lazy).stake_wei == stake_before // 2

    chain.pc.advance_time(WINDOW)
    claimed = claim_all(chain.pc, chain.payer, result)
    assert lazy not in claimed and set(claimed) == {chain.nodes[0].address, chain.nodes[2].address}
    assert chain.pc.balance_of(chain.model_id, chain.operators[1].address) == 0
    with pytest.raises(ContractsError):
        leaf = result.tree.leaf_for(lazy)
        chain.pc.claim_leaf(chain.payer, chain.model_id, 0, lazy, leaf.units, result.tree.proof(lazy))


def test_verify_rejects_file_of_other_epoch_and_unknown_epoch(tmp_path):
    chain = _chain()
    swarm = _swarm(chain, tmp_path)
    registry = ChainKeyRegistry(chain.pc)
    swarm.train_epoch(0)
    result = build_epoch(swarm.gathered(0), _context(chain, swarm, 0), registry)
    with pytest.raises(EpochError) as err:
        verify_onchain_epoch(chain.pc, chain.model_id, 0, result.receipts_file)
    assert err.value.field == "epoch"
    submit_epoch(chain.pc, chain.payer, result, attest(ledger_domain(chain.pc), result, chain.validators[:2]))
    swarm.train_epoch(1)
    other = build_epoch(swarm.gathered(1), _context(chain, swarm, 1), registry)
    with pytest.raises(EpochError) as err:
        verify_onchain_epoch(chain.pc, chain.model_id, 0, other.receipts_file)
    assert err.value.field == "receiptsHash"
    # a root signed by an attester without the validator role is refused by the contract
    with pytest.raises(SettlementError):
        submit_epoch(chain.pc, chain.payer, other, attest(ledger_domain(chain.pc), other, [chain.payer, chain.validators[0]]))
    swarm.close()
