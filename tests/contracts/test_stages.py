"""NodeRegistry stage assignment: one stage per operator per model, stake per stage, leave before unbonding.

Every refusal is checked to leave the whole stage state (assignments, operator slots, stakes, ETH held)
exactly as it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from contracts.errors import ContractRevertError, StageAssignmentError

from .conftest import Env, make_env

STAKE_PER_UNIT = 10**12
STAGE_STAKE = 10**15  # DeployParams default


@dataclass(frozen=True)
class Snapshot:
    """Everything a stage call may change."""

    node_stages: tuple[Any, ...]
    operator_stages: tuple[Any, ...]
    assignments: tuple[int, ...]
    nodes: tuple[Any, ...]
    registry_balance: int


def snapshot(env: Env, models: Sequence[int], keys: Sequence[str], operators: Sequence[str]) -> Snapshot:
    pc = env.pc
    return Snapshot(
        tuple(pc.stage_of(m, k) for m in models for k in keys),
        tuple(pc.operator_stage_of(m, o) for m in models for o in operators),
        tuple(pc.assignments_of(k) for k in keys),
        tuple(pc.node_info(k) for k in keys),
        pc.w3.eth.get_balance(pc.nodes.address),
    )


def refused(env: Env, name: str, call: Any, models: Sequence[int], keys: Sequence[str], operators: Sequence[str]
            ) -> ContractRevertError:
    """Run `call`, expect the named revert, and check that nothing changed."""
    before = snapshot(env, models, keys, operators)
    with pytest.raises(ContractRevertError) as err:
        call()
    assert err.value.error_name == name, str(err.value)
    assert snapshot(env, models, keys, operators) == before
    return err.value


def funded(env: Env, wei: int = 10**18) -> LocalAccount:
    acct = Account.create()
    env.pc.tx.transact(env.payer, to=acct.address, value=wei)
    return acct


def test_assignment_records_stage_operator_and_stake(env: Env) -> None:
    mid = env.propose()
    op = env.operators[0]
    key = env.new_node(op, capacity=10)
    assert env.pc.stage_of(mid, key.address) is None and env.pc.operator_stage_of(mid, op.address) is None
    assert env.pc.stage_stake_missing(key.address) == STAGE_STAKE
    env.pc.assign_stage(op, key.address, mid, 2)
    assert env.pc.last_tx is not None
    (event,) = env.pc.nodes.events.StageAssigned().process_receipt(env.pc.last_tx.receipt)
    assert dict(event["args"]) == {"modelId": mid, "nodeKey": key.address, "operator": op.address, "stage": 2,
                                   "stake": 10 * STAKE_PER_UNIT + STAGE_STAKE}
    assert env.pc.stage_of(mid, key.address) == 2
    assert env.pc.operator_stage_of(mid, op.address) == 2
    assert env.pc.serves_stage(mid, key.address, 2) and not env.pc.serves_stage(mid, key.address, 1)
    assert env.pc.assignments_of(key.address) == 1
    assert env.pc.node_info(key.address).stake_wei == 10 * STAKE_PER_UNIT + STAGE_STAKE
    assert env.pc.stage_stake_missing(key.address) == STAGE_STAKE


def test_a_proposed_model_takes_assignments(env: Env) -> None:
    mid = env.propose(start=False)
    key = env.new_node(env.operators[0])
    env.pc.assign_stage(env.operators[0], key.address, mid, 0)
    assert env.pc.stage_of(mid, key.address) == 0


def test_one_operator_holds_one_stage_per_model(env: Env) -> None:
    mid = env.propose()
    op, other = env.operators[0], env.operators[1]
    k1, k2, k3 = env.new_node(op), env.new_node(op), env.new_node(other)
    env.pc.assign_stage(op, k1.address, mid, 0)
    keys, ops = [k1.address, k2.address, k3.address], [op.address, other.address]
    # a second node key of the same operator cannot take another stage ...
    err = refused(env, "NodeRegistryOperatorHoldsOtherStage",
                  lambda: env.pc.assign_stage(op, k2.address, mid, 1, stake_wei=STAGE_STAKE), [mid], keys, ops)
    assert isinstance(err, StageAssignmentError)
    assert err.error_args == {"operator": op.address, "modelId": mid, "heldStage": 0, "stage": 1}
    assert "one operator serves at most one stage of a model" in str(err)
    # ... nor can the same node key
    refused(env, "NodeRegistryOperatorHoldsOtherStage",
            lambda: env.pc.assign_stage(op, k1.address, mid, 2, stake_wei=STAGE_STAKE), [mid], keys, ops)
    # the same stage again on the same node key is refused (never counted twice)
    err = refused(env, "NodeRegistryStageAlreadyAssigned",
                  lambda: env.pc.assign_stage(op, k1.address, mid, 0, stake_wei=STAGE_STAKE), [mid], keys, ops)
    assert err.error_args == {"nodeKey": k1.address, "modelId": mid, "stage": 0}
    # a replica of the operator's own stage is allowed, with its own stake
    env.pc.assign_stage(op, k2.address, mid, 0)
    assert env.pc.stage_of(mid, k2.address) == 0 and env.pc.node_info(k2.address).stake_wei == 10**13 + STAGE_STAKE
    # another operator takes another stage; another model is a separate slot
    env.pc.assign_stage(other, k3.address, mid, 1)
    mid2 = env.propose()
    env.pc.assign_stage(op, k1.address, mid2, 2)
    assert [env.pc.operator_stage_of(mid, o.address) for o in (op, other)] == [0, 1]
    assert env.pc.operator_stage_of(mid2, op.address) == 2 and env.pc.assignments_of(k1.address) == 2


def test_each_assignment_needs_its_own_stake(env: Env) -> None:
    mid, mid2 = env.propose(), env.propose()
    op = env.operators[0]
    key = env.new_node(op, capacity=10)
    keys, ops = [key.address], [op.address]
    err = refused(env, "NodeRegistryInsufficientStageStake",
                  lambda: env.pc.assign_stage(op, key.address, mid, 0, stake_wei=STAGE_STAKE - 1), [mid, mid2],
                  keys, ops)
    assert err.error_args == {"nodeKey": key.address, "stake": 10 * STAKE_PER_UNIT + STAGE_STAKE - 1,
                              "required": 10 * STAKE_PER_UNIT + STAGE_STAKE}
    assert "send the difference" in str(err)
    env.pc.assign_stage(op, key.address, mid, 0, stake_wei=STAGE_STAKE)
    # the first stage stake cannot back a second assignment
    refused(env, "NodeRegistryInsufficientStageStake",
            lambda: env.pc.assign_stage(op, key.address, mid2, 0, stake_wei=0), [mid, mid2], keys, ops)
    env.pc.assign_stage(op, key.address, mid2, 0)  # sends the missing STAGE_STAKE
    assert env.pc.node_info(key.address).stake_wei == 10 * STAKE_PER_UNIT + 2 * STAGE_STAKE
    # stake sent up front at registration backs an assignment too
    big = Account.create()
    env.pc.register_node(env.operators[2], big, 1, stake_wei=STAKE_PER_UNIT + STAGE_STAKE)
    assert env.pc.stage_stake_missing(big.address) == 0
    env.pc.assign_stage(env.operators[2], big.address, mid, 1, stake_wei=0)
    assert env.pc.stage_of(mid, big.address) == 1


def test_collecting_every_stage_takes_p_operators_and_p_stage_stakes(env: Env) -> None:
    mid = env.propose()  # 3 stages
    op = env.operators[0]
    keys = [env.new_node(op) for _ in range(3)]
    env.pc.assign_stage(op, keys[0].address, mid, 0)
    for s in (1, 2):  # one operator gets no further stage, whatever number of node keys it registers
        refused(env, "NodeRegistryOperatorHoldsOtherStage",
                lambda s=s: env.pc.assign_stage(op, keys[s].address, mid, s, stake_wei=STAGE_STAKE), [mid],
                [k.address for k in keys], [op.address])
    sybils = [op] + [funded(env) for _ in range(2)]
    nodes = [keys[0]] + [env.new_node(o) for o in sybils[1:]]
    for s in (1, 2):
        env.pc.assign_stage(sybils[s], nodes[s].address, mid, s)
    assert [env.pc.operator_stage_of(mid, o.address) for o in sybils] == [0, 1, 2]
    stage_stake = sum(env.pc.node_info(n.address).stake_wei - 10 * STAKE_PER_UNIT for n in nodes)
    assert stage_stake == 3 * STAGE_STAKE


def test_bad_targets_are_refused_and_change_nothing(env: Env) -> None:
    mid = env.propose()
    op, stranger = env.operators[0], env.operators[1]
    key = env.new_node(op)
    keys, ops = [key.address], [op.address, stranger.address]
    err = refused(env, "NodeRegistryInvalidStage", lambda: env.pc.assign_stage(op, key.address, mid, 3), [mid], keys,
                  ops)
    assert err.error_args == {"modelId": mid, "stage": 3, "numStages": 3}
    err = refused(env, "NodeRegistryModelNotOpen", lambda: env.pc.assign_stage(op, key.address, 99, 0), [mid, 99],
                  keys, ops)
    assert err.error_args == {"modelId": 99, "status": 0} and "unknown or retired (status None)" in str(err)
    retired = env.propose()
    env.pc.retire_model(env.researcher, retired)
    refused(env, "NodeRegistryModelNotOpen", lambda: env.pc.assign_stage(op, key.address, retired, 0), [retired],
            keys, ops)
    refused(env, "NodeRegistryNotOperator", lambda: env.pc.assign_stage(stranger, key.address, mid, 0, stake_wei=0),
            [mid], keys, ops)
    ghost = Account.create().address
    refused(env, "NodeRegistryUnknownNode", lambda: env.pc.assign_stage(op, ghost, mid, 0, stake_wei=0), [mid],
            keys + [ghost], ops)
    refused(env, "NodeRegistryNotAssigned", lambda: env.pc.leave_stage(op, key.address, mid), [mid], keys, ops)
    env.pc.assign_stage(op, key.address, mid, 1)
    refused(env, "NodeRegistryNotOperator", lambda: env.pc.leave_stage(stranger, key.address, mid), [mid], keys, ops)


def test_unbonding_requires_leaving_first(env: Env) -> None:
    mid, mid2 = env.propose(), env.propose()
    op = env.operators[0]
    key = env.new_node(op, capacity=10)
    env.pc.assign_stage(op, key.address, mid, 1)
    env.pc.assign_stage(op, key.address, mid2, 0)
    keys, ops = [key.address], [op.address]
    err = refused(env, "NodeRegistryStagesAssigned", lambda: env.pc.begin_unbond(op, key.address), [mid, mid2], keys,
                  ops)
    assert err.error_args == {"nodeKey": key.address, "assignments": 2}
    env.pc.leave_stage(op, key.address, mid)
    assert env.pc.last_tx is not None
    (event,) = env.pc.nodes.events.StageLeft().process_receipt(env.pc.last_tx.receipt)
    assert dict(event["args"]) == {"modelId": mid, "nodeKey": key.address, "operator": op.address, "stage": 1}
    refused(env, "NodeRegistryStagesAssigned", lambda: env.pc.begin_unbond(op, key.address), [mid, mid2], keys, ops)
    env.pc.leave_stage(op, key.address, mid2)
    assert env.pc.stage_of(mid, key.address) is None and env.pc.operator_stage_of(mid2, op.address) is None
    assert env.pc.node_info(key.address).stake_wei == 10 * STAKE_PER_UNIT + 2 * STAGE_STAKE  # stays bonded
    env.pc.begin_unbond(op, key.address)
    # an unbonding or withdrawn node takes no stage
    refused(env, "NodeRegistryWrongStatus", lambda: env.pc.assign_stage(op, key.address, mid, 1), [mid], keys, ops)
    env.pc.advance_time(100)
    before = env.pc.w3.eth.get_balance(op.address)
    env.pc.withdraw_stake(op, key.address)
    assert env.pc.last_tx is not None
    receipt = env.pc.last_tx.receipt
    gas = receipt["gasUsed"] * receipt["effectiveGasPrice"]
    assert env.pc.w3.eth.get_balance(op.address) == before - gas + 10 * STAKE_PER_UNIT + 2 * STAGE_STAKE
    refused(env, "NodeRegistryWrongStatus",
            lambda: env.pc.assign_stage(op, key.address, mid, 1, stake_wei=STAGE_STAKE), [mid], keys, ops)


def test_leaving_frees_the_operator_only_when_its_last_node_leaves(env: Env) -> None:
    mid = env.propose()
    op = env.operators[0]
    a, b = env.new_node(op), env.new_node(op)
    env.pc.assign_stage(op, a.address, mid, 2)
    env.pc.assign_stage(op, b.address, mid, 2)
    env.pc.leave_stage(op, a.address, mid)
    assert env.pc.operator_stage_of(mid, op.address) == 2 and env.pc.stage_of(mid, b.address) == 2
    refused(env, "NodeRegistryOperatorHoldsOtherStage",
            lambda: env.pc.assign_stage(op, a.address, mid, 0, stake_wei=0), [mid], [a.address, b.address],
            [op.address])
    env.pc.leave_stage(op, b.address, mid)
    assert env.pc.operator_stage_of(mid, op.address) is None
    env.pc.assign_stage(op, a.address, mid, 0, stake_wei=0)  # its earlier stage stake still backs this one
    assert env.pc.operator_stage_of(mid, op.address) == 0


def test_a_slashed_node_keeps_its_slot_but_no_longer_serves(env: Env) -> None:
    mid = env.propose()
    op = env.operators[0]
    key = env.new_node(op, capacity=10)
    env.pc.assign_stage(op, key.address, mid, 1)
    env.submit(mid, 0, {key.address: 100})
    env.condemn_leaf(mid, 0, key.address)  # slashes 50%
    assert env.pc.stage_of(mid, key.address) == 1 and not env.pc.serves_stage(mid, key.address, 1)
    # the operator restores the backing by leaving and re-taking the stage with the missing stake
    env.pc.leave_stage(op, key.address, mid)
    env.pc.assign_stage(op, key.address, mid, 1)
    assert env.pc.serves_stage(mid, key.address, 1)


def test_validators_lists_the_attesters_sorted(env: Env) -> None:
    expected = sorted((v.address for v in env.validators), key=lambda a: int(a, 16))
    assert env.pc.validators() == expected
    extra = Account.create().address
    env.pc.set_validator(env.admin, extra, True)
    assert env.pc.validators() == sorted(expected + [extra], key=lambda a: int(a, 16))
    env.pc.set_validator(env.admin, expected[0], False)
    assert env.pc.validators() == sorted(expected[1:] + [extra], key=lambda a: int(a, 16))


class StageMachine(RuleBasedStateMachine):
    """Random assign/leave/unbond sequences over 3 operators x 2 node keys x 2 models (3 stages each).

    A Python model of the rules predicts every outcome; after each step the chain equals the model, no operator
    holds two stages of a model, every assigned node is active and its stake covers capacity + stages.
    """

    @initialize()
    def setup(self) -> None:
        self.env = make_env()
        self.models = [self.env.propose(), self.env.propose()]
        self.ops = self.env.operators
        self.keys = [(o, self.env.new_node(o, capacity=1)) for o in self.ops for _ in range(2)]
        self.stage: dict[tuple[int, str], int] = {}  # (model, key) -> stage
        self.stake = {k.address: STAKE_PER_UNIT for _, k in self.keys}
        self.unbonding: set[str] = set()

    def _op_stage(self, model: int, op: str) -> int | None:
        held = {s for (m, k), s in self.stage.items() if m == model and self._operator(k) == op}
        assert len(held) <= 1
        return held.pop() if held else None

    def _operator(self, key: str) -> str:
        return next(o.address for o, k in self.keys if k.address == key)

    def _expect(self, name: str | None, call: Any) -> None:
        if name is None:
            call()
            return
        env = self.env
        keys, ops = [k.address for _, k in self.keys], [o.address for o in self.ops]
        refused(env, name, call, self.models, keys, ops)

    @rule(i=st.integers(0, 5), m=st.integers(0, 1), stage=st.integers(0, 3), pay=st.sampled_from([0, 1, 2]))
    def assign(self, i: int, m: int, stage: int, pay: int) -> None:
        op, key = self.keys[i]
        model, addr = self.models[m], key.address
        value = pay * STAGE_STAKE // 2  # 0, half or a full stage stake
        held = self._op_stage(model, op.address)
        n = sum(1 for (_, k) in self.stage if k == addr)
        if addr in self.unbonding:
            err: str | None = "NodeRegistryWrongStatus"
        elif stage >= 3:
            err = "NodeRegistryInvalidStage"
        elif (model, addr) in self.stage and self.stage[(model, addr)] == stage:
            err = "NodeRegistryStageAlreadyAssigned"
        elif held is not None and held != stage:
            err = "NodeRegistryOperatorHoldsOtherStage"
        elif self.stake[addr] + value < STAKE_PER_UNIT + (n + 1) * STAGE_STAKE:
            err = "NodeRegistryInsufficientStageStake"
        else:
            err = None
        self._expect(err, lambda: self.env.pc.assign_stage(op, addr, model, stage, stake_wei=value))
        if err is None:
            self.stage[(model, addr)] = stage
            self.stake[addr] += value

    @rule(i=st.integers(0, 5), m=st.integers(0, 1))
    def leave(self, i: int, m: int) -> None:
        op, key = self.keys[i]
        model = self.models[m]
        err = None if (model, key.address) in self.stage else "NodeRegistryNotAssigned"
        self._expect(err, lambda: self.env.pc.leave_stage(op, key.address, model))
        self.stage.pop((model, key.address), None)

    @rule(i=st.integers(0, 5))
    def unbond(self, i: int) -> None:
        op, key = self.keys[i]
        if key.address in self.unbonding:
            err: str | None = "NodeRegistryWrongStatus"
        elif any(k == key.address for (_, k) in self.stage):
            err = "NodeRegistryStagesAssigned"
        else:
            err = None
        self._expect(err, lambda: self.env.pc.begin_unbond(op, key.address))
        if err is None:
            self.unbonding.add(key.address)

    @invariant()
    def chain_equals_model(self) -> None:
        if not hasattr(self, "env"):
            return
        pc = self.env.pc
        for model in self.models:
            for op in self.ops:
                assert pc.operator_stage_of(model, op.address) == self._op_stage(model, op.address)
            for _, key in self.keys:
                expected = self.stage.get((model, key.address))
                assert pc.stage_of(model, key.address) == expected
                if expected is not None:
                    info = pc.node_info(key.address)
                    assert info.status == "Active"
                    assert info.stake_wei >= STAKE_PER_UNIT + pc.assignments_of(key.address) * STAGE_STAKE
                    assert pc.serves_stage(model, key.address, expected)
        for _, key in self.keys:
            assert pc.node_info(key.address).stake_wei == self.stake[key.address]


TestStageMachine = StageMachine.TestCase
TestStageMachine.settings = settings(max_examples=4, stateful_step_count=20, deadline=None,
                                     suppress_health_check=[HealthCheck.too_slow])
