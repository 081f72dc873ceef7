"""Audit benchmark: how often is cheating caught within an epoch, at audit rates 0.05, 0.2 and 1.0?

Full mode: three node processes over libp2p on the embedded chain served over JSON-RPC
(`node.testing.adversary`): stage 0 reports 10x its work (receipts only it signed), stage 1 sends random
activations for a fraction of its microbatches, stage 2 is honest. An attester gathers each epoch's
receipts and re-executes every checkable hop with state and inputs fetched over `/pmn/audit/1.0.0`.
`--quick`: the same cheats in one process (`protocol.localswarm`), smaller.

Every checkable hop is re-executed once (deterministic CPU) to know its check outcome; then, for many
attester seeds, the real seeded sampler picks hops at each rate and the cheater counts as caught in an
epoch when a sampled hop of it fails its check. Measured catch probability is compared with the
analytic 1 - (1 - r)^n (n = faked hops in the epoch), averaged over epochs. Honest nodes' sampled hops
count as false positives if they fail. The inflating node's credited units are divided by the units of
the work its neighbours co-signed.

    python benchmarks/audit.py --quick     # < 60 s, in one process
    python benchmarks/audit.py             # node processes over libp2p
Last line: JSON with `audit` (list of {rate, measured, expected}) and `credited_over_verified`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eth_account import Account  # noqa: E402

from protocol.accounting import compute_units  # noqa: E402
from protocol.epoch import EpochContext, build_epoch  # noqa: E402
from protocol.localswarm import Behaviour, LocalSwarm, LocalSwarmConfig  # noqa: E402
from protocol.receipts import Domain, StaticKeyRegistry  # noqa: E402
from protocol.spotcheck import TOLERANCES, SpotCheckConfig, detection_probability, is_sampled  # noqa: E402
from sharding.config import ModelConfig  # noqa: E402

RATES = (0.05, 0.2, 1.0)


@dataclass(frozen=True)
class AuditBenchConfig:
    """Shape and budget of one run."""

    epochs: int = 4  # accounting epochs trained
    epoch_length: int = 4  # optimizer steps per epoch
    microbatches: int = 4  # microbatches per step
    random_fraction: float = 0.25  # fraction of stage 1's forward hops replaced by random activations
    inflate: int = 10  # stage 0's self-reported work multiplier
    trials: int = 2000  # attester seeds per (rate, epoch)
    tolerance: float = TOLERANCES["bf16"]  # spot-check score tolerance (protocol.spotcheck.SPOTCHECK_RULE)


QUICK = AuditBenchConfig(epochs=2, epoch_length=2, microbatches=4, trials=400)


def run(cfg: AuditBenchConfig) -> dict[str, object]:
    """Train, re-execute every checkable hop once, then simulate attester sampling; return the figures."""
    model = ModelConfig(vocab_size=256, seq_len=16, d_model=32, n_layers=3, n_heads=4)
    keys = [Account.from_key((77 + i).to_bytes(32, "big")) for i in range(3)]
    domain = Domain(31337, "0x" + "c0" * 20)
    registry = StaticKeyRegistry(k.address for k in keys)
    swarm_cfg = LocalSwarmConfig(model, num_stages=3, microbatches=cfg.microbatches, microbatch_size=2,
                                 epoch_length=cfg.epoch_length, model_id=1)
    behaviours = {0: Behaviour(inflate=cfg.inflate, seed=1), 1: Behaviour(random_fraction=cfg.random_fraction, seed=2)}
    check = SpotCheckConfig(audit_rate=1.0, tolerance=cfg.tolerance)
    cheater, inflator = keys[1].address, keys[0].address
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        swarm = LocalSwarm(swarm_cfg, keys, domain, registry, Path(tmp), behaviours)
        epochs = []
        credited = verified = 0
        for epoch in range(cfg.epochs):
            swarm.train_epoch(epoch)
            gathered = swarm.gathered(epoch)
            result = build_epoch(gathered, EpochContext(1, epoch, model, tuple(swarm.specs), domain), registry)
            credited += result.totals.get(inflator, 0)
            # the work stage 0's neighbours co-signed: every microbatch of the epoch it really ran
            verified += cfg.epoch_length * cfg.microbatches * compute_units(model, swarm.specs[0], swarm.tokens_per_hop)
            unique = {s.receipt.key: s for s in gathered if s.cosigned}
            outcomes = {k: swarm.check(s, check) for k, s in unique.items() if swarm.checkable(s)}
            bad = sum(1 for k in swarm.bad_hops if k[1] == epoch)
            epochs.append((epoch, outcomes, bad))
        reported = swarm.self_reported[inflator]
        swarm.close()
    return _figures(cfg, epochs, cheater, credited, verified, reported, time.perf_counter() - t0, "one process")


def _figures(cfg: AuditBenchConfig, epochs: list[tuple[int, dict[Any, Any], int]], cheater: str, credited: int,
             verified: int, reported: int, train_check_s: float, mode: str) -> dict[str, object]:
    """Simulate attester sampling over the per-hop outcomes; print the table; return the JSON figures."""
    rows = []
    false_positives = 0
    honest_sampled = 0
    for rate in RATES:
        caught = 0
        expected = 0.0
        for epoch, outcomes, bad in epochs:
            expected += detection_probability(rate, bad)
            for seed in range(cfg.trials):
                hit = False
                for key, res in outcomes.items():
                    if not is_sampled(key, rate, seed * 1000 + epoch):
                        continue
                    if res.node == cheater:
                        hit = hit or not res.passed
                    else:
                        honest_sampled += 1
                        false_positives += 0 if res.passed else 1
                caught += hit
        n_trials = cfg.trials * len(epochs)
        rows.append({"rate": rate, "measured": round(caught / n_trials, 4), "expected": round(expected / len(epochs), 4)})

    bad_counts = [bad for _, _, bad in epochs]
    max_err = max(res.relative_error for _, outcomes, _ in epochs for res in outcomes.values() if res.node != cheater)
    print(f"audit benchmark ({mode}): 3 stages, {cfg.epochs} epochs x {cfg.epoch_length} steps x {cfg.microbatches} microbatches; "
          f"stage 1 fakes {cfg.random_fraction:.0%} of its activations, stage 0 reports {cfg.inflate}x")
    print(f"faked hops per epoch: {bad_counts}; honest max relative error {max_err:.2e} (tolerance {cfg.tolerance})")
    print(f"{'audit rate':>10} {'measured P(caught/epoch)':>26} {'analytic 1-(1-r)^n':>20}")
    for row in rows:
        print(f"{row['rate']:>10} {row['measured']:>26} {row['expected']:>20}")
    ratio = credited / verified if verified else 0.0
    print(f"inflating node: self-reported {reported} hops for {reported // cfg.inflate} real; "
          f"credited/verified units = {ratio:.4f}; false positives on honest hops: {false_positives}/{honest_sampled}")
    print(f"train + re-execution {train_check_s:.1f} s")
    return {
        "audit": rows,
        "credited_over_verified": ratio,
        "self_reported_over_verified": reported / (reported // cfg.inflate),
        "faked_hops_per_epoch": bad_counts,
        "false_positives": false_positives,
        "honest_hops_sampled": honest_sampled,
        "trials_per_epoch": cfg.trials,
    }


def run_network(cfg: AuditBenchConfig, root: Path) -> dict[str, object]:
    """The same figures from node processes over libp2p on the embedded chain."""
    from contracts.chain import connect, test_accounts
    from contracts.client import ProtocolContracts
    from contracts.deploy import deploy_all
    from contracts.embedded import serve_embedded
    from node.net.identity import load_or_create_identity
    from node.observability.status import node_status
    from node.services.audit import AuditReport, attester_role, fetch_epoch_receipts, spot_check
    from node.testing.adversary import Cheat, spawn_adversary
    from node.testing.swarm import await_ready, spawn_node, stop_nodes
    from protocol.accounting import accounting_function_hash
    from protocol.modelspec import proposal_spec_hash
    from protocol.settlement import attest, submit_epoch
    from sharding.partition import partition
    from sharding.train import OptimConfig

    model = ModelConfig(vocab_size=256, seq_len=16, d_model=32, n_layers=3, n_heads=4)
    model_path = root / "model.json"
    model_path.write_text(json.dumps(model.to_dict()))
    specs = tuple(partition(model, 3))
    lazy = Cheat("lazy", fraction=cfg.random_fraction, seed=2)
    steps, mb_size, lr = cfg.epochs * cfg.epoch_length, 2, 3e-3
    optim = OptimConfig()
    training = {"stages": 3, "codec": "dense", "microbatches": cfg.microbatches, "microbatch_size": mb_size, "lr": lr,
                "warmup_steps": optim.warmup_steps, "data_seed": optim.data_seed}
    w3 = connect(None)
    rpc_url, stop_chain = serve_embedded(w3)
    nodes = []
    t0 = time.perf_counter()
    try:
        accounts = test_accounts(w3)
        validators = accounts[3:6]  # three attesters: each audits one of the three stages per coverage window
        deployment = deploy_all(w3, accounts[0], [v.address for v in validators], 1)
        deployment.save(root / "deployment.json")
        client = ProtocolContracts(w3, deployment)
        model_id = client.propose_model(accounts[1], proposal_spec_hash(model, training), "bench:audit", 3,
                                        accounting_function_hash(), cfg.epoch_length, 600, 10_000, 0)
        client.start_training(accounts[1], model_id)
        idents = []
        for s in range(3):
            ident = load_or_create_identity(root / f"node{s}")
            client.tx.transact(accounts[6], to=ident.address, value=10**18)
            client.register_node(ident.account, ident.account, 1, client.stake_required(1))
            client.assign_stage(ident.account, ident.address, model_id, s)  # one stage per operator, staked
            idents.append(ident)
        args = ["--model", str(model_path), "--codec", "dense", "--stages", "3", "--steps", str(steps),
                "--microbatches", str(cfg.microbatches), "--microbatch-size", str(mb_size), "--lr", str(lr),
                "--threads", "1", "--checkpoint-every", "0", "--rpc-url", rpc_url, "--deployment",
                str(root / "deployment.json"), "--model-id", str(model_id), "--linger"]
        nodes.append(await_ready(spawn_adversary(0, root / "node0", args, ["--behaviour", "inflate"]), 90))
        boot = ["--bootstrap", nodes[0].ready["addrs"][0]]
        nodes.append(spawn_adversary(1, root / "node1", args + boot,
                                     ["--behaviour", "lazy", "--fraction", str(lazy.fraction), "--cheat-seed", "2"]))
        nodes.append(spawn_node(2, root / "node2", args + boot))
        for n in nodes[1:]:
            await_ready(n, 90)
        deadline = time.monotonic() + 600
        while not all(node_status(n.data_dir).get("state") == "serving" for n in nodes):
            if any(n.proc.poll() is not None for n in nodes) or time.monotonic() > deadline:
                raise RuntimeError(f"swarm did not finish: {[node_status(n.data_dir).get('state') for n in nodes]}")
            time.sleep(0.2)
        domain = Domain(client.chain_id, client.ledger.address)
        registry = StaticKeyRegistry(i.address for i in idents)
        peers = {n.ready["address"]: n.ready["addrs"][0] for n in nodes}
        inflator, cheater = idents[0].address, idents[1].address
        check = SpotCheckConfig(audit_rate=1.0, tolerance=cfg.tolerance)
        epochs, credited, verified, reported = [], 0, 0, 0
        for epoch in range(cfg.epochs):
            gathered = fetch_epoch_receipts(model_id, list(peers.values()), epoch, account=validators[0])
            result = build_epoch(gathered, EpochContext(model_id, epoch, model, specs, domain), registry)
            credited += result.totals.get(inflator, 0)
            verified += cfg.epoch_length * cfg.microbatches * compute_units(model, specs[0], mb_size * model.seq_len)
            reported += sum(1 for g in gathered if g.receipt.sender == inflator and g.receipt.direction == 0)
            submit_epoch(client, validators[0], result, attest(domain, result, validators[:1]))
            report = AuditReport()  # each attester audits the hops the published rule assigns it (its one stage)
            for v in validators:
                part = spot_check(model_id, peers, result.receipts, model, specs, "dense", cfg.microbatches, check,
                                  role=attester_role(client, v, model_id, epoch))
                report.results += part.results
                report.errors += part.errors
            if report.errors:
                raise RuntimeError(f"hops could not be fetched: {report.errors[:3]}")
            outcomes = {r.key: r for r in report.results}
            bad = sum(1 for step in range(epoch * cfg.epoch_length, (epoch + 1) * cfg.epoch_length)
                      for mb in range(cfg.microbatches) if lazy.fakes(step, mb))
            epochs.append((epoch, outcomes, bad))
    finally:
        stop_nodes(nodes)
        stop_chain()
    return _figures(cfg, epochs, cheater, credited, verified, reported, time.perf_counter() - t0, "node processes")


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small in-process run (< 60 s)")
    a = p.parse_args(argv)
    if a.quick:
        out = run(QUICK)
    else:
        with tempfile.TemporaryDirectory(prefix="audit-bench-") as tmp:
            out = run_network(AuditBenchConfig(), Path(tmp))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
