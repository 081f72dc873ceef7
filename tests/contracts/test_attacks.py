"""The attacks of issue 15, replayed through the ABI: each test failed on the contracts before the fix.

1. A voided root resubmitted with its own quorum signatures; a root verdict replayed against the replacement.
2. A node that escapes its slash by withdrawing inside a challenge window.
3. A tiny first supply + one deposit freezing every later mint and transfer.
4. Proposal terms whose arithmetic overflows (challengeWindow = 2^64 - 1).
"""

from __future__ import annotations

import pytest

from contracts.errors import ContractRevertError

from .conftest import WINDOW, Env, make_env, rich_chain

RH = b"\x33" * 32


def _revert(fn, *args) -> ContractRevertError:
    with pytest.raises(ContractRevertError) as err:
        fn(*args)
    return err.value


# -- 1. a voided root comes back ------------------------------------------------------------------------------


def test_voided_root_is_burned_and_honest_replacement_stands(env: Env) -> None:
    mid = env.propose()
    node = env.new_node(env.operators[0]).address
    inflated = env.submit(mid, 0, {node: 1_000_000})
    inflated_sigs = env.root_signatures(inflated)
    verdict = env.void_root(mid, 0)
    assert env.pc.is_root_voided(mid, 0, inflated.root)
    before = env.pc.epoch_info(mid, 0)

    # the attacker replays the voided root with its own quorum signatures: refused, nothing stored
    err = _revert(env.pc.submit_epoch_root, env.payer, mid, 0, inflated.root, inflated.total_units, RH, inflated_sigs)
    assert err.error_name == "ContributionLedgerRootWasVoided"
    assert err.error_args == {"modelId": mid, "epoch": 0, "root": inflated.root}
    assert env.pc.epoch_info(mid, 0) == before

    # the attesters' honest replacement is accepted ...
    honest = env.submit(mid, 0, {node: 10})
    # ... and the verdict that voided the first root cannot be replayed against it
    err = _revert(env.pc.challenge_root, env.payer, mid, 0, b"\xab" * 32, verdict)
    assert err.error_name.startswith("ValidatorQuorum")
    assert not env.pc.epoch_info(mid, 0).voided
    env.pc.advance_time(WINDOW)
    err = _revert(env.pc.claim_leaf, env.payer, mid, 0, node, 1_000_000, inflated.proof(node))
    assert err.error_name == "ContributionLedgerInvalidProof"
    env.pc.claim_leaf(env.payer, mid, 0, node, 10, honest.proof(node))
    assert env.pc.total_supply(mid) == 10


def test_voided_root_stays_burned_after_its_replacement_is_voided_too(env: Env) -> None:
    mid = env.propose()
    node = env.new_node(env.operators[0]).address
    first = env.submit(mid, 0, {node: 7})
    env.void_root(mid, 0)
    second = env.submit(mid, 0, {node: 8})
    env.void_root(mid, 0, b"\xac" * 32)
    for tree in (first, second):
        err = _revert(env.pc.submit_epoch_root, env.payer, mid, 0, tree.root, tree.total_units, RH,
                      env.root_signatures(tree))
        assert err.error_name == "ContributionLedgerRootWasVoided"
    third = env.submit(mid, 0, {node: 9})
    env.pc.advance_time(WINDOW)
    env.pc.claim_leaf(env.payer, mid, 0, node, 9, third.proof(node))
    assert env.pc.total_supply(mid) == 9


# -- 2. a node escapes its slash --------------------------------------------------------------------------------


def test_node_withdrawing_inside_the_window_never_mints(env: Env) -> None:
    """Issue scenario: unbonding ends inside the root's window (delay 100 s < window 3600 s)."""
    mid = env.propose()
    op = env.operators[0]
    cheat = env.new_node(op)
    honest = env.new_node(env.operators[1]).address
    env.pc.begin_unbond(op, cheat.address)
    env.pc.advance_time(50)
    tree = env.submit(mid, 0, {cheat.address: 1_000_000, honest: 5})
    env.pc.advance_time(60)
    env.pc.withdraw_stake(op, cheat.address)  # inside the window: the stake is gone
    env.condemn_leaf(mid, 0, cheat.address)
    assert env.pc.node_info(cheat.address).stake_wei == 0
    env.pc.advance_time(WINDOW)
    # even had no verdict come, its leaf could not mint: the stake did not back the window
    other = env.submit(mid, 1, {cheat.address: 3})
    env.pc.advance_time(WINDOW)
    err = _revert(env.pc.claim_leaf, env.payer, mid, 1, cheat.address, 3, other.proof(cheat.address))
    assert err.error_name == "ContributionLedgerStakeNotLocked"
    assert err.error_args["node"] == cheat.address
    assert err.error_args["withdrawableAt"] < err.error_args["closesAt"]
    env.pc.claim_leaf(env.payer, mid, 0, honest, 5, tree.proof(honest))
    assert env.pc.balance_of(mid, op.address) == 0 and env.pc.total_supply(mid) == 5


def test_window_longer_than_unbonding_delay_cannot_be_escaped(env: Env) -> None:
    """An active node that starts unbonding after submission, in a model whose window exceeds the delay."""
    mid = env.propose(challenge_window=7200)
    op = env.operators[0]
    node = env.new_node(op)
    tree = env.submit(mid, 0, {node.address: 40})
    env.pc.begin_unbond(op, node.address)
    env.pc.advance_time(150)
    env.pc.withdraw_stake(op, node.address)
    env.pc.advance_time(7200)
    err = _revert(env.pc.claim_leaf, env.payer, mid, 0, node.address, 40, tree.proof(node.address))
    assert err.error_name == "ContributionLedgerStakeNotLocked"
    assert env.pc.total_supply(mid) == 0 and not env.pc.is_leaf_claimed(mid, 0, node.address)


