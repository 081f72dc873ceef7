"""Model extraction: what an outsider, a registered node and an attester can gather of a model's parameters.

A 3-stage on-chain swarm of real node processes (embedded chain served over JSON-RPC, one operator and
node key per stage, `--linger` after training) trains a few steps; the validators submit each epoch's root.
Then three classes of peer, each on its own libp2p host, try to collect parameters:

* outsider: a fresh identity registered nowhere: `/pmn/state` for every stage at every node, `/pmn/avg`
  pulls, `/pmn/audit` for every hop (without and with a forged attester claim), `/pmn/infer` (an unpaid
  request to the head, a direct hop to stage 1), `/pmn/act` (a handshake claiming the stage after stage 1)
  and a forged announcement (signed by its own key, claiming stage 2) -- does the node table take it?
* registered node: a second operator's node key, staked and assigned to stage 1 on chain, introduced by
  gossip; asks every node for every stage's state and audit data;
* attester: validator 0, with its role for each epoch (`protocol.audit_sampling`), asks every node for every
  hop of every stage.

Fractions are parameters recovered (distinct tensors, counted once) / parameters of the whole model.
`min_identities_for_full_model` = stages / the most stages one identity got (measured here, and on chain:
the node's operator is refused a second stage), i.e. distinct staked operators needed to collect every stage.

    python benchmarks/extraction.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sharding.config import ModelConfig  # noqa: E402


@dataclass(frozen=True)
class ExtractionConfig:
    """One extraction run."""

    stages: int = 3  # pipeline stages (one node process each)
    epochs: int = 2  # accounting epochs trained and settled
    epoch_length: int = 2  # steps per epoch
    microbatches: int = 2  # microbatches per step
    microbatch_size: int = 2  # sequences per microbatch
    audit_rate_bps: int = 5_000  # the model's audit rate (the attester's sample of hops)
    validators: int = 3  # attesters on chain (each audits one stage per coverage window)
    d_model: int = 32  # model width
    n_layers: int = 3  # transformer blocks
    ready_timeout_s: float = 90.0  # a node process must print its ready line within this
    train_timeout_s: float = 300.0  # the swarm must finish training within this
    request_timeout_s: float = 15.0  # bound on one attacker request


QUICK = ExtractionConfig()
FULL = ExtractionConfig(epochs=3, epoch_length=3, microbatches=3, d_model=64, n_layers=6)


@dataclass
class Take:
    """What one attacker class got."""

    tensors: dict[str, int]  # tensor name -> elements recovered
    stages: set[int]  # stages of which it recovered anything
    outcomes: dict[str, str]  # protocol attempt -> outcome


def _count(state: dict[str, Any]) -> dict[str, int]:
    return {k: int(v.numel()) for k, v in state.items()}


def _model(cfg: ExtractionConfig) -> ModelConfig:
    return ModelConfig(vocab_size=256, seq_len=16, d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=4)


def _stage_params(model: ModelConfig, stages: int) -> list[dict[str, int]]:
    from sharding.partition import partition
    from sharding.stage import StageModule

    return [_count(StageModule(model, spec).state_dict()) for spec in partition(model, stages)]


async def _try(outcomes: dict[str, str], what: str, fn: Any, timeout_s: float) -> Any:
    try:
        with trio.fail_after(timeout_s):
            result = await fn()
        outcomes[what] = "served"
        return result
    except Exception as exc:  # every refusal shape counts as "refused" (the message says which)
        outcomes[what] = f"refused ({type(exc).__name__}: {str(exc)[:60]})"
        return None


async def _state(host: Any, addr: str, spec_hex: str, stage: int) -> dict[str, int]:
    from safetensors.torch import load as st_load

    from node.errors import StateSyncError
    from node.net.host import parse_peer_addr
    from node.replicas.averaging import read_msg, write_msg
    from node.replicas.statesync import STATE_PROTOCOL

    info = parse_peer_addr(addr)
    await host.connect(info)
    stream = await host.new_stream(info.peer_id, [STATE_PROTOCOL])
    try:
        await write_msg(stream, {"spec_hash": spec_hex, "stage": stage})
        header, blob = await read_msg(stream, 1 << 28)
    finally:
        await stream.close()
    if "error" in header:
        raise StateSyncError(str(header["error"]))
    return _count(st_load(blob[: int(header["weights_len"])]))


async def _avg_pull(host: Any, addr: str, stage: int) -> None:
    from node.errors import AveragingError
    from node.net.host import parse_peer_addr
    from node.replicas.averaging import AVG_PROTOCOL, read_msg, write_msg

    info = parse_peer_addr(addr)
    await host.connect(info)
    stream = await host.new_stream(info.peer_id, [AVG_PROTOCOL])
    try:
        await write_msg(stream, {"op": "pull", "stage": stage, "step": 0, "mb": 0, "have": [], "wait_s": 0})
        header, _ = await read_msg(stream, 1 << 24)
    finally:
        await stream.close()
    if "error" in header:
        raise AveragingError(str(header["error"]))


async def _infer(host: Any, addr: str, header: dict[str, Any]) -> None:
    from node.net import msgio
    from node.net.host import parse_peer_addr
    from node.services.inference import INFER_PROTOCOL, InferenceError

    info = parse_peer_addr(addr)
    await host.connect(info)
    stream = await host.new_stream(info.peer_id, [INFER_PROTOCOL])
    try:
        await msgio.write_message(stream, header)
        reply, _ = await msgio.read_message(stream, 1 << 20, InferenceError)
    finally:
        await stream.close()
    if reply.get("type") == "error":
        raise InferenceError(str(reply.get("message")))


async def _act(host: Any, identity: Any, addr: str, model: ModelConfig, stages: int, claim: int) -> None:
    from node.config import TransportConfig
    from node.net.identity import bind
    from node.training.worker import StageWorker
    from node.wire.channel import ActEndpoint, LocalInfo
    from sharding.partition import partition
    from sharding.train import OptimConfig

    worker = StageWorker(model, partition(model, stages)[claim], codec="dense", optim=OptimConfig(),
                         num_microbatches=1, microbatch_size=1)
    cfg = TransportConfig()
    endpoint = ActEndpoint(host, local=LocalInfo(model.spec_hash(), claim, stages, identity.address, bind(identity)),
                           frame_spec=worker.frame_spec(cfg.max_frame_bytes), cfg=cfg)
    ch = await endpoint.open(addr)
    await ch.close()


async def _announce(host: Any, identity: Any, addr: str, spec_hex: str, stages: int, stage: int) -> bool:
    """Gossip our own signed entry for `stage` to the node at `addr`; True when its table then holds it."""
    from node.errors import DiscoveryError
    from node.net import msgio
    from node.net.discovery import ANNOUNCE_PROTOCOL, AnnounceLimits, Announcement
    from node.net.host import full_addrs, parse_peer_addr

    me = Announcement(peer_id=host.get_id().pretty(), addrs=tuple(full_addrs(host)), spec_hash=spec_hex,
                      num_stages=stages, stage=stage, capacity=1, seq=int(time.time() * 1000)).sign(identity)
    info = parse_peer_addr(addr)
    await host.connect(info)
    table: list[Any] = []
    for _ in range(2):  # the second exchange shows whether the first one's entry was kept
        stream = await host.new_stream(info.peer_id, [ANNOUNCE_PROTOCOL])
        await msgio.write_json(stream, [me.to_json()])
        table = await msgio.read_json(stream, AnnounceLimits().message_limits(), DiscoveryError)
        await stream.close()
    return any(isinstance(e, dict) and e.get("peer_id") == me.peer_id for e in table)


async def _state_all(host: Any, peers: list[dict[str, Any]], spec_hex: str, stages: int, take: Take,
                     timeout_s: float) -> None:
    """Ask every node for every stage's state over /pmn/state; keep what is served."""
    for p in peers:
        for s in range(stages):
            got = await _try(take.outcomes, f"/pmn/state stage {s} at node {p['stage']}",
                             lambda p=p, s=s: _state(host, p["addrs"][0], spec_hex, s), timeout_s)
            if got:
                take.tensors.update(got)
                take.stages.add(s)


