"""Typed client for the deployed contracts (models, nodes, epochs, shares, revenue)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress
from eth_utils import is_address, to_checksum_address
from web3 import Web3
from web3.contract import Contract
from web3.logs import DISCARD

from contracts import eip712
from contracts.chain import advance_time
from contracts.config import ChainConfig
from contracts.deploy import Deployment
from contracts.errors import InvalidInputError
from contracts.revert import error_table
from contracts.tx import SentTx, Transactor

MODEL_STATUS = ("None", "Proposed", "Training", "Retired")
NODE_STATUS = ("None", "Active", "Unbonding", "Withdrawn")


@dataclass(frozen=True)
class ModelTerms:
    """Terms of a model proposal."""

    spec_hash: bytes  # keccak256 of the canonical model spec (32 bytes)
    metadata_uri: str  # human-readable description
    num_stages: int  # pipeline stages (uint16, >= 1)
    accounting_hash: bytes  # accounting function hash (32 bytes)
    epoch_length: int  # epoch length in the accounting unit (uint64, >= 1)
    challenge_window: int  # seconds a root can be challenged (uint64, >= 1)
    audit_rate_bps: int  # spot-check rate, basis points (0..10000)
    inference_fee_wei: int  # minimum inference fee per request (uint256)

    def as_tuple(self) -> tuple[Any, ...]:
        """ABI tuple of ModelRegistry.Terms, validated."""
        return (
            _b32("spec_hash", self.spec_hash), self.metadata_uri, _uint("num_stages", self.num_stages, 16),
            _b32("accounting_hash", self.accounting_hash), _uint("epoch_length", self.epoch_length, 64),
            _uint("challenge_window", self.challenge_window, 64), _uint("audit_rate_bps", self.audit_rate_bps, 16),
            _uint("inference_fee_wei", self.inference_fee_wei, 256),
        )


@dataclass(frozen=True)
class ModelInfo:
    """A model as stored on chain."""

    model_id: int
    proposer: str
    status: str  # one of MODEL_STATUS
    training_started_at: int
    share_token: str
    terms: ModelTerms


@dataclass(frozen=True)
class NodeInfo:
    """A node as stored on chain."""

    node_key: str
    operator: str
    status: str  # one of NODE_STATUS
    unbonds_at: int
    capacity: int
    stake_wei: int
    bonded_at: int  # when the current bond (registration) started


@dataclass(frozen=True)
class EpochInfo:
    """An epoch root as stored on chain (submitted_at == 0: never submitted)."""

    model_id: int
    epoch: int
    root: bytes
    total_units: int
    receipts_hash: bytes
    submitted_at: int
    voided: bool
    claimed_units: int
    challenge_closes_at: int


@dataclass(frozen=True)
class Payment:
    """A RevenueDeposited event."""

    model_id: int
    request_id: bytes
    payer: str
    amount_wei: int
    tx_hash: bytes


def _b32(name: str, value: bytes) -> bytes:
    if not isinstance(value, bytes | bytearray) or len(value) != 32:
        raise InvalidInputError(f"{name} must be 32 bytes, got {value!r:.80}")
    return bytes(value)


def _uint(name: str, value: int, bits: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**bits:
        raise InvalidInputError(f"{name} must be an integer in 0..2**{bits}-1, got {value!r}")
    return value


def _addr(name: str, value: str) -> str:
    if not isinstance(value, str) or not is_address(value):
        raise InvalidInputError(f"{name} must be an address, got {value!r}")
    return to_checksum_address(value)


class ProtocolContracts:
    """Every call of the contract suite, with Python types and decoded custom errors."""

    def __init__(self, w3: Web3, deployment: Deployment, config: ChainConfig | None = None) -> None:
        self.w3 = w3
        self.deployment = deployment
        self.config = config or ChainConfig()
        self.config.validate()
        self.tx = Transactor(w3, self.config, error_table(list(deployment.abis.values())))
        a, abis = deployment.addresses, deployment.abis
        self.quorum = w3.eth.contract(address=a["ValidatorQuorum"], abi=abis["ValidatorQuorum"])  # type: ignore[call-overload]
        self.models = w3.eth.contract(address=a["ModelRegistry"], abi=abis["ModelRegistry"])  # type: ignore[call-overload]
        self.nodes = w3.eth.contract(address=a["NodeRegistry"], abi=abis["NodeRegistry"])  # type: ignore[call-overload]
        self.ledger = w3.eth.contract(address=a["ContributionLedger"], abi=abis["ContributionLedger"])  # type: ignore[call-overload]
        self._tokens: dict[int, Contract] = {}
        self.last_tx: SentTx | None = None

    # -- plumbing ----------------------------------------------------------------------------------

    def _send(self, account: LocalAccount, fn: Any, value: int = 0) -> SentTx:
        self.last_tx = self.tx.transact(account, fn, value=value)
        return self.last_tx

    def _call(self, fn: Any) -> Any:
        return self.tx.call(fn)

    @property
    def chain_id(self) -> int:
        """The deployment's chain id."""
        return self.deployment.chain_id

    def advance_time(self, seconds: int) -> int:
        """Move chain time forward (embedded chain or anvil); return the new timestamp."""
        return advance_time(self.w3, seconds)

    # -- models ------------------------------------------------------------------------------------

    def propose_model(self, account: LocalAccount, spec_hash: bytes, metadata_uri: str, num_stages: int,
                      accounting_hash: bytes, epoch_length: int, challenge_window: int, audit_rate_bps: int,
                      inference_fee_wei: int) -> int:
        """Propose a model; return its id."""
        terms = ModelTerms(spec_hash, metadata_uri, num_stages, accounting_hash, epoch_length, challenge_window,
                           audit_rate_bps, inference_fee_wei)
        sent = self._send(account, self.models.functions.propose(terms.as_tuple()))
        (event,) = self.models.events.ModelProposed().process_receipt(sent.receipt, errors=DISCARD)
        return int(event["args"]["modelId"])

    def amend_terms(self, account: LocalAccount, model_id: int, terms: ModelTerms) -> None:
        """Replace the terms of a model that has not started training (proposer only)."""
        self._send(account, self.models.functions.amendTerms(_uint("model_id", model_id, 256), terms.as_tuple()))

    def start_training(self, account: LocalAccount, model_id: int) -> None:
        """Freeze the terms and open the model for epoch roots (proposer only)."""
        self._send(account, self.models.functions.startTraining(_uint("model_id", model_id, 256)))

    def retire_model(self, account: LocalAccount, model_id: int) -> None:
        """Retire the model (proposer only)."""
        self._send(account, self.models.functions.retire(_uint("model_id", model_id, 256)))

    def get_model(self, model_id: int) -> ModelInfo:
        """The stored model; ContractRevertError(ModelRegistryUnknownModel) if absent."""
        m = self._call(self.models.functions.getModel(_uint("model_id", model_id, 256)))
        proposer, status, started, token, t = m
        return ModelInfo(model_id, proposer, MODEL_STATUS[status], started, token,
                         ModelTerms(bytes(t[0]), t[1], t[2], bytes(t[3]), t[4], t[5], t[6], t[7]))

    def model_count(self) -> int:
        """Number of models proposed so far."""
        return int(self._call(self.models.functions.modelCount()))

    def list_models(self) -> list[ModelInfo]:
        """All models, by id."""
        return [self.get_model(i) for i in range(1, self.model_count() + 1)]

    # -- nodes -------------------------------------------------------------------------------------

    def registration_nonce(self, node_key: str) -> int:
        """Current Registration nonce of a node key."""
        return int(self._call(self.nodes.functions.nonces(_addr("node_key", node_key))))

    def registration_typed_data(self, operator: str, node_key: str, capacity: int) -> dict[str, Any]:
        """The EIP-712 Registration message the node key must sign."""
        return eip712.registration_typed_data(self.chain_id, self.nodes.address, _addr("operator", operator),
                                              _addr("node_key", node_key), capacity, self.registration_nonce(node_key))

    def stake_required(self, capacity: int) -> int:
        """Minimum stake in wei for a capacity."""
        return _uint("capacity", capacity, 256) * int(self._call(self.nodes.functions.stakePerUnit()))

    def register_node(self, operator: LocalAccount, node_key: LocalAccount, capacity: int,
                      stake_wei: int | None = None) -> None:
        """Register `node_key` (the node's secp256k1 node key) operated by `operator`, signing the proof with node_key."""
        sig = eip712.sign(node_key, self.registration_typed_data(operator.address, node_key.address, capacity))
        self.register_node_signed(operator, node_key.address, capacity, sig, stake_wei)

    def register_node_signed(self, operator: LocalAccount, node_key: str, capacity: int, signature: bytes,
                             stake_wei: int | None = None) -> None:
        """Register with a Registration signature produced elsewhere (e.g. by the node's daemon)."""
        stake = self.stake_required(capacity) if stake_wei is None else _uint("stake_wei", stake_wei, 256)
        self._send(operator, self.nodes.functions.register(_addr("node_key", node_key), capacity, bytes(signature)),
                   value=stake)

    def node_info(self, node_key: str) -> NodeInfo:
        """The stored node (status "None" when never registered)."""
        op, status, unbonds_at, bonded_at, capacity, stake = self._call(
            self.nodes.functions.getNode(_addr("node_key", node_key)))
        return NodeInfo(to_checksum_address(node_key), op, NODE_STATUS[status], unbonds_at, capacity, stake, bonded_at)

    def begin_unbond(self, operator: LocalAccount, node_key: str) -> None:
        """Start the unbonding delay (operator only)."""
        self._send(operator, self.nodes.functions.beginUnbond(_addr("node_key", node_key)))

    def withdraw_stake(self, operator: LocalAccount, node_key: str) -> None:
        """Withdraw the remaining stake after the delay (operator only)."""
        self._send(operator, self.nodes.functions.withdraw(_addr("node_key", node_key)))

    def slash(self, account: LocalAccount, node_key: str, amount_wei: int, evidence: bytes) -> None:
        """Slash directly; only the ledger may, so this reverts NodeRegistryNotLedger for anyone else."""
        self._send(account, self.nodes.functions.slash(_addr("node_key", node_key), _uint("amount_wei", amount_wei, 256),
                                                       _b32("evidence", evidence)))

    # -- stages (one operator, one stage per model; stake per stage) -----------------------------------

    def stake_per_stage(self) -> int:
        """Stake in wei each stage assignment needs on top of the capacity stake."""
        return int(self._call(self.nodes.functions.stakePerStage()))

    def assignments_of(self, node_key: str) -> int:
        """Number of stages (over all models) the node holds."""
        return int(self._call(self.nodes.functions.assignmentsOf(_addr("node_key", node_key))))

    def stage_stake_missing(self, node_key: str) -> int:
        """Wei the node must add to its stake to take one more stage (0 when its stake already covers it)."""
        info = self.node_info(node_key)
        required = int(self._call(self.nodes.functions.stageStakeRequired(
            info.capacity, self.assignments_of(node_key) + 1)))
        return max(0, required - info.stake_wei)

    def assign_stage(self, operator: LocalAccount, node_key: str, model_id: int, stage: int,
                     stake_wei: int | None = None) -> None:
        """Assign the node to `stage` of the model (operator only), adding `stake_wei` to its stake.

        Default `stake_wei`: exactly what the node lacks for one more stage (`stage_stake_missing`). Refusals raise
        `StageAssignmentError` (another stage held by the operator, stake short, bad stage, closed model) or
        `ContractRevertError` (unknown node, not the operator, node not active).
        """
        node_key = _addr("node_key", node_key)
        value = self.stage_stake_missing(node_key) if stake_wei is None else _uint("stake_wei", stake_wei, 256)
        self._send(operator, self.nodes.functions.assignStage(
            node_key, _uint("model_id", model_id, 256), _uint("stage", stage, 16)), value=value)

    def leave_stage(self, operator: LocalAccount, node_key: str, model_id: int) -> None:
        """Drop the node's assignment to its stage of the model (operator only); its stake stays bonded."""
        self._send(operator, self.nodes.functions.leaveStage(_addr("node_key", node_key),
                                                             _uint("model_id", model_id, 256)))

    def stage_of(self, model_id: int, node_key: str) -> int | None:
        """The stage the node is assigned to in the model, or None (whatever its stake; see `serves_stage`)."""
        assigned, stage = self._call(self.nodes.functions.stageOf(_uint("model_id", model_id, 256),
                                                                  _addr("node_key", node_key)))
        return int(stage) if assigned else None

    def operator_stage_of(self, model_id: int, operator: str) -> int | None:
        """The stage the operator holds in the model (through any of its node keys), or None."""
        assigned, stage = self._call(self.nodes.functions.operatorStageOf(_uint("model_id", model_id, 256),
                                                                          _addr("operator", operator)))
        return int(stage) if assigned else None

    def serves_stage(self, model_id: int, node_key: str, stage: int) -> bool:
        """Whether the node may serve `stage` now: assigned to it, active, and its stake still covers all it holds."""
        return bool(self._call(self.nodes.functions.servesStage(
            _uint("model_id", model_id, 256), _addr("node_key", node_key), _uint("stage", stage, 16))))

    # -- epochs ------------------------------------------------------------------------------------

    def epoch_root_typed_data(self, model_id: int, epoch: int, root: bytes, total_units: int,
                              receipts_hash: bytes) -> dict[str, Any]:
        """The EIP-712 EpochRoot message validators sign."""
        return eip712.epoch_root_typed_data(self.chain_id, self.ledger.address, model_id, epoch, root, total_units,
                                            receipts_hash)

    def fraud_typed_data(self, model_id: int, epoch: int, node: str | None, evidence: bytes) -> dict[str, Any]:
        """The EIP-712 Fraud message validators sign against one node's leaf."""
        return eip712.fraud_typed_data(self.chain_id, self.ledger.address, model_id, epoch, node, evidence)

    def root_fraud_typed_data(self, model_id: int, epoch: int, evidence: bytes,
                              root: bytes | None = None) -> dict[str, Any]:
        """The EIP-712 RootFraud message validators sign to void `root` (default: the epoch's root on chain)."""
        if root is None:
            root = self.epoch_info(model_id, epoch).root
        return eip712.root_fraud_typed_data(self.chain_id, self.ledger.address, model_id, epoch, _b32("root", root),
                                            evidence)

    def submit_epoch_root(self, account: LocalAccount, model_id: int, epoch: int, root: bytes, total_units: int,
                          receipts_hash: bytes, signatures: list[bytes]) -> None:
        """Submit a quorum-attested epoch root."""
        self._send(account, self.ledger.functions.submitEpochRoot(
            _uint("model_id", model_id, 256), _uint("epoch", epoch, 64), _b32("root", root),
            _uint("total_units", total_units, 256), _b32("receipts_hash", receipts_hash), [bytes(s) for s in signatures]))

    def challenge_leaf(self, account: LocalAccount, model_id: int, epoch: int, node: str, evidence: bytes,
                       signatures: list[bytes]) -> None:
        """Void one node's leaf (and slash it) with a quorum-signed Fraud verdict."""
        self._send(account, self.ledger.functions.challengeLeaf(
            _uint("model_id", model_id, 256), _uint("epoch", epoch, 64), _addr("node", node), _b32("evidence", evidence),
            [bytes(s) for s in signatures]))

    def challenge_root(self, account: LocalAccount, model_id: int, epoch: int, evidence: bytes,
                       signatures: list[bytes]) -> None:
        """Void the epoch's live root for good with a quorum-signed RootFraud verdict naming it."""
        self._send(account, self.ledger.functions.challengeRoot(
            _uint("model_id", model_id, 256), _uint("epoch", epoch, 64), _b32("evidence", evidence),
            [bytes(s) for s in signatures]))

    def claim_leaf(self, account: LocalAccount, model_id: int, epoch: int, node: str, units: int,
                   proof: list[bytes]) -> None:
        """Mint a leaf's shares to its node's operator after the challenge window (any caller)."""
        self._send(account, self.ledger.functions.claimLeaf(
            _uint("model_id", model_id, 256), _uint("epoch", epoch, 64), _addr("node", node),
            _uint("units", units, 256), [_b32("proof item", p) for p in proof]))

    def epoch_info(self, model_id: int, epoch: int) -> EpochInfo:
        """The stored epoch root."""
        root, total, rh, at, voided, claimed = self._call(
            self.ledger.functions.getEpoch(_uint("model_id", model_id, 256), _uint("epoch", epoch, 64)))
        closes = at + self.get_model(model_id).terms.challenge_window if at else 0
        return EpochInfo(model_id, epoch, bytes(root), total, bytes(rh), at, voided, claimed, closes)

    def is_leaf_claimed(self, model_id: int, epoch: int, node: str) -> bool:
        """Whether the node's leaf of that epoch was claimed."""
        return bool(self._call(self.ledger.functions.isLeafClaimed(model_id, epoch, _addr("node", node))))

    def is_root_voided(self, model_id: int, epoch: int, root: bytes) -> bool:
        """Whether `root` was voided for that epoch (it can then never be submitted again)."""
        return bool(self._call(self.ledger.functions.isRootVoided(
            _uint("model_id", model_id, 256), _uint("epoch", epoch, 64), _b32("root", root))))

    def is_leaf_voided(self, model_id: int, epoch: int, node: str) -> bool:
        """Whether the node's leaf of that epoch was voided."""
        return bool(self._call(self.ledger.functions.isLeafVoided(model_id, epoch, _addr("node", node))))

    # -- shares and revenue ------------------------------------------------------------------------

    def share_token(self, model_id: int) -> ChecksumAddress:
        """Address of the model's ShareToken."""
        return to_checksum_address(self._call(self.models.functions.shareTokenOf(_uint("model_id", model_id, 256))))

    def token(self, model_id: int) -> Contract:
        """The model's ShareToken contract object."""
        if model_id not in self._tokens:
            self._tokens[model_id] = self.w3.eth.contract(  # type: ignore[call-overload]
                address=self.share_token(model_id), abi=self.deployment.abis["ShareToken"])
        return self._tokens[model_id]

    def balance_of(self, model_id: int, holder: str) -> int:
        """Shares held."""
        return int(self._call(self.token(model_id).functions.balanceOf(_addr("holder", holder))))

    def total_supply(self, model_id: int) -> int:
        """Shares in existence."""
        return int(self._call(self.token(model_id).functions.totalSupply()))

    def transfer(self, account: LocalAccount, model_id: int, to: str, amount: int) -> None:
        """Transfer shares."""
        self._send(account, self.token(model_id).functions.transfer(_addr("to", to), _uint("amount", amount, 256)))

    def deposit_revenue(self, account: LocalAccount, model_id: int, value_wei: int, request_id: bytes) -> bytes:
        """Pay inference revenue to the model's holders; return the transaction hash."""
        sent = self._send(account, self.token(model_id).functions.deposit(_b32("request_id", request_id)),
                          value=_uint("value_wei", value_wei, 256))
        return sent.tx_hash

    def claimable(self, model_id: int, holder: str) -> int:
        """Revenue accrued to `holder` and not yet claimed (wei)."""
        return int(self._call(self.token(model_id).functions.claimableOf(_addr("holder", holder))))

    def claimed(self, model_id: int, holder: str) -> int:
        """Revenue already claimed by `holder` (wei)."""
        return int(self._call(self.token(model_id).functions.claimedOf(_addr("holder", holder))))

    def claim_revenue(self, model_id: int, account: LocalAccount) -> int:
        """Claim everything accrued to `account`; return the wei paid."""
        sent = self._send(account, self.token(model_id).functions.claim())
        (event,) = self.token(model_id).events.RevenueClaimed().process_receipt(sent.receipt, errors=DISCARD)
        return int(event["args"]["amount"])

    def payment(self, model_id: int, tx_hash: bytes) -> Payment | None:
        """The RevenueDeposited event of a successful transaction to this model's token, if any."""
        try:
            receipt = self.tx.retry(lambda: self.w3.eth.get_transaction_receipt(tx_hash))  # type: ignore[arg-type]
        except Exception as exc:  # TransactionNotFound and malformed hashes
            if type(exc).__name__ in ("TransactionNotFound", "Web3ValidationError", "Web3ValueError"):
                return None
            raise
        if receipt["status"] != 1:
            return None
        token = self.token(model_id)
        for log in receipt["logs"]:
            if log["address"] != token.address:
                continue
            try:
                ev = token.events.RevenueDeposited().process_log(log)
            except Exception:  # another event of the token
                continue
            if ev["args"]["modelId"] != model_id:
                continue
            return Payment(model_id, bytes(ev["args"]["requestId"]), ev["args"]["payer"], int(ev["args"]["amount"]),
                           bytes(tx_hash))
        return None

    def verify_payment(self, model_id: int, tx_hash: bytes, min_fee_wei: int) -> bool:
        """True when `tx_hash` deposited at least `min_fee_wei` to this model's holders."""
        p = self.payment(model_id, tx_hash)
        return p is not None and p.amount_wei >= min_fee_wei

    # -- validators --------------------------------------------------------------------------------

    def quorum_size(self) -> int:
        """Signatures needed."""
        return int(self._call(self.quorum.functions.quorum()))

    def set_quorum(self, admin: LocalAccount, quorum: int) -> None:
        """Change the number of validator signatures needed (quorum admin only)."""
        self._send(admin, self.quorum.functions.setQuorum(_uint("quorum", quorum, 256)))

    def set_validator(self, admin: LocalAccount, address: str, enabled: bool) -> None:
        """Grant or revoke VALIDATOR_ROLE (quorum admin only)."""
        role = self._call(self.quorum.functions.VALIDATOR_ROLE())
        fn = self.quorum.functions.grantRole if enabled else self.quorum.functions.revokeRole
        self._send(admin, fn(role, _addr("address", address)))

    def validators(self) -> list[str]:
        """Every validator (= registered attester), sorted by address as the audit sampling rule expects."""
        return sorted((to_checksum_address(a) for a in self._call(self.quorum.functions.validators())),
                      key=lambda a: int(a, 16))

    def is_validator(self, address: str) -> bool:
        """Whether `address` holds VALIDATOR_ROLE."""
        role = self._call(self.quorum.functions.VALIDATOR_ROLE())
        return bool(self._call(self.quorum.functions.hasRole(role, _addr("address", address))))
