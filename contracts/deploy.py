"""Deploy the whole contract suite and read/write the deployment file (chain id, addresses, ABIs)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eth_account.signers.local import LocalAccount
from web3 import Web3

from contracts.build import load_artifact
from contracts.config import ChainConfig
from contracts.errors import DeploymentError
from contracts.revert import error_table
from contracts.tx import Transactor

CONTRACTS = ("ValidatorQuorum", "ShareToken", "ModelRegistry", "NodeRegistry", "ContributionLedger")
FORMAT_VERSION = 1


@dataclass
class DeployParams:
    """Parameters fixed at deployment."""

    stake_per_unit_wei: int = 10**12  # stake per unit of declared node capacity
    unbonding_delay_s: int = 7 * 24 * 3600  # seconds from beginUnbond to withdraw
    slash_bps: int = 5_000  # share of a node's stake slashed per fraudulent leaf (basis points)
    stake_per_stage_wei: int = 10**15  # stake per stage assignment, on top of the capacity stake (Sybil price)

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if self.stake_per_unit_wei < 0:
            raise ValueError("DeployParams.stake_per_unit_wei must be >= 0")
        if not 0 <= self.unbonding_delay_s < 2**64:
            raise ValueError("DeployParams.unbonding_delay_s must fit uint64")
        if not 0 <= self.slash_bps <= 10_000:
            raise ValueError("DeployParams.slash_bps must be in 0..10000")
        if not 0 <= self.stake_per_stage_wei < 2**128:
            raise ValueError("DeployParams.stake_per_stage_wei must be in 0..2**128-1")


@dataclass
class Deployment:
    """Where the contracts live; enough, with an RPC URL, to use them."""

    chain_id: int
    addresses: dict[str, str]  # contract name -> address
    abis: dict[str, list[dict[str, Any]]]  # contract name -> ABI (includes ShareToken for the clones)
    params: dict[str, int] = field(default_factory=dict)  # DeployParams used
    block_number: int = 0  # block of the last deployment transaction

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "format": FORMAT_VERSION,
            "chainId": self.chain_id,
            "addresses": self.addresses,
            "params": self.params,
            "blockNumber": self.block_number,
            "abis": self.abis,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Deployment:
        """Parse; raise DeploymentError naming what is missing."""
        try:
            if data.get("format") != FORMAT_VERSION:
                raise DeploymentError(f"deployment format {data.get('format')!r} unsupported (want {FORMAT_VERSION})")
            dep = cls(int(data["chainId"]), dict(data["addresses"]), dict(data["abis"]), dict(data.get("params", {})),
                      int(data.get("blockNumber", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise DeploymentError(f"deployment data malformed: missing or bad {exc}") from exc
        missing = [c for c in CONTRACTS if c not in dep.abis or (c != "ShareToken" and c not in dep.addresses)]
        if missing:
            raise DeploymentError(f"deployment lacks contracts: {', '.join(missing)}")
        return dep

    def save(self, path: str | Path) -> None:
        """Write the deployment file."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Deployment:
        """Read a deployment file."""
        p = Path(path)
        if not p.is_file():
            raise DeploymentError(f"deployment file {p} does not exist")
        try:
            data = json.loads(p.read_text())
        except ValueError as exc:
            raise DeploymentError(f"deployment file {p} is not JSON: {exc}") from exc
        return cls.from_dict(data)

    def check_chain(self, w3: Web3) -> None:
        """Raise DeploymentError when connected to another chain or the code is missing."""
        chain_id = int(w3.eth.chain_id)
        if chain_id != self.chain_id:
            raise DeploymentError(f"deployment is for chain {self.chain_id}, connected chain is {chain_id}")
        for name, addr in self.addresses.items():
            if not w3.eth.get_code(addr):  # type: ignore[arg-type]
                raise DeploymentError(f"no code for {name} at {addr} on chain {chain_id}")


def deploy_all(w3: Web3, admin: LocalAccount, validators: list[str], quorum: int,
               params: DeployParams | None = None, config: ChainConfig | None = None) -> Deployment:
    """Deploy quorum, share-token implementation, registries and ledger; wire the ledger in."""
    p = params or DeployParams()
    p.validate()
    if not validators:
        raise ValueError("deploy_all: validators must not be empty")
    if not 1 <= quorum <= len(set(validators)):
        raise ValueError(f"deploy_all: quorum must be in 1..{len(set(validators))}, got {quorum}")
    arts = {c: load_artifact(c) for c in CONTRACTS}
    txr = Transactor(w3, config or ChainConfig(), error_table([a["abi"] for a in arts.values()]))
    addr: dict[str, str] = {}

    def dep(name: str, *args: Any) -> str:
        addr[name] = txr.deploy(admin, arts[name]["abi"], arts[name]["bytecode"], *args)
        return addr[name]

    quorum_addr = dep("ValidatorQuorum", admin.address, [Web3.to_checksum_address(v) for v in validators], quorum)
    impl = dep("ShareToken")
    models = dep("ModelRegistry", admin.address, impl)
    nodes = dep("NodeRegistry", admin.address, p.stake_per_unit_wei, p.unbonding_delay_s, p.stake_per_stage_wei,
                models)
    ledger = dep("ContributionLedger", models, nodes, quorum_addr, p.slash_bps)
    for name, target in (("ModelRegistry", models), ("NodeRegistry", nodes)):
        contract = w3.eth.contract(address=target, abi=arts[name]["abi"])  # type: ignore[call-overload]
        sent = txr.transact(admin, contract.functions.setLedger(ledger))
    addr["ShareTokenImplementation"] = addr.pop("ShareToken")
    return Deployment(
        chain_id=int(w3.eth.chain_id),
        addresses=addr,
        abis={c: arts[c]["abi"] for c in CONTRACTS},
        params={"stakePerUnitWei": p.stake_per_unit_wei, "unbondingDelayS": p.unbonding_delay_s,
                "slashBps": p.slash_bps, "stakePerStageWei": p.stake_per_stage_wei, "quorum": quorum},
        block_number=int(sent.receipt["blockNumber"]),
    )