def test_rebonding_does_not_revive_a_leaf_whose_stake_left_in_the_window(env: Env) -> None:
    mid = env.propose()
    op = env.operators[0]
    node = env.new_node(op)
    env.pc.begin_unbond(op, node.address)
    tree = env.submit(mid, 0, {node.address: 11})
    env.pc.advance_time(150)
    env.pc.withdraw_stake(op, node.address)
    env.pc.register_node(op, node, 10)  # a fresh bond, after the root was submitted
    env.pc.advance_time(WINDOW)
    err = _revert(env.pc.claim_leaf, env.payer, mid, 0, node.address, 11, tree.proof(node.address))
    assert err.error_name == "ContributionLedgerStakeNotLocked"
    assert err.error_args["bondedAt"] > err.error_args["submittedAt"]


def test_verdict_in_window_slashes_the_stake_held_at_contribution() -> None:
    """With the delay covering the window, a node unbonding right after submission is still slashed in full."""
    env = make_env(unbonding_delay_s=2 * WINDOW)
    mid = env.propose()
    op = env.operators[0]
    node = env.new_node(op)
    stake = env.pc.node_info(node.address).stake_wei
    tree = env.submit(mid, 0, {node.address: 40})
    env.pc.begin_unbond(op, node.address)
    env.pc.advance_time(WINDOW - 10)
    err = _revert(env.pc.withdraw_stake, op, node.address)
    assert err.error_name == "NodeRegistryStillUnbonding"
    env.condemn_leaf(mid, 0, node.address)
    assert env.pc.node_info(node.address).stake_wei == stake - stake * 5000 // 10_000
    env.pc.advance_time(WINDOW)
    err = _revert(env.pc.claim_leaf, env.payer, mid, 0, node.address, 40, tree.proof(node.address))
    assert err.error_name == "ContributionLedgerLeafVoided"


def test_unbonding_node_whose_delay_covers_the_window_still_claims() -> None:
    env = make_env(unbonding_delay_s=2 * WINDOW)
    mid = env.propose()
    op = env.operators[0]
    node = env.new_node(op)
    env.pc.begin_unbond(op, node.address)
    tree = env.submit(mid, 0, {node.address: 40})  # unbondsAt = begin + 7200 >= submittedAt + 3600
    env.pc.advance_time(WINDOW)
    env.pc.claim_leaf(env.payer, mid, 0, node.address, 40, tree.proof(node.address))
    assert env.pc.balance_of(mid, op.address) == 40


# -- 3. minting frozen by a tiny first supply ------------------------------------------------------------------


def test_tiny_supply_and_one_deposit_cannot_freeze_minting() -> None:
    env = make_env(w3=rich_chain())
    mid = env.propose()
    griefer, victim = env.operators[0], env.operators[1]
    g_node, v_node = env.new_node(griefer).address, env.new_node(victim).address
    env.settle_and_claim(mid, 0, {g_node: 1})  # a 1-unit leaf claimed first
    deposit = 10**24
    env.pc.deposit_revenue(griefer, mid, deposit, b"\x01" * 32)  # D*v/S1 = 1e45 >> 2^127
    assert env.pc.claim_revenue(mid, griefer) == deposit  # the deposit comes straight back
    env.settle_and_claim(mid, 1, {v_node: 10**21})  # the victim's leaf still mints
    assert env.pc.balance_of(mid, victim.address) == 10**21
    env.pc.transfer(victim, mid, env.researcher.address, 10**20)
    env.pc.deposit_revenue(env.payer, mid, 10**30, b"\x02" * 32)
    supply = 10**21 + 1
    for holder, shares in ((victim, 9 * 10**20), (env.researcher, 10**20)):
        due = 10**30 * shares // supply  # exact entitlement, rounded down
        assert 0 <= due - env.pc.claim_revenue(mid, holder) <= 2
    assert env.pc.claimable(mid, griefer.address) <= 10**30 // supply


# -- 4. terms that overflow ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("term", "kwargs", "value"),
    [
        ("challengeWindow", {"challenge_window": 2**64 - 1}, 2**64 - 1),
        ("challengeWindow", {"challenge_window": 365 * 86400 + 1}, 365 * 86400 + 1),
        ("inferenceFeeWei", {"inference_fee_wei": 2**128}, 2**128),
        ("metadataURI", {"metadata_uri": "x" * 2049}, 2049),
    ],
)
def test_terms_out_of_bounds_are_refused_at_proposal(env: Env, term: str, kwargs: dict, value: int) -> None:
    args = dict(spec_hash=b"\x11" * 32, metadata_uri="ipfs://m", num_stages=2, accounting_hash=b"\x22" * 32,
                epoch_length=10, challenge_window=10, audit_rate_bps=0, inference_fee_wei=0)
    args.update(kwargs)
    err = _revert(env.pc.propose_model, env.researcher, *args.values())
    assert err.error_name == "ModelRegistryInvalidTerm"
    assert err.error_args["term"] == term and err.error_args["value"] == value
    assert err.error_args["value"] > err.error_args["max"]
    assert env.pc.model_count() == 0


def test_longest_window_still_settles_and_claims(env: Env) -> None:
    window = 365 * 86400
    mid = env.propose(challenge_window=window)
    node = env.new_node(env.operators[0]).address
    tree = env.submit(mid, 0, {node: 3})
    env.pc.advance_time(window)
    env.pc.claim_leaf(env.payer, mid, 0, node, 3, tree.proof(node))
    assert env.pc.total_supply(mid) == 3
