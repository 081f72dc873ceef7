"""Fixtures: an embedded chain with the suite deployed, and helpers to mint shares through the ledger."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount

from contracts.chain import connect, test_accounts
from contracts.client import ProtocolContracts
from contracts.config import ChainConfig
from contracts.deploy import DeployParams, deploy_all
from contracts.merkle import ContributionTree

FAST = ChainConfig(fixed_gas=3_000_000)
SPEC = b"\x11" * 32
ACCT = b"\x22" * 32
WINDOW = 3600


@dataclass
class Env:
    """A deployed suite and named accounts."""

    pc: ProtocolContracts
    admin: LocalAccount
    validators: list[LocalAccount]
    researcher: LocalAccount
    operators: list[LocalAccount]
    payer: LocalAccount

    def propose(self, challenge_window: int = WINDOW, start: bool = True) -> int:
        mid = self.pc.propose_model(self.researcher, SPEC, "ipfs://model", 3, ACCT, 100, challenge_window, 500, 10**12)
        if start:
            self.pc.start_training(self.researcher, mid)
        return mid

    def new_node(self, operator: LocalAccount, capacity: int = 10) -> LocalAccount:
        key = Account.create()
        self.pc.register_node(operator, key, capacity)
        return key

    def submit(self, model_id: int, epoch: int, contributions: dict[str, int]) -> ContributionTree:
        tree = ContributionTree(model_id, epoch, contributions)
        typed = self.pc.epoch_root_typed_data(model_id, epoch, tree.root, tree.total_units, b"\x33" * 32)
        from contracts.eip712 import sign_quorum

        sigs = sign_quorum(self.validators[:2], typed)
        self.pc.submit_epoch_root(self.payer, model_id, epoch, tree.root, tree.total_units, b"\x33" * 32, sigs)
        return tree

    def settle_and_claim(self, model_id: int, epoch: int, contributions: dict[str, int]) -> ContributionTree:
        tree = self.submit(model_id, epoch, contributions)
        self.pc.advance_time(WINDOW)
        for node, units in contributions.items():
            self.pc.claim_leaf(self.payer, model_id, epoch, node, units, tree.proof(node))
        return tree


def make_env(url: str | None = None, config: ChainConfig = FAST) -> Env:
    w3 = connect(url, config)
    acc = test_accounts(w3)
    validators = acc[1:4]
    dep = deploy_all(w3, acc[0], [v.address for v in validators], 2,
                     DeployParams(stake_per_unit_wei=10**12, unbonding_delay_s=100, slash_bps=5000), config)
    return Env(ProtocolContracts(w3, dep, config), acc[0], validators, acc[4], acc[5:8], acc[8])


@pytest.fixture
def env() -> Env:
    return make_env()
