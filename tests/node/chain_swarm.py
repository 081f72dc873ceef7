"""Helpers for node processes on the embedded chain served over JSON-RPC: the deployed world, registration,
stage assignment, waiting for the swarm to serve, and settling and auditing its epochs."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contracts.chain import connect, test_accounts
from contracts.client import ProtocolContracts
from contracts.deploy import deploy_all
from contracts.embedded import serve_embedded
from node.net.identity import NodeIdentity, load_or_create_identity
from node.observability.status import node_status
from node.testing.swarm import NodeProcess
from tests.waiting import wait_until


@dataclass
class Chain:
    w3: Any
    rpc_url: str
    client: ProtocolContracts
    deployment: Path
    researcher: Any
    validators: list[Any]
    funder: Any


def deployed_chain(tmp_path: Path) -> Iterator[Chain]:
    """The contracts on the embedded chain, served over JSON-RPC while the generator is open (a fixture's body)."""
    w3 = connect(None)
    rpc_url, stop = serve_embedded(w3)
    try:
        accounts = test_accounts(w3)
        validators = accounts[3:6]  # three attesters: each audits one stage per window
        deployment = deploy_all(w3, accounts[0], [v.address for v in validators], 2)
        path = tmp_path / "deployment.json"
        deployment.save(path)
        yield Chain(w3, rpc_url, ProtocolContracts(w3, deployment), path, accounts[1], validators, accounts[6])
    finally:
        stop()


def register(c: Chain, data_dir: Path) -> NodeIdentity:
    """The node key of `data_dir`, funded and registered with the stake of one stage."""
    ident = load_or_create_identity(data_dir)
    c.client.tx.transact(c.funder, to=ident.address, value=10**18)
    c.client.register_node(ident.account, ident.account, 1, c.client.stake_required(1))
    return ident


def assign(c: Chain, ident: NodeIdentity, model_id: int, stage: int) -> None:
    c.client.assign_stage(ident.account, ident.address, model_id, stage)


def wait_serving(nodes: list[NodeProcess], timeout_s: float = 180.0) -> None:
    """Until every node reports state serving (AssertionError with a node's stderr if one exited)."""
    def serving() -> bool:
        for n in nodes:
            assert n.proc.poll() is None, (n.data_dir / "stderr.log").read_text()[-2000:]
        return all(node_status(n.data_dir).get("state") == "serving" for n in nodes)

    wait_until(serving, timeout_s, "every node serving",
               detail=lambda: [node_status(n.data_dir).get("state") for n in nodes])
