"""Hypothesis stateful test: random mints (through ledger claims), transfers, deposits and claims.

After every step: sum(claimed) + pool balance == sum(deposited) exactly in wei; nobody has accrued more
than their exact (rational) entitlement, nor trails it by more than one wei per checkpoint of their account
(balance change or claim) and per deposit; the dust left in the pool is bounded by the same count.
"""

from __future__ import annotations

from fractions import Fraction
from typing import cast

import pytest
from eth_typing import ChecksumAddress
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from contracts.errors import ContractRevertError

from .conftest import Env, make_env

_ENV: list[Env] = []
_NODES: list[str] = []


def _shared_env() -> Env:
    """One deployment (and one node per operator) for all examples; every example gets a fresh model."""
    if not _ENV:
        env = make_env()
        _NODES.extend(env.new_node(op).address for op in env.operators)
        _ENV.append(env)
    return _ENV[0]


class RevenueMachine(RuleBasedStateMachine):
    @initialize()
    def fresh_model(self) -> None:
        self.env = _shared_env()
        self.pc = self.env.pc
        self.mid = self.env.propose()
        self.token = cast(ChecksumAddress, self.pc.share_token(self.mid))  # share_token returns a checksummed address typed as str
        self.holders = [*self.env.operators, self.env.researcher, self.env.admin]
        self.balances = {h.address: 0 for h in self.holders}
        self.entitled = {h.address: Fraction(0) for h in self.holders}
        self.claimed = {h.address: 0 for h in self.holders}
        self.deposited = 0
        self.epoch = 0
        self.ever_held: set[ChecksumAddress] = set()
        self.touches = {h.address: 1 for h in self.holders}  # checkpoints + deposits: bound on rounding

    @rule(op=st.integers(0, 2), units=st.integers(1, 10**9))
    def mint_through_ledger(self, op: int, units: int) -> None:
        self.env.settle_and_claim(self.mid, self.epoch, {_NODES[op]: units})
        self.epoch += 1
        owner = self.env.operators[op].address
        self.balances[owner] += units
        self.ever_held.add(owner)
        self.touches[owner] += 1

    @rule(src=st.integers(0, 4), dst=st.integers(0, 4), share=st.fractions(0, 1))
    def transfer(self, src: int, dst: int, share: Fraction) -> None:
        a, b = self.holders[src], self.holders[dst]
        amount = int(self.balances[a.address] * share)
        self.pc.transfer(a, self.mid, b.address, amount)
        self.balances[a.address] -= amount
        self.balances[b.address] += amount
        self.touches[a.address] += 1
        self.touches[b.address] += 1
        if amount:
            self.ever_held.add(b.address)

    @rule(value=st.integers(1, 10**18))
    def deposit(self, value: int) -> None:
        supply = sum(self.balances.values())
        if supply == 0:
            with pytest.raises(ContractRevertError, match="ShareTokenNoSupply"):
                self.pc.deposit_revenue(self.env.payer, self.mid, value, b"\x0d" * 32)
            return
        self.pc.deposit_revenue(self.env.payer, self.mid, value, b"\x0d" * 32)
        self.deposited += value
        for h, bal in self.balances.items():
            self.entitled[h] += Fraction(value * bal, supply)
            self.touches[h] += 1

    @rule(who=st.integers(0, 4))
    def claim(self, who: int) -> None:
        acct = self.holders[who]
        due = self.pc.claimable(self.mid, acct.address)
        if due == 0:
            with pytest.raises(ContractRevertError, match="ShareTokenNothingToClaim"):
                self.pc.claim_revenue(self.mid, acct)
            return
        assert self.pc.claim_revenue(self.mid, acct) == due
        self.claimed[acct.address] += due
        self.touches[acct.address] += 1

    @invariant()
    def conservation_and_entitlement(self) -> None:
        if not hasattr(self, "mid"):
            return
        pool = self.pc.w3.eth.get_balance(self.token)
        assert sum(self.claimed.values()) + pool == self.deposited
        claimable_total = 0
        for h in self.balances:
            assert self.pc.balance_of(self.mid, h) == self.balances[h]
            assert self.pc.claimed(self.mid, h) == self.claimed[h]
            due = self.pc.claimable(self.mid, h)
            claimable_total += due
            accrued = self.claimed[h] + due
            assert accrued <= self.entitled[h], f"{h} accrued {accrued} > entitlement {self.entitled[h]}"
            assert self.entitled[h] - accrued <= self.touches[h]
        dust = pool - claimable_total
        assert 0 <= dust <= sum(self.touches[h] for h in self.ever_held) + len(self.ever_held)


RevenueMachine.TestCase.settings = settings(
    max_examples=12,
    stateful_step_count=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_revenue_accounting = pytest.mark.timeout(600)(RevenueMachine.TestCase)
