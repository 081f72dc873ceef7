"""Fixtures: an embedded chain with the suite deployed, and helpers to mint shares through the ledger."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import Web3

from contracts.chain import connect, test_accounts
from contracts.client import ProtocolContracts
from contracts.config import ChainConfig
from contracts.deploy import DeployParams, deploy_all
from contracts.eip712 import sign_quorum
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
        self.pc.submit_epoch_root(self.payer, model_id, epoch, tree.root, tree.total_units, b"\x33" * 32,
                                  self.root_signatures(tree))
        return tree

    def root_signatures(self, tree: ContributionTree) -> list[bytes]:
        """Quorum signatures over the tree's EpochRoot."""
        typed = self.pc.epoch_root_typed_data(tree.model_id, tree.epoch, tree.root, tree.total_units, b"\x33" * 32)
        return sign_quorum(self.validators[:2], typed)

    def void_root(self, model_id: int, epoch: int, evidence: bytes = b"\xab" * 32) -> list[bytes]:
        """Void the epoch's live root with a quorum RootFraud verdict; return the verdict's signatures."""
        sigs = sign_quorum(self.validators[:2], self.pc.root_fraud_typed_data(model_id, epoch, evidence))
        self.pc.challenge_root(self.payer, model_id, epoch, evidence, sigs)
        return sigs

    def condemn_leaf(self, model_id: int, epoch: int, node: str, evidence: bytes = b"\xee" * 32) -> None:
        """Void a node's leaf (and slash it) with a quorum Fraud verdict."""
        sigs = sign_quorum(self.validators[:2], self.pc.fraud_typed_data(model_id, epoch, node, evidence))
        self.pc.challenge_leaf(self.payer, model_id, epoch, node, evidence, sigs)

    def settle_and_claim(self, model_id: int, epoch: int, contributions: dict[str, int]) -> ContributionTree:
        tree = self.submit(model_id, epoch, contributions)
        self.pc.advance_time(WINDOW)
        for node, units in contributions.items():
            self.pc.claim_leaf(self.payer, model_id, epoch, node, units, tree.proof(node))
        return tree


def rich_chain(balance_wei: int = 10**33) -> Web3:
    """An embedded chain whose test accounts hold `balance_wei` each (deposits up to 1e30 wei need it)."""
    from eth_tester import EthereumTester, PyEVMBackend
    from web3 import EthereumTesterProvider

    state = PyEVMBackend.generate_genesis_state(overrides={"balance": balance_wei}, num_accounts=10)
    return Web3(EthereumTesterProvider(EthereumTester(PyEVMBackend(genesis_state=state))))


def make_env(url: str | None = None, config: ChainConfig = FAST, w3: Web3 | None = None,
             unbonding_delay_s: int = 100) -> Env:
    w3 = w3 or connect(url, config)
    acc = test_accounts(w3)
    validators = acc[1:4]
    dep = deploy_all(w3, acc[0], [v.address for v in validators], 2,
                     DeployParams(stake_per_unit_wei=10**12, unbonding_delay_s=unbonding_delay_s, slash_bps=5000),
                     config)
    return Env(ProtocolContracts(w3, dep, config), acc[0], validators, acc[4], acc[5:8], acc[8])


@pytest.fixture
def env() -> Env:
    return make_env()
