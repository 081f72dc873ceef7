"""Hypothesis stateful test of the whole incentive system at extreme magnitudes (issue 15).

Random sequences of register / unbond / withdraw / submit / leaf verdict / root verdict / resubmission of a
voided root / replacement / leaf claim / deposit / transfer / revenue claim / time jumps, with leaf units up
to 2^96 and deposits from 1 wei to 10^30 wei (supply from 1 upwards). After every step:

- sum(claimed) + pool balance == sum(deposited), exactly in wei;
- every voided root stays voided and is refused on resubmission; its leaves never mint;
- a fraud verdict inside a window slashes slashBps of the stake the node had when the root was submitted
  whenever that bond is still in place; a leaf whose bond was withdrawn (or replaced) before its window
  closed never mints;
- no call by anyone makes another holder's claim or a valid leaf's mint revert; accrual never exceeds the
  exact entitlement and trails it by at most one wei per checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import cast

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from contracts.errors import ContractRevertError
from contracts.merkle import ContributionTree

from .conftest import WINDOW, Env, make_env, rich_chain

DELAY = 100  # unbonding delay < WINDOW: nodes can try to leave inside a window
BPS = 5000
RH = b"\x33" * 32
_ENV: list[Env] = []


def _env() -> Env:
    if not _ENV:
        _ENV.append(make_env(w3=rich_chain(10**34), unbonding_delay_s=DELAY))
    return _ENV[0]


@dataclass
class NodeModel:
    key: LocalAccount
    op: LocalAccount
    bond: int = 0  # increments at every registration
    status: str = "Active"
    unbonds_at: int = 0
    stake: int = 0


@dataclass
class RootModel:
    tree: ContributionTree
    submitted_at: int
    closes_at: int
    bonds: dict[str, int]  # node -> bond id at submission
    voided: bool = False
    leaf_voided: set[str] = field(default_factory=set)
    claimed: set[str] = field(default_factory=set)


class IncentiveMachine(RuleBasedStateMachine):
    @initialize()
    def fresh_model(self) -> None:
        self.env = _env()
        self.pc = self.env.pc
        self.mid = self.env.propose()
        self.token = cast(ChecksumAddress, self.pc.share_token(self.mid))  # share_token returns a checksummed address typed as str
        self.nodes: list[NodeModel] = []
        for op in self.env.operators:
            key = Account.create()
            self.pc.register_node(op, key, 10)
            self.nodes.append(NodeModel(key, op, 1, "Active", 0, self.pc.node_info(key.address).stake_wei))
        self.holders = [*self.env.operators, self.env.researcher]
        self.balances = {h.address: 0 for h in self.holders}
        self.entitled = {h.address: Fraction(0) for h in self.holders}
        self.claimed = {h.address: 0 for h in self.holders}
        self.touches = {h.address: 1 for h in self.holders}  # checkpoints + deposits seen: bound on rounding
        self.deposited = 0
        self.roots: dict[int, RootModel] = {}
        self.burned: list[tuple[int, ContributionTree]] = []
        self.next_epoch = 0

    # -- helpers ---------------------------------------------------------------------------------------

    def now(self) -> int:
        return int(self.pc.w3.eth.get_block("latest")["timestamp"])

    def expect(self, name: str, fn, *args) -> ContractRevertError:
        with pytest.raises(ContractRevertError) as err:
            fn(*args)
        assert err.value.error_name == name, str(err.value)
        return err.value

    def _submit(self, epoch: int, tree: ContributionTree) -> None:
        self.pc.submit_epoch_root(self.env.payer, self.mid, epoch, tree.root, tree.total_units, RH,
                                  self.env.root_signatures(tree))
        assert self.pc.last_tx is not None
        at = int(self.pc.w3.eth.get_block(self.pc.last_tx.receipt["blockNumber"])["timestamp"])
        old = self.roots.get(epoch)
        root = RootModel(tree, at, at + WINDOW, {n.key.address: n.bond for n in self.nodes})
        if old is not None:  # a replacement keeps the epoch's leaf verdicts
            root.leaf_voided = old.leaf_voided
        self.roots[epoch] = root

    def _open(self, epoch: int) -> bool:
        r = self.roots.get(epoch)
        return r is not None and not r.voided and self.now() + 5 < r.closes_at

    # -- nodes -----------------------------------------------------------------------------------------

    @rule(i=st.integers(0, 2))
    def begin_unbond(self, i: int) -> None:
        n = self.nodes[i]
        if n.status != "Active":
            self.expect("NodeRegistryWrongStatus", self.pc.begin_unbond, n.op, n.key.address)
            return
        self.pc.begin_unbond(n.op, n.key.address)
        n.status, n.unbonds_at = "Unbonding", self.pc.node_info(n.key.address).unbonds_at

    @rule(i=st.integers(0, 2))
    def withdraw(self, i: int) -> None:
        n = self.nodes[i]
        if n.status != "Unbonding":
            self.expect("NodeRegistryWrongStatus", self.pc.withdraw_stake, n.op, n.key.address)
        elif self.now() + 5 < n.unbonds_at:
            self.expect("NodeRegistryStillUnbonding", self.pc.withdraw_stake, n.op, n.key.address)
        elif self.now() >= n.unbonds_at:
            self.pc.withdraw_stake(n.op, n.key.address)
            n.status, n.stake = "Withdrawn", 0

    @rule(i=st.integers(0, 2))
    def reregister(self, i: int) -> None:
        n = self.nodes[i]
        if n.status != "Withdrawn":
            return
        self.pc.register_node(n.op, n.key, 10)
        n.bond += 1
        n.status, n.unbonds_at, n.stake = "Active", 0, self.pc.node_info(n.key.address).stake_wei

    @rule(seconds=st.sampled_from([1, 30, DELAY, WINDOW // 2, WINDOW]))
    def time_passes(self, seconds: int) -> None:
        self.pc.advance_time(seconds)

    # -- roots -----------------------------------------------------------------------------------------

    @rule(units=st.lists(st.one_of(st.integers(1, 1000), st.integers(1, 2**96)), min_size=1, max_size=3))
    def submit(self, units: list[int]) -> None:
        contrib: dict[str, int] = {self.nodes[i].key.address: u for i, u in enumerate(units)}
        self._submit(self.next_epoch, ContributionTree(self.mid, self.next_epoch, contrib))
        self.next_epoch += 1

    @rule(data=st.data())
    def root_verdict(self, data: st.DataObject) -> None:
        open_epochs = [e for e in self.roots if self._open(e)]
        if not open_epochs:
            return
        e = data.draw(st.sampled_from(open_epochs))
        self.env.void_root(self.mid, e, bytes([e % 256]) * 32)
        self.roots[e].voided = True
        self.burned.append((e, self.roots[e].tree))

    @rule(data=st.data())
    def resubmit_voided(self, data: st.DataObject) -> None:
        """The attack: replay a voided root with its own quorum signatures."""
        if not self.burned:
            return
        e, tree = data.draw(st.sampled_from(self.burned))
        live = not self.roots[e].voided
        name = "ContributionLedgerEpochAlreadySubmitted" if live else "ContributionLedgerRootWasVoided"
        self.expect(name, self.pc.submit_epoch_root, self.env.payer, self.mid, e, tree.root, tree.total_units, RH,
                    self.env.root_signatures(tree))

    @rule(data=st.data(), units=st.integers(1, 2**96))
    def replace_voided(self, data: st.DataObject, units: int) -> None:
        voided = [e for e, r in self.roots.items() if r.voided]
        if not voided:
            return
        e = data.draw(st.sampled_from(voided))
        tree = ContributionTree(self.mid, e, {n.key.address: units + i for i, n in enumerate(self.nodes)})
        if any(t.root == tree.root for _, t in self.burned):
            return
        self._submit(e, tree)

    @rule(data=st.data(), i=st.integers(0, 2))
    def leaf_verdict(self, data: st.DataObject, i: int) -> None:
        open_epochs = [e for e in self.roots if self._open(e)]
        if not open_epochs:
            return
        e = data.draw(st.sampled_from(open_epochs))
        n, r = self.nodes[i], self.roots[e]
        if n.key.address in r.leaf_voided:
            self.expect("ContributionLedgerLeafVoided", self.env.condemn_leaf, self.mid, e, n.key.address)
            return
        before = self.pc.node_info(n.key.address).stake_wei
        assert before == n.stake  # nothing but verdicts and withdrawal moves stake
        self.env.condemn_leaf(self.mid, e, n.key.address)
        r.leaf_voided.add(n.key.address)
        after = self.pc.node_info(n.key.address).stake_wei
        if r.bonds.get(n.key.address) == n.bond and n.status != "Withdrawn":
            # the bond the node contributed with is still there: the verdict takes its share of it
            assert before - after == before * BPS // 10_000
        n.stake = after

    # -- leaf claims -----------------------------------------------------------------------------------

    @rule(data=st.data(), i=st.integers(0, 2))
    def claim_leaf(self, data: st.DataObject, i: int) -> None:
        if not self.roots:
            return
        e = data.draw(st.sampled_from(sorted(self.roots)))
        r, n = self.roots[e], self.nodes[i]
        node = n.key.address
        if node not in r.tree.contributions:
            return
        units = r.tree.contributions[node]
        args = (self.env.payer, self.mid, e, node, units, r.tree.proof(node))
        if r.voided:
            self.expect("ContributionLedgerRootVoided", self.pc.claim_leaf, *args)
        elif self.now() + 5 < r.closes_at:
            self.expect("ContributionLedgerChallengeWindowOpen", self.pc.claim_leaf, *args)
        elif self.now() < r.closes_at:
            return  # at the window's edge the next block's timestamp decides
        elif node in r.leaf_voided:
            self.expect("ContributionLedgerLeafVoided", self.pc.claim_leaf, *args)
        elif node in r.claimed:
            self.expect("ContributionLedgerLeafAlreadyClaimed", self.pc.claim_leaf, *args)
        elif r.bonds.get(node) != n.bond or (n.status != "Active" and n.unbonds_at < r.closes_at):
            # the stake could leave before the window closed: such a leaf never mints
            self.expect("ContributionLedgerStakeNotLocked", self.pc.claim_leaf, *args)
        else:
            self.pc.claim_leaf(*args)  # a valid leaf always mints, whatever anyone did before
            r.claimed.add(node)
            self.balances[n.op.address] += units
            self.touches[n.op.address] += 1

    # -- revenue ---------------------------------------------------------------------------------------

    @rule(value=st.one_of(st.integers(1, 10**6), st.integers(1, 10**30)))
    def deposit(self, value: int) -> None:
        supply = sum(self.balances.values())
        if supply == 0:
            self.expect("ShareTokenNoSupply", self.pc.deposit_revenue, self.env.payer, self.mid, value, b"\x0d" * 32)
            return
        self.pc.deposit_revenue(self.env.payer, self.mid, value, b"\x0d" * 32)
        self.deposited += value
        for h, bal in self.balances.items():
            self.entitled[h] += Fraction(value * bal, supply)
            self.touches[h] += 1

    @rule(src=st.integers(0, 3), dst=st.integers(0, 3), share=st.fractions(0, 1))
    def transfer(self, src: int, dst: int, share: Fraction) -> None:
        a, b = self.holders[src], self.holders[dst]
        amount = int(self.balances[a.address] * share)
        self.pc.transfer(a, self.mid, b.address, amount)
        self.balances[a.address] -= amount
        self.balances[b.address] += amount
        self.touches[a.address] += 1
        self.touches[b.address] += 1

    @rule(who=st.integers(0, 3))
    def claim_revenue(self, who: int) -> None:
        acct = self.holders[who]
        due = self.pc.claimable(self.mid, acct.address)
        if due == 0:
            self.expect("ShareTokenNothingToClaim", self.pc.claim_revenue, self.mid, acct)
            return
        assert self.pc.claim_revenue(self.mid, acct) == due  # never blocked by anyone else's calls
        self.claimed[acct.address] += due
        self.touches[acct.address] += 1

    # -- invariants ------------------------------------------------------------------------------------

    @precondition(lambda self: hasattr(self, "mid"))
    @invariant()
    def conservation(self) -> None:
        pool = self.pc.w3.eth.get_balance(self.token)
        assert sum(self.claimed.values()) + pool == self.deposited
        for h in self.balances:
            assert self.pc.balance_of(self.mid, h) == self.balances[h]
            accrued = self.claimed[h] + self.pc.claimable(self.mid, h)
            assert accrued <= self.entitled[h], f"{h} accrued {accrued} > entitlement {self.entitled[h]}"
            assert self.entitled[h] - accrued <= self.touches[h]

    @precondition(lambda self: hasattr(self, "mid"))
    @invariant()
    def voided_roots_stay_dead(self) -> None:
        for e, tree in self.burned:
            assert self.pc.is_root_voided(self.mid, e, tree.root)
            for node in tree.contributions:
                if self.roots[e].tree.root == tree.root:
                    assert not self.pc.is_leaf_claimed(self.mid, e, node)
        assert self.pc.total_supply(self.mid) == sum(self.balances.values())


IncentiveMachine.TestCase.settings = settings(
    max_examples=8,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_incentives_under_attack = pytest.mark.timeout(900)(IncentiveMachine.TestCase)
