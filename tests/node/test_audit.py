"""Spot checks over libp2p against node processes on the embedded chain served over JSON-RPC.

One swarm: stage 0 inflates its receipts (node.testing.adversary --behaviour inflate), stage 1 is lazy on
about half of its microbatches (random activations), stage 2 is honest. Attesters gather every
epoch's receipts over `/pmn/audit/1.0.0`, settle the roots, spot-check at the model's audit rate
(1.0), submit fraud verdicts, and after the challenge window every leaf not voided is claimed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from libp2p.custom_types import TProtocol

from contracts.chain import advance_time
from node.services.audit import (
    AuditError,
    AuditRecorder,
    AuditReport,
    attester_role,
    fetch_epoch_receipts,
    spot_check,
    submit_frauds,
)
from node.testing.adversary import Cheat, spawn_adversary
from node.testing.swarm import NodeProcess, await_ready, spawn_node, stop_nodes
from protocol.accounting import accounting_function_hash
from protocol.audit_sampling import attester_stage
from protocol.epoch import EpochContext, build_epoch
from protocol.modelspec import proposal_spec_hash
from protocol.receipts import Domain, StaticKeyRegistry
from protocol.settlement import attest, claim_all, submit_epoch
from protocol.spotcheck import SpotCheckConfig
from sharding.config import PRESETS
from sharding.partition import partition
from sharding.train import OptimConfig
from tests.node.chain_swarm import Chain, assign, deployed_chain, register, wait_serving

pytestmark = [pytest.mark.network, pytest.mark.timeout(300)]

MODEL = "tiny"
CODEC = "dense"
STAGES, STEPS, EPOCH_LENGTH, MICROBATCHES, MB_SIZE, LR = 3, 4, 2, 2, 2, 3e-3
LAZY = Cheat("lazy", fraction=0.5, seed=3)
WINDOW_S = 600


def training(lr: float = LR) -> dict[str, Any]:
    o = OptimConfig()
    return {"stages": STAGES, "codec": CODEC, "microbatches": MICROBATCHES, "microbatch_size": MB_SIZE, "lr": lr,
            "warmup_steps": o.warmup_steps, "data_seed": o.data_seed}


@pytest.fixture
def chain(tmp_path: Path) -> Iterator[Chain]:
    yield from deployed_chain(tmp_path)


def propose(c: Chain, lr: float = LR) -> int:
    model_id = c.client.propose_model(c.researcher, proposal_spec_hash(PRESETS[MODEL], training(lr)), "test:audit",
                                      STAGES, accounting_function_hash(), EPOCH_LENGTH, WINDOW_S, 10_000, 0)
    c.client.start_training(c.researcher, model_id)
    return model_id


def node_args(c: Chain, model_id: int) -> list[str]:
    return ["--model", MODEL, "--codec", CODEC, "--stages", str(STAGES), "--steps", str(STEPS), "--microbatches",
            str(MICROBATCHES), "--microbatch-size", str(MB_SIZE), "--lr", str(LR), "--threads", "1",
            "--checkpoint-every", "0", "--rpc-url", c.rpc_url, "--deployment", str(c.deployment), "--model-id",
            str(model_id), "--linger"]


def test_lazy_node_caught_and_slashed_inflator_credited_only_cosigned(chain: Chain, tmp_path: Path) -> None:
    c = chain
    model_id = propose(c)
    dirs = [tmp_path / f"node{s}" for s in range(STAGES)]
    idents = [register(c, d) for d in dirs]
    for s, ident in enumerate(idents):
        assign(c, ident, model_id, s)
    args = node_args(c, model_id)
    nodes: list[NodeProcess] = []
    try:
        head = spawn_adversary(0, dirs[0], args, ["--behaviour", "inflate"])
        nodes.append(head)
        await_ready(head, 90)
        boot = ["--bootstrap", head.ready["addrs"][0]]
        nodes.append(spawn_adversary(1, dirs[1], args + boot, ["--behaviour", "lazy", "--fraction",
                                                               str(LAZY.fraction), "--cheat-seed", str(LAZY.seed)]))
        nodes.append(spawn_node(2, dirs[2], args + boot))
        for n in nodes[1:]:
            await_ready(n, 90)
        wait_serving(nodes)

        peers = {n.ready["address"]: n.ready["addrs"][0] for n in nodes}
        addrs = list(peers.values())
        domain = Domain(c.client.chain_id, c.client.ledger.address)
        registry = StaticKeyRegistry(i.address for i in idents)
        model, specs = PRESETS[MODEL], tuple(partition(PRESETS[MODEL], STAGES))
        terms = c.client.get_model(model_id).terms
        check = SpotCheckConfig(audit_rate=terms.audit_rate_bps / 10_000)
        inflator, lazy, honest = (i.address for i in idents)
        results, evidence, checked = [], [], 0
        for epoch in range(STEPS // EPOCH_LENGTH):
            gathered = fetch_epoch_receipts(model_id, addrs, epoch, account=c.validators[0])
            result = build_epoch(gathered, EpochContext(model_id, epoch, model, specs, domain), registry)
            submit_epoch(c.client, c.validators[0], result, attest(domain, result, c.validators[:2]))
            results.append(result)
            # the inflator claims ten hops for each one its neighbour countersigned; only those are credited
            own = [s for s in gathered if s.receipt.sender == inflator]
            cosigned = [s for s in own if s.cosigned]
            assert len(own) == 10 * len(cosigned) > 0
            assert {s.receipt.key for s in result.receipts if s.receipt.sender == inflator} == \
                {s.receipt.key for s in cosigned}
            # each attester audits the one stage the published rule gives it (three attesters: every stage)
            report = AuditReport()
            covered = set()
            for v in c.validators:
                role = attester_role(c.client, v, model_id, epoch)
                covered.add(attester_stage(v.address, model_id, epoch, STAGES, role.attesters))
                part = spot_check(model_id, peers, result.receipts, model, specs, CODEC, MICROBATCHES, check, role=role)
                report.checked += part.checked
                report.errors += part.errors
                report.evidence += part.evidence
            assert covered == set(range(STAGES))
            checked += report.checked
            assert not report.errors, report.errors
            faked = {(step, mb) for step in range(epoch * EPOCH_LENGTH, (epoch + 1) * EPOCH_LENGTH)
                     for mb in range(MICROBATCHES) if LAZY.fakes(step, mb)}
            failed = {(e.receipt.receipt.step, e.receipt.receipt.microbatch) for e in report.evidence}
            assert {e.node for e in report.evidence} <= {lazy}  # the honest and inflating nodes never flagged
            assert failed == faked
            evidence += report.evidence
        # audit rate 1.0: every checkable hop (2 forward, 1 tail backward per microbatch) was re-executed
        assert checked == STEPS * MICROBATCHES * 3
        assert evidence, "the lazy node faked no microbatch: pick another LAZY seed"
        stake_before = c.client.node_info(lazy).stake_wei
        slashed = submit_frauds(c.client, c.validators[0], c.validators[:2], evidence)
        assert set(slashed) == {lazy}
        assert c.client.node_info(lazy).stake_wei < stake_before
        voided = {e.receipt.receipt.epoch for e in evidence}
        advance_time(c.w3, WINDOW_S + 1)
        for result in results:
            claim_all(c.client, c.validators[0], result)
        for who in (inflator, honest):
            assert c.client.balance_of(model_id, who) == sum(r.totals[who] for r in results) > 0
        assert c.client.balance_of(model_id, lazy) == sum(r.totals[lazy] for r in results
                                                          if r.context.epoch not in voided)
        for e in voided:
            assert c.client.is_leaf_voided(model_id, e, lazy)
    finally:
        stop_nodes(nodes)


def test_node_refuses_a_model_registered_with_another_spec(chain: Chain, tmp_path: Path) -> None:
    model_id = propose(chain, lr=1e-3)  # the researcher proposed lr 1e-3; this node runs LR
    register(chain, tmp_path / "n")
    node = spawn_node(0, tmp_path / "n", node_args(chain, model_id))
    try:
        out, _ = node.proc.communicate(timeout=120)
    finally:
        stop_nodes([node])
    assert node.proc.returncode == 1
    msg = json.loads(out.decode().strip().splitlines()[0])  # the line a launcher reads instead of "ready"
    want = "0x" + proposal_spec_hash(PRESETS[MODEL], training(1e-3)).hex()
    mine = "0x" + proposal_spec_hash(PRESETS[MODEL], training()).hex()
    assert msg["event"] == "error" and want in msg["error"] and mine in msg["error"], msg
    assert not (tmp_path / "n" / "audit").exists() or not any((tmp_path / "n" / "audit").iterdir())


def test_recorder_keeps_epochs_inside_the_window_and_names_missing_data(tmp_path: Path) -> None:
    import torch

    from node.wire import frames

    now = [1000.0]
    rec = AuditRecorder(tmp_path, epoch_length=2, clock=lambda: now[0])
    module = torch.nn.Linear(2, 2)
    header = frames.FrameHeader(kind=frames.Kind.ACTIVATION, spec_hash=b"\0" * 32, stage=0, step=0, microbatch=1)
    rec.on_frame(frames.Frame(header=header, window=b"ww", payload=b"pp"))
    assert rec.received(0, 0, 1) == (b"ww", b"pp")
    for step in range(6):
        rec.on_before_update(step, module)
    assert rec.epochs() == [0, 1, 2]  # epoch 0 is older than retain_epochs but still inside retain_s
    with pytest.raises(AuditError, match="step 9"):
        rec.state_bytes(9)
    with pytest.raises(AuditError, match="gradient received for step 0 microbatch 1"):
        rec.received(1, 0, 1)
    now[0] += rec.config.retain_s + 10
    rec.on_before_update(6, module)  # epoch 3 starts: epochs 0 and 1 left the window
    assert rec.epochs() == [2, 3]
    with pytest.raises(AuditError, match="no parameters kept for step 1"):
        rec.state_bytes(1)


def test_audit_protocol_serves_recorded_data_and_names_what_is_missing(tmp_path: Path) -> None:
    import multiaddr
    import torch
    import trio

    from node.net.host import full_addrs, make_host
    from node.net.identity import bind, identity_from_secret
    from node.net.running import run_host
    from node.services.audit import AUDIT_PROTOCOL, AuditClient, AuditService, read_message, write_message
    from node.training.worker import StageWorker
    from node.wire import frames

    model = PRESETS[MODEL]
    spec = partition(model, STAGES)[1]
    worker = StageWorker(model, spec, codec=CODEC, optim=OptimConfig(), num_microbatches=2, microbatch_size=2)
    rec = AuditRecorder(tmp_path, epoch_length=2)
    worker.observers.append(rec)
    g = torch.Generator().manual_seed(0)
    window = torch.randint(0, 256, (2, model.seq_len + 1), generator=g)
    h = torch.randn(2, model.seq_len, model.d_model, generator=g)
    payload = worker.codec.encode_activation(h, window[:, :-1])
    wbytes = window.numpy().astype("<u2").tobytes()
    header = frames.FrameHeader(kind=frames.Kind.ACTIVATION, spec_hash=model.spec_hash(), stage=0, step=0, microbatch=1)
    worker.decode(frames.Frame(header=header, window=wbytes, payload=payload))  # the observer records it
    before = {k: v.clone() for k, v in worker.module.state_dict().items()}
    worker.step(0)  # the observer keeps the parameters step 0 ran with, before the update
    server_ident, other = identity_from_secret(b"\x05" * 32), identity_from_secret(b"\x07" * 32)
    service = AuditService(rec, worker, model_id=7, identity=server_ident)

    async def main() -> None:
        server = make_host(server_ident)
        client_host = make_host(identity_from_secret(b"\x06" * 32))
        listen = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
        async with run_host(server, listen), run_host(client_host, listen):
            server.set_stream_handler(TProtocol(AUDIT_PROTOCOL), service.handle)
            addr = full_addrs(server)[0]
            client = AuditClient(client_host, 7)
            state, got_window, got_payload = await client.hop(addr, 0, 1, 0)
            assert got_window == wbytes and got_payload == payload
            assert all(torch.equal(state[k], before[k]) for k in before)
            with pytest.raises(AuditError, match="no parameters kept for step 5"):
                await client.hop(addr, 5, 1, 0)
            with pytest.raises(AuditError, match="no activation received for step 0 microbatch 0"):
                await client.hop(addr, 0, 0, 0)
            with pytest.raises(AuditError, match="'microbatch' must be an integer >= 0 below 2"):
                await client.received(addr, 0, 9, 0)
            with pytest.raises(AuditError, match="not authorized") as refused:  # never names the model it trains
                await AuditClient(client_host, 8).hop(addr, 0, 1, 0)
            assert "7" not in str(refused.value).split(":")[-1]
            # asked for a node's data, the reply must carry that node key's binding of the answering peer id
            await client.received(addr, 0, 1, 0, node=server_ident.address.lower())
            with pytest.raises(AuditError, match=f"speaks for node {server_ident.address}, not for node {other.address}"):
                await client.hop(addr, 0, 1, 0, node=other.address)
            service.proof = {"address": other.address, "binding": "0x" + bind(other).hex()}  # a replayed binding
            with pytest.raises(AuditError, match=f"does not prove it speaks for node {other.address}: .*recovers to"):
                await client.hop(addr, 0, 1, 0, node=other.address)
            service.proof = {}
            with pytest.raises(AuditError, match="does not say which node key it speaks for"):
                await client.hop(addr, 0, 1, 0, node=server_ident.address)
            # a header larger than the limit is refused before it is read, then the stream closes
            stream = await client_host.new_stream(server.get_id(), [TProtocol(AUDIT_PROTOCOL)])
            await stream.write((service.config.max_request_bytes + 1).to_bytes(4, "big"))
            reply, _ = await read_message(stream, 1024)
            assert reply["type"] == "error" and "exceeds the limit of 4096" in reply["message"]
            with pytest.raises(AuditError, match="closed"):
                await read_message(stream, 1024)
            stream = await client_host.new_stream(server.get_id(), [TProtocol(AUDIT_PROTOCOL)])
            await write_message(stream, {"type": "state?", "model_id": 7})
            reply, _ = await read_message(stream, 1024)
            assert reply["type"] == "error" and "unknown request type" in reply["message"]
            await stream.close()

    trio.run(main)
    assert service.served == 5


def test_audit_client_asks_again_while_the_nodes_chain_is_down(tmp_path: Path) -> None:
    """A node whose chain view is down answers "chain unavailable" (not its fault): the attester asks again with
    backoff and gets the data once the chain is back; a node still down after every retry fails like a refusal."""
    import multiaddr
    import torch
    import trio

    from node.errors import ChainUnavailableError
    from node.net.host import full_addrs, make_host
    from node.net.identity import identity_from_secret
    from node.net.running import run_host
    from node.services.audit import AUDIT_PROTOCOL, AuditClient, AuditConfig, AuditService
    from node.training.worker import StageWorker
    from node.wire import frames

    model = PRESETS[MODEL]
    spec = partition(model, STAGES)[1]
    worker = StageWorker(model, spec, codec=CODEC, optim=OptimConfig(), num_microbatches=2, microbatch_size=2)
    rec = AuditRecorder(tmp_path, epoch_length=2)
    worker.observers.append(rec)
    g = torch.Generator().manual_seed(0)
    window = torch.randint(0, 256, (2, model.seq_len + 1), generator=g)
    h = torch.randn(2, model.seq_len, model.d_model, generator=g)
    header = frames.FrameHeader(kind=frames.Kind.ACTIVATION, spec_hash=model.spec_hash(), stage=0, step=0, microbatch=0)
    worker.decode(frames.Frame(header=header, window=window.numpy().astype("<u2").tobytes(),
                               payload=worker.codec.encode_activation(h, window[:, :-1])))
    worker.step(0)  # parameters of step 0 kept, and the activation it ran on

    class Outage:  # the node's chain-backed policy while the RPC is down for the next `down` checks
        down = 3
        checks = 0

        async def check(self, peer_id: Any, protocol: str, stage: int | None) -> None:
            return None

        async def check_audit(self, peer_id: Any, request: Any) -> None:
            self.checks += 1
            if self.down > 0:
                self.down -= 1
                raise ChainUnavailableError("chain unavailable (a recent call failed): request refused")

        def note_binding(self, peer_id: Any, address: str, binding: bytes) -> None:
            return None

    policy = Outage()
    ident = identity_from_secret(b"\x15" * 32)
    service = AuditService(rec, worker, model_id=7, identity=ident, policy=policy)
    fast = AuditConfig(unavailable_retries=3, unavailable_backoff_s=0.05)

    async def main() -> str:
        server, client_host = make_host(ident), make_host(identity_from_secret(b"\x16" * 32))
        listen = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
        async with run_host(server, listen), run_host(client_host, listen):
            server.set_stream_handler(TProtocol(AUDIT_PROTOCOL), service.handle)
            addr = full_addrs(server)[0]
            state, _, _ = await AuditClient(client_host, 7, fast).hop(addr, 0, 0, 0, node=ident.address)
            assert set(state) == set(worker.module.state_dict()) and all(isinstance(v, torch.Tensor)
                                                                         for v in state.values())
            policy.down = 10  # longer than the attester's patience
            with pytest.raises(AuditError, match="chain unavailable after 4 attempt") as exc:
                await AuditClient(client_host, 7, fast).hop(addr, 0, 0, 0, node=ident.address)
            return str(exc.value)

    message = trio.run(main)
    assert policy.checks == 4 + 4  # 3 refused + 1 served; then 4 refused
    assert service.gate.refused.get("not_authorized", 0) == 0  # an outage is not held against the attester
    assert "\n" not in message