async def _audit_all(host: Any, credentials: dict[str, str] | None, model_id: int, peers: list[dict[str, Any]],
                     cfg: ExtractionConfig, take: Take, label: str) -> None:
    from node.services.audit import AuditClient

    client = AuditClient(host, model_id, credentials=credentials)
    steps = cfg.epochs * cfg.epoch_length
    for p in peers:
        served = 0
        asked = 0
        for step in range(steps):
            for mb in range(cfg.microbatches):
                for direction in (0, 1):
                    asked += 1
                    try:
                        with trio.fail_after(cfg.request_timeout_s):
                            state, _, _ = await client.hop(p["addrs"][0], step, mb, direction)
                    except Exception:  # refused (or not held): nothing gathered
                        continue
                    served += 1
                    take.tensors.update(_count(state))
                    take.stages.add(int(p["stage"]))
        take.outcomes[f"{label} /pmn/audit hops at stage {p['stage']}"] = f"{served}/{asked} served"


async def attack(cfg: ExtractionConfig, model: ModelConfig, model_id: int, peers: list[dict[str, Any]],
                 node_ident: Any, attester_roles: list[Any]) -> dict[str, Take]:
    """Run the three attacker classes (each on its own host) against the running swarm."""
    import multiaddr

    from node.net.host import make_host
    from node.net.identity import identity_from_secret
    from node.net.running import run_host
    from node.services.audit import attester_credentials

    spec_hex = model.spec_hash().hex()
    listen = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
    t = cfg.request_timeout_s
    takes = {k: Take({}, set(), {}) for k in ("outsider", "node", "attester")}

    # -- outsider -------------------------------------------------------------------------------------
    outsider = identity_from_secret(os.urandom(31).rjust(32, b"\x01"))
    host = make_host(outsider)
    async with run_host(host, listen):
        take = takes["outsider"]
        await _state_all(host, peers, spec_hex, cfg.stages, take, t)
        for p in peers:
            await _try(take.outcomes, f"/pmn/avg pull at node {p['stage']}",
                       lambda p=p: _avg_pull(host, p["addrs"][0], int(p["stage"])), t)
        await _audit_all(host, None, model_id, peers, cfg, take, "no claim:")
        # a forged attester claim: validator 0's address with our own key's binding
        forged = {**attester_credentials(outsider), "attester": attester_roles[0].address}
        await _audit_all(host, forged, model_id, peers, cfg, take, "forged attester:")
        head, mid = peers[0]["addrs"][0], peers[1]["addrs"][0]
        await _try(take.outcomes, "/pmn/infer unpaid generate at the head",
                   lambda: _infer(host, head, {"type": "generate", "request_id": "0x" + "00" * 32,
                                               "tx_hash": "0x" + "00" * 32, "prompt": [1, 2, 3],
                                               "max_new_tokens": 4}), t)
        await _try(take.outcomes, "/pmn/infer direct hop to stage 1",
                   lambda: _infer(host, mid, {"type": "hop", "request_id": "0x" + "00" * 32,
                                              "tx_hash": "0x" + "00" * 32, "ids": [1, 2, 3]}), t)
        await _try(take.outcomes, "/pmn/act handshake claiming stage 2 at stage 1",
                   lambda: _act(host, outsider, mid, model, cfg.stages, 2), t)
        kept = await _try(take.outcomes, "announce forged stage-2 entry at the head",
                          lambda: _announce(host, outsider, head, spec_hex, cfg.stages, 2), t)
        take.outcomes["announce forged stage-2 entry at the head"] = "kept in table" if kept else "not kept"

    # -- registered node of stage 1 --------------------------------------------------------------------
    host = make_host(node_ident)
    async with run_host(host, listen):
        take = takes["node"]
        for p in peers:  # introduce ourselves (a real node's first gossip round): our entry is on chain
            kept = await _try(take.outcomes, f"announce own stage-1 entry at node {p['stage']}",
                              lambda p=p: _announce(host, node_ident, p["addrs"][0], spec_hex, cfg.stages, 1), t)
            take.outcomes[f"announce own stage-1 entry at node {p['stage']}"] = "kept" if kept else "not kept"
        await _state_all(host, peers, spec_hex, cfg.stages, take, t)
        await _audit_all(host, attester_credentials(node_ident), model_id, peers, cfg, take, "as itself:")

    # -- attester (validator 0), each epoch with its role ---------------------------------------------
    role0 = attester_roles[0]
    host = make_host(role0.identity())
    async with run_host(host, listen):
        await _audit_all(host, attester_credentials(role0.identity()), model_id, peers, cfg, takes["attester"],
                         "validator 0:")
    return takes


