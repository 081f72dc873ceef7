"""Two models trained at once by two swarms on one chain: shares, receipts and revenue never mix; `pmn models`
reports each; the auto rule picks the one with revenue; `--model ID|auto` fetches the spec from the model's
own peers and checks it against the chain (embedded py-evm served over HTTP, real node processes)."""

from __future__ import annotations

import json
import sqlite3
import threading
from contextlib import closing
from dataclasses import replace
from pathlib import Path

import pytest

from contracts.chain import disconnect
from node.model import load_model_config, optim_config
from node.services.chain_link import training_section
from node.testing.swarm import stop_nodes
from pmn.cmd_models import all_reports, choose, resolve_onchain
from pmn.cmd_node import node_config
from pmn.config import OperatorConfig
from pmn.demo import Demo, DemoConfig
from pmn.errors import CLIError
from protocol.modelspec import proposal_spec_hash
from sharding.dataset import DataSpec
from tests.pmn.conftest import run_pmn

pytestmark = [pytest.mark.network, pytest.mark.timeout(600)]

SMALL = DemoConfig(stages=2, steps=4, epoch_length=2, microbatches=2, microbatch_size=2, inference_requests=1,
                   max_new_tokens=4, validators=2, quorum=2, discovery_timeout_s=240.0)
SHARED = ("w3", "rpc_url", "admin", "researcher", "client_account", "validators", "funder", "deployment_path",
          "client", "domain", "outbox")  # one chain: one deployment, one outbox of chain writes


def _train_both(demos: list[Demo]) -> None:
    """Both swarms train at the same time (each Demo.train waits on its own nodes' files)."""
    errors: list[BaseException] = []

    def run(d: Demo) -> None:
        try:
            d.train()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(d,)) for d in demos]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _receipt_models(data_dir: Path) -> set[str]:
    with closing(sqlite3.connect(data_dir / "receipts.sqlite")) as db:
        return {r[0] for r in db.execute("SELECT DISTINCT model_id FROM receipts")}


def test_two_models_on_one_chain_never_mix(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    a = Demo(SMALL, tmp_path / "a", None, None)
    b = Demo(replace(SMALL, lr=1e-3), tmp_path / "b", None, None)  # another recipe: another spec hash
    try:
        a.setup_chain()
        for k in SHARED:
            setattr(b, k, getattr(a, k))
        a.propose()
        b.propose()
        assert (a.model_id, b.model_id) == (1, 2)
        a.register_nodes()
        b.register_nodes()
        _train_both([a, b])
        a.settle()
        b.settle()
        a.infer()  # only model 1 earns

        client = a.client
        for mine, other in ((a, b), (b, a)):
            for ident, n in zip(mine.identities, mine.nodes, strict=True):
                assert client.balance_of(mine.model_id, ident.address) > 0
                assert client.balance_of(other.model_id, ident.address) == 0
                assert _receipt_models(n.data_dir) == {str(mine.model_id)}  # receipts name their own model only
        assert client.claimable(b.model_id, b.identities[0].address) == 0
        fee = SMALL.inference_fee_wei
        assert sum(client.claimable(1, i.address) for i in a.identities) == pytest.approx(fee, abs=len(a.identities))

        reports = {r.model_id: r for r in all_reports(client)}
        for d in (a, b):
            r = reports[d.model_id]
            assert [s.contributors for s in r.per_stage] == [[i.address] for i in d.identities]
            assert all(s.units_credited > 0 for s in r.per_stage)
            assert r.total_shares == sum(s.units_credited for s in r.per_stage)
        assert reports[1].revenue_deposited_wei == fee and reports[2].revenue_deposited_wei == 0
        best, stage, why = choose(list(reports.values()))
        assert best.model_id == 1 and "model 1" in why and 0 <= stage.stage < 2

        out = run_pmn("models", "--json", "--rpc-url", a.rpc_url, "--deployment", str(a.deployment_path))
        assert out.returncode == 0, out.stderr
        listed = json.loads(out.stdout)
        assert [m["model_id"] for m in listed] == [1, 2] and listed[0]["status"] == "Training"
        assert listed[0]["per_stage"][0]["contributors"] == [a.identities[0].address]
        table = run_pmn("models", "--rpc-url", a.rpc_url, "--deployment", str(a.deployment_path))
        assert table.returncode == 0 and "auto choice: model 1" in table.stdout

        # --model ID / auto: the spec comes from the model's own peers, checked against the chain's hash
        peer_a, peer_b = a.nodes[0].ready["addrs"][0], b.nodes[0].ready["addrs"][0]
        dep = str(a.deployment_path)
        mid, chosen, spec, why = resolve_onchain(a.rpc_url, dep, "auto", [peer_b, peer_a], tmp_path / "joiner")
        assert (mid, chosen) == (1, stage.stage) and spec["training"]["lr"] == SMALL.lr
        assert json.loads((tmp_path / "joiner" / "model.json").read_text()) == spec["model"]
        other_stage = 1 - stage.stage  # a node the chain already assigned keeps its stage, whatever the rule says
        mid, chosen, _, why = resolve_onchain(a.rpc_url, dep, "auto", [peer_a], tmp_path / "joiner5",
                                              a.identities[other_stage].address)
        assert (mid, chosen) == (1, other_stage) and "assigned this node" in why
        mid, chosen, spec, _ = resolve_onchain(a.rpc_url, dep, "2", [peer_b], tmp_path / "joiner2")
        assert (mid, chosen, spec["training"]["lr"]) == (2, None, 1e-3)
        with pytest.raises(CLIError, match="no peer gave the spec"):
            resolve_onchain(a.rpc_url, dep, "2", [peer_a], tmp_path / "joiner3")  # model 1's peer has another spec
        # what `pmn node start --model auto` runs: the chosen model, stage and recipe, whose hash the chain holds
        cfg = node_config(OperatorConfig(rpc_url=a.rpc_url, deployment=dep, data_dir=str(tmp_path / "joiner4")),
                          {"model": "auto", "bootstrap": [peer_a]})
        assert (cfg.chain.model_id, cfg.stage, cfg.num_stages, cfg.optim_lr) == (1, str(stage.stage), 2, SMALL.lr)
        model = load_model_config(cfg.model)
        data = None if cfg.dataset is None else json.loads(Path(cfg.dataset).read_text())  # the spec's [data]
        hashed = None if data is None else DataSpec(**data).hashed()
        runs = proposal_spec_hash(model, training_section(cfg, optim_config(cfg, model)).to_dict(), hashed)
        assert runs == client.get_model(1).terms.spec_hash
    finally:
        stop_nodes(a.nodes + b.nodes)
        if a.stop_chain is not None:
            a.stop_chain()
        if hasattr(a, "w3"):
            disconnect(a.w3)
