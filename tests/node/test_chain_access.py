"""The chain-backed access policy against the embedded chain served over JSON-RPC.

Real hosts (Noise, yamux) and a real `/pmn/state/1.0.0` service of stage 1 guarded by `ChainAccessPolicy`:
a node key assigned to stage 1 is served; one of stage 2, an unregistered identity and an unbonding node
are refused after the bounded request header (no body is read, none exists), and each refusal is scored.
Audits: only validators, only the hops `may_request` selects, only once the epoch's root is on chain.
Announcements: only entries whose node key serves the announced stage, capacity within the chain's record.
A dead RPC refuses cleanly. `benchmarks/extraction.py --quick` runs last (real node processes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import multiaddr
import pytest
import trio

from contracts import eip712
from contracts.chain import connect, disconnect, test_accounts
from contracts.client import ProtocolContracts
from contracts.deploy import deploy_all
from contracts.embedded import serve_embedded
from node.errors import ChainUnavailableError, NotAuthorizedError
from node.net.access import ACT, AUDIT, STATE, AuditRequest
from node.net.discovery import Announcement
from node.net.host import make_host
from node.net.identity import NodeIdentity, bind, identity_from_secret
from node.net.running import run_host
from node.replicas.averaging import read_msg, write_msg
from node.replicas.statesync import STATE_PROTOCOL, StateService
from node.services.chain_access import ChainAccessConfig, ChainAccessPolicy
from protocol.accounting import accounting_function_hash
from protocol.audit_sampling import BACKWARD, FORWARD, attester_stage, may_request, seed_from_chain
from protocol.payments import ChainLink, connect_chain

pytestmark = [pytest.mark.network, pytest.mark.timeout(180)]

STAGES = 3
SPEC = bytes(range(32))
LISTEN = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]


@dataclass
class World:
    w3: Any
    rpc_url: str
    client: ProtocolContracts
    deployment: Path
    model_id: int
    validators: list[Any]
    nodes: dict[str, NodeIdentity]  # name -> identity (see the fixture)
    stop: Any


def _identity(seed: int) -> NodeIdentity:
    return identity_from_secret(seed.to_bytes(32, "big"))


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w3 = connect(None)
    rpc_url, stop = serve_embedded(w3)
    stopped = False

    def stop_once() -> None:
        nonlocal stopped
        if not stopped:
            stopped = True
            stop()

    try:
        accounts = test_accounts(w3)
        validators = accounts[3:6]
        deployment = deploy_all(w3, accounts[0], [v.address for v in validators], 2)
        path = tmp_path / "deployment.json"
        deployment.save(path)
        client = ProtocolContracts(w3, deployment)
        model_id = client.propose_model(accounts[1], SPEC, "test:chain-access", STAGES, accounting_function_hash(),
                                        4, 600, 5_000, 0)
        client.start_training(accounts[1], model_id)
        nodes: dict[str, NodeIdentity] = {}
        # name -> (stage or None); "unbonding" held stage 1, left it and began to unbond
        for i, (name, stage) in enumerate([("server", 1), ("peer1", 1), ("peer2", 2), ("peer0", 0),
                                           ("unbonding", 1), ("outsider", None)]):
            ident = _identity(1000 + i)
            nodes[name] = ident
            if stage is None:
                continue
            client.tx.transact(accounts[6], to=ident.address, value=10**18)
            client.register_node(ident.account, ident.account, 1, client.stake_required(1))
            client.assign_stage(ident.account, ident.address, model_id, stage)
        # leaving its stage is the only way to unbond (contracts/SECURITY.md): it then serves nothing
        client.leave_stage(nodes["unbonding"].account, nodes["unbonding"].address, model_id)
        client.begin_unbond(nodes["unbonding"].account, nodes["unbonding"].address)
        yield World(w3, rpc_url, client, path, model_id, validators, nodes, stop_once)
    finally:
        stop_once()
        disconnect(w3)


def _policy(world: World, **cfg: Any) -> tuple[ChainLink, ChainAccessPolicy]:
    link = connect_chain(world.rpc_url, str(world.deployment), world.model_id)
    return link, ChainAccessPolicy(link, ChainAccessConfig(**cfg))


def _submit_root(world: World, epoch: int) -> None:
    c, root, units, receipts_hash = world.client, os.urandom(32), 1, os.urandom(32)
    typed = c.epoch_root_typed_data(world.model_id, epoch, root, units, receipts_hash)
    signers = sorted(world.validators[:2], key=lambda a: int(a.address, 16))
    c.submit_epoch_root(world.validators[0], world.model_id, epoch, root, units, receipts_hash,
                        [eip712.sign(a, typed) for a in signers])


async def _ask_state(host: Any, addr: str, stage: int) -> dict[str, Any]:
    from node.net.host import parse_peer_addr

    info = parse_peer_addr(addr)
    await host.connect(info)
    stream = await host.new_stream(info.peer_id, [STATE_PROTOCOL])
    try:
        await write_msg(stream, {"spec_hash": "ab" * 32, "stage": stage})
        header, blob = await read_msg(stream, 1 << 20)
    finally:
        await stream.close()
    return {**header, "blob": len(blob)}


def test_state_only_for_registered_nodes_of_the_same_stage(world: World) -> None:
    link, policy = _policy(world)
    served: list[int] = []

    async def snapshot(stage: int) -> tuple[dict[str, Any], bytes] | None:
        served.append(stage)
        return ({"stage": stage}, b"w" * 1000) if stage == 1 else None

    async def main() -> dict[str, Any]:
        server = make_host(world.nodes["server"])
        async with run_host(server, LISTEN):
            service = StateService(server, "ab" * 32, snapshot, 10.0, policy=policy)
            addr = f"{server.get_transport_addrs()[0]}/p2p/{server.get_id().pretty()}"
            out: dict[str, Any] = {}
            for name in ("peer1", "peer2", "outsider", "unbonding"):
                ident = world.nodes[name]
                client = make_host(ident)
                # the binding the peer proved at a handshake (what discovery or the HELLO would give the policy)
                policy.note_binding(client.get_id(), ident.address, bind(ident))
                async with run_host(client, LISTEN):
                    with trio.fail_after(20):
                        out[name] = await _ask_state(client, addr, 1)
                    out[name]["score"] = service.gate.scores.score(client.get_id().pretty())
            return out

    try:
        out = trio.run(main)
    finally:
        link.close()
    assert out["peer1"] == {"stage": 1, "blob": 1000, "score": 0.0}, policy.refused
    for name in ("peer2", "outsider", "unbonding"):
        assert out[name]["error"] == "not authorized" and out[name]["blob"] == 0, (name, out[name])
        assert out[name]["score"] < 0, name  # counted against the peer
        assert "ab" * 8 not in json.dumps(out[name])  # the refusal does not name the model
    assert served == [1]  # the snapshot (the stage's state) was taken for the registered stage-1 peer only
    assert policy.refused == {"not_on_chain": 3}


def test_act_only_from_registered_neighbours_and_announcements_checked_against_chain(world: World) -> None:
    link, policy = _policy(world)

    class Directory:  # what the policy reads of discovery: our own (stage 1) announcement, no other entries
        me = Announcement(peer_id="x", addrs=(), spec_hash="ab", num_stages=STAGES, stage=1, capacity=1)

        def entries(self, max_age_s: float | None = None) -> list[Any]:
            return []

        async def learn(self, peer_id: Any) -> None:
            return None

    policy.attach(Directory())

    def announce(name: str, stage: int, capacity: int = 1) -> Announcement:
        ident = world.nodes[name]
        return Announcement(peer_id=ident.peer_id.pretty(), addrs=("/ip4/127.0.0.1/tcp/1",), spec_hash="ab",
                            num_stages=STAGES, stage=stage, capacity=capacity).sign(ident)

    async def main() -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, stage in (("peer0", 0), ("peer2", 2), ("peer1", 1), ("outsider", 0), ("peer2", 0)):
            ident = world.nodes[name]
            policy.note_binding(ident.peer_id, ident.address, bind(ident))
            try:
                await policy.check(ident.peer_id, ACT, stage)
                out[f"act {name}@{stage}"] = "ok"
            except NotAuthorizedError:
                out[f"act {name}@{stage}"] = "refused"
        for name, stage, cap in (("peer2", 2, 1), ("peer2", 0, 1), ("peer2", 2, 50), ("outsider", 0, 1),
                                 ("unbonding", 1, 1), ("peer0", -1, 1)):
            out[f"ann {name}@{stage}x{cap}"] = await policy.admit(announce(name, stage, cap))
        other = replace(announce("peer2", 2), spec_hash="cd")
        out["ann other model"] = await policy.admit(other)
        return out

    try:
        out = trio.run(main)
    finally:
        link.close()
    assert out == {
        "act peer0@0": "ok", "act peer2@2": "ok",  # registered neighbours
        "act peer1@1": "refused",  # our own stage is no neighbour
        "act outsider@0": "refused", "act peer2@0": "refused",  # unregistered; a stage its key does not serve
        "ann peer2@2x1": None, "ann peer2@0x1": "not_on_chain", "ann peer2@2x50": "capacity",
        "ann outsider@0x1": "not_on_chain", "ann unbonding@1x1": "not_on_chain", "ann peer0@-1x1": None,
        "ann other model": "other_model"}


def test_attester_gets_only_sampled_hops_after_the_root(world: World) -> None:
    link, policy = _policy(world)
    validators = [v.address for v in world.validators]
    attester = world.validators[0]
    ident = identity_from_secret(bytes(attester.key))
    binding = bind(ident)
    stage = attester_stage(attester.address, world.model_id, 0, STAGES, validators)
    assert stage is not None

    def request(step: int, mb: int, hop_stage: int, direction: int, who: NodeIdentity = ident,
                sig: bytes | None = None, kind: str = "hop") -> AuditRequest:
        return AuditRequest(kind, step, mb, direction, step // 4, stage=hop_stage, attester=who.address,
                            binding=binding if sig is None else sig)

    async def verdict(req: AuditRequest, peer: Any = ident.peer_id) -> bool:
        try:
            await policy.check_audit(peer, req)
            return True
        except NotAuthorizedError:
            return False

    async def main() -> dict[str, Any]:
        direction = BACKWARD if stage == STAGES - 1 else FORWARD
        hops = [(s, m) for s in range(4) for m in range(8)]
        before = [await verdict(request(s, m, stage, direction)) for s, m in hops]
        await policy.check(ident.peer_id, AUDIT, stage)  # the stream is open: every request is checked
        await trio.to_thread.run_sync(_submit_root, world, 0)
        policy._cache.clear()  # the "no root yet" answer would be trusted for negative_ttl_s
        seed = seed_from_chain(world.client, world.model_id, 0)
        expected = [may_request(seed, attester.address, world.model_id, 0, STAGES, validators,
                                (world.model_id, 0, s, m, stage, direction), 5_000) for s, m in hops]
        after = [await verdict(request(s, m, stage, direction)) for s, m in hops]
        other = [await verdict(request(s, m, (stage + 1) % STAGES, FORWARD)) for s, m in hops]
        node = world.nodes["peer1"]  # a registered node, no validator: refused even with a valid binding
        nonvalidator = await verdict(AuditRequest("hop", 0, 0, 0, 0, stage=1, attester=node.address,
                                                  binding=bind(node)), node.peer_id)
        stolen = await verdict(request(0, 0, stage, direction), world.nodes["outsider"].peer_id)  # replayed binding
        receipts = await verdict(request(-1, -1, -1, -1, kind="receipts"))
        return {"before": before, "after": after, "expected": expected, "other": other,
                "nonvalidator": nonvalidator, "stolen": stolen, "receipts": receipts}

    try:
        out = trio.run(main)
    finally:
        link.close()
    assert not any(out["before"])  # nothing before the epoch's root is on chain
    assert out["after"] == out["expected"] and 0 < sum(out["after"]) < len(out["after"])  # rate 0.5: a sample
    assert not any(out["other"])  # never a hop of another stage
    assert not out["nonvalidator"] and not out["stolen"] and out["receipts"]


def test_dead_rpc_refuses_cleanly(world: World) -> None:
    link, policy = _policy(world, rpc_timeout_s=2.0)
    peer = world.nodes["peer1"]
    policy.note_binding(peer.peer_id, peer.address, bind(peer))
    world.stop()  # the chain goes away

    async def main() -> list[str]:
        errors = []
        for _ in range(3):
            with trio.fail_after(10):
                try:
                    await policy.check(peer.peer_id, STATE, 1)
                except ChainUnavailableError as exc:
                    errors.append(str(exc))
        ann = Announcement(peer_id=peer.peer_id.pretty(), addrs=(), spec_hash="ab", num_stages=STAGES, stage=1,
                           capacity=1).sign(peer)
        errors.append(str(await policy.admit(ann)))
        return errors

    try:
        errors = trio.run(main)
    finally:
        link.close()
    assert len(errors) == 4 and all("chain" in e for e in errors), errors
    assert errors[-1] == "chain_unavailable"  # an announcement is dropped, its sender not blamed
    assert "refused" in errors[0]


def test_outage_keeps_peers_the_chain_vouched_for(world: World) -> None:
    """During an outage an expired positive answer still counts (training goes on); nothing else does."""
    link, policy = _policy(world, ttl_s=0.0, negative_ttl_s=0.0, rpc_timeout_s=2.0)
    known, unknown = world.nodes["peer1"], world.nodes["server"]  # both serve stage 1 on chain
    for ident in (known, unknown):
        policy.note_binding(ident.peer_id, ident.address, bind(ident))

    async def verdict(ident: NodeIdentity) -> str:
        try:
            with trio.fail_after(10):
                await policy.check(ident.peer_id, STATE, 1)
            return "ok"
        except ChainUnavailableError:
            return "unavailable"

    async def main() -> list[str]:
        before = await verdict(known)  # asked while the chain was up: cached, expires at once (ttl_s=0)
        world.stop()  # the chain goes away
        during = [await verdict(known), await verdict(unknown), await verdict(known)]
        policy.config.stale_ok_s = 0.0  # an operator who trusts no stale answer
        return [before, *during, await verdict(known)]

    try:
        out = trio.run(main)
    finally:
        link.close()
    assert out == ["ok", "ok", "unavailable", "ok", "unavailable"]
    assert policy.stale_served == 2
    assert policy.refused == {"chain": 2}  # refusals not counted against the peers


@pytest.mark.timeout(240)
def test_extraction_benchmark_quick() -> None:
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "benchmarks/extraction.py", "--quick"], cwd=root, capture_output=True,
                          text=True, timeout=220, env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["outsider_fraction"] == 0.0
    assert 0 < out["node_fraction"] < 1 and out["node_fraction"] == pytest.approx(out["node_stage_share"])
    assert out["attester_fraction"] <= out["attester_max_stage_share"] + 1e-9
    assert out["min_identities_for_full_model"] == out["stages"] == STAGES