def run(cfg: ExtractionConfig, root: Path) -> dict[str, Any]:
    """Start the swarm, settle its epochs, run the attackers, and return the figures."""
    from contracts.chain import connect, disconnect, test_accounts
    from contracts.client import ProtocolContracts
    from contracts.deploy import deploy_all
    from contracts.embedded import serve_embedded
    from contracts.errors import ContractsError
    from node.net.identity import load_or_create_identity
    from node.observability.status import node_status
    from node.services.audit import attester_role, fetch_epoch_receipts
    from node.testing.swarm import await_ready, spawn_node, stop_nodes
    from protocol.accounting import accounting_function_hash
    from protocol.audit_sampling import attester_stage
    from protocol.epoch import EpochContext, build_epoch
    from protocol.modelspec import proposal_spec_hash
    from protocol.receipts import Domain, StaticKeyRegistry
    from protocol.settlement import attest, submit_epoch
    from sharding.partition import partition
    from sharding.train import OptimConfig

    model = _model(cfg)
    model_path = root / "model.json"
    model_path.write_text(json.dumps(model.to_dict()))
    per_stage = _stage_params(model, cfg.stages)
    total = sum(sum(d.values()) for d in per_stage)
    steps, lr = cfg.epochs * cfg.epoch_length, 3e-3
    optim = OptimConfig()
    training = {"stages": cfg.stages, "codec": "dense", "microbatches": cfg.microbatches,
                "microbatch_size": cfg.microbatch_size, "lr": lr, "warmup_steps": optim.warmup_steps,
                "data_seed": optim.data_seed}
    w3 = connect(None)
    rpc_url, stop_chain = serve_embedded(w3)
    nodes: list[Any] = []
    t0 = time.perf_counter()
    try:
        accounts = test_accounts(w3)
        validators = accounts[3:3 + cfg.validators]
        funder = accounts[3 + cfg.validators]
        deployment = deploy_all(w3, accounts[0], [v.address for v in validators], min(2, cfg.validators))
        deployment.save(root / "deployment.json")
        client = ProtocolContracts(w3, deployment)
        model_id = client.propose_model(accounts[1], proposal_spec_hash(model, training), "bench:extraction",
                                        cfg.stages, accounting_function_hash(), cfg.epoch_length, 600,
                                        cfg.audit_rate_bps, 0)
        client.start_training(accounts[1], model_id)

        def operator(name: str, stage: int) -> Any:
            ident = load_or_create_identity(root / name)
            client.tx.transact(funder, to=ident.address, value=10**18)
            client.register_node(ident.account, ident.account, 1, client.stake_required(1))
            client.assign_stage(ident.account, ident.address, model_id, stage)
            return ident

        idents = [operator(f"node{s}", s) for s in range(cfg.stages)]
        spy = operator("spy", 1)  # the registered attacker: its own operator, staked for stage 1
        # one operator, one stage: the chain refuses the spy's operator a second stage of the model
        second_stage_refused = False
        try:
            client.assign_stage(spy.account, spy.address, model_id, 2)
        except ContractsError:
            second_stage_refused = client.operator_stage_of(model_id, spy.address) == 1
        args = ["--model", str(model_path), "--codec", "dense", "--stages", str(cfg.stages), "--steps", str(steps),
                "--microbatches", str(cfg.microbatches), "--microbatch-size", str(cfg.microbatch_size), "--lr",
                str(lr), "--threads", "1", "--checkpoint-every", "0", "--rpc-url", rpc_url, "--deployment",
                str(root / "deployment.json"), "--model-id", str(model_id), "--linger"]
        nodes.append(await_ready(spawn_node(0, root / "node0", args), cfg.ready_timeout_s))
        boot = ["--bootstrap", nodes[0].ready["addrs"][0]]
        nodes += [spawn_node(s, root / f"node{s}", args + boot) for s in range(1, cfg.stages)]
        for n in nodes[1:]:
            await_ready(n, cfg.ready_timeout_s)
        deadline = time.monotonic() + cfg.train_timeout_s
        while not all(node_status(n.data_dir).get("state") == "serving" for n in nodes):
            if any(n.proc.poll() is not None for n in nodes) or time.monotonic() > deadline:
                raise RuntimeError(f"swarm did not finish: {[node_status(n.data_dir).get('state') for n in nodes]}")
            time.sleep(0.2)
        train_s = time.perf_counter() - t0
        domain = Domain(client.chain_id, client.ledger.address)
        registry = StaticKeyRegistry(i.address for i in idents)
        specs = tuple(partition(model, cfg.stages))
        addrs = [n.ready["addrs"][0] for n in nodes]
        for epoch in range(cfg.epochs):  # the roots go on chain: from now on the attesters' hop seeds exist
            result = build_epoch(fetch_epoch_receipts(model_id, addrs, epoch, account=validators[0]),
                                 EpochContext(model_id, epoch, model, specs, domain), registry)
            submit_epoch(client, validators[0], result, attest(domain, result, validators[:2]))
        roles = [attester_role(client, validators[0], model_id, e) for e in range(cfg.epochs)]
        assigned = {attester_stage(validators[0].address, model_id, e, cfg.stages, roles[0].attesters)
                    for e in range(cfg.epochs)}
        peers = [n.ready for n in nodes]
        takes = trio.run(attack, cfg, model, model_id, peers, spy, roles)
    finally:
        stop_nodes(nodes)
        stop_chain()
        disconnect(w3)

    def fraction(take: Take) -> float:
        return sum(take.tensors.values()) / total

    shares = [sum(d.values()) / total for d in per_stage]
    most_stages_one_identity = max(1, len(takes["node"].stages), len(takes["attester"].stages),
                                   1 if second_stage_refused else cfg.stages)
    return {
        "outsider_fraction": round(fraction(takes["outsider"]), 6),
        "node_fraction": round(fraction(takes["node"]), 6),
        "attester_fraction": round(fraction(takes["attester"]), 6),
        "min_identities_for_full_model": -(-cfg.stages // most_stages_one_identity),
        "stages": cfg.stages,
        "total_parameters": total,
        "stage_shares": [round(s, 6) for s in shares],
        "node_stage_share": round(shares[1], 6),
        "attester_stages": sorted(takes["attester"].stages),
        "attester_assigned_stages": sorted(s for s in assigned if s is not None),
        "attester_max_stage_share": round(max(shares), 6),
        "second_stage_refused_on_chain": second_stage_refused,
        "outcomes": {k: v.outcomes for k, v in takes.items()},
        "train_s": round(train_s, 1),
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def table(out: dict[str, Any]) -> str:
    """The human-readable summary printed before the JSON line."""
    lines = [f"{'class':<10} {'fraction':>9}  stages obtained", "-" * 44,
             f"{'outsider':<10} {out['outsider_fraction']:>9.4f}  []",
             f"{'node':<10} {out['node_fraction']:>9.4f}  own stage 1 (share {out['node_stage_share']:.4f})",
             f"{'attester':<10} {out['attester_fraction']:>9.4f}  {out['attester_stages']} "
             f"(assigned {out['attester_assigned_stages']})",
             f"min identities for the full model: {out['min_identities_for_full_model']} (stages {out['stages']}; "
             f"second stage for one operator refused on chain: {out['second_stage_refused_on_chain']})", ""]
    for who, outcomes in out["outcomes"].items():
        lines.append(f"[{who}]")
        lines += [f"  {k:<58} {v}" for k, v in outcomes.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model, 2 epochs of 2 steps (about a minute)")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="extraction-bench-") as tmp:
        out = run(QUICK if a.quick else FULL, Path(tmp))
    print(table(out))
    print(json.dumps({k: v for k, v in out.items() if k != "outcomes"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
