"""`pmn models` and the choice of a model to train (`pmn node start --model auto|ID`).

Everything comes from the contracts: terms from the model registry, contributors per stage from the node
registry's StageAssigned/StageLeft events, credited compute from the ledger's LeafClaimed events, revenue
from the share token. The rule `--model auto` applies is `choose` (docs/MODEL_CHOICE.md):

    score(model) = (revenue deposited so far + one inference fee) / (shares outstanding + shares one epoch mints)

the revenue each share has earned so far (one fee as a prior for a model that has not earned yet), diluted by
the next epoch's minting. The protocol mints one share per verified compute unit on every stage, so the score
is also the expected revenue per compute unit a newcomer contributes. Within the chosen model it joins the
stage where it would do the largest part of the stage's work: `units_s / (nodes_s + 1)` (units a stage is
credited per settled epoch; before any epoch settled, the stage with the fewest nodes).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from contracts.client import ProtocolContracts
from pmn.errors import CLIError

JOINABLE = ("Proposed", "Training")  # model statuses a node may join


@dataclass
class StageReport:
    """One stage of one model, as the chain tells it."""

    stage: int  # stage index
    contributors: list[str]  # node keys assigned to it now
    units_credited: int  # compute units claimed on the ledger by nodes of this stage, all epochs
    units_per_epoch: float  # units_credited / epochs settled (0 before any)
    new_node_share: float  # fraction of one epoch's new shares a node joining this stage would get


@dataclass
class ModelReport:
    """One proposed model: terms, contributors and compute per stage, revenue, and its score for a newcomer."""

    model_id: int
    status: str
    proposer: str
    spec_hash: str
    share_token: str
    metadata_uri: str
    stages: int
    audit_rate: float  # fraction of hops spot-checked
    epoch_length: int  # steps per accounting epoch
    challenge_window_s: int
    fee_wei: int  # inference fee per request
    total_shares: int
    revenue_deposited_wei: int
    epochs_settled: int
    per_stage: list[StageReport]
    score: float  # expected revenue per compute unit (wei per unit), the rule above

    def best_stage(self) -> StageReport:
        """The stage a newcomer joins: the largest part of a stage's work, then the fewest nodes, then the index."""
        return max(self.per_stage, key=lambda s: (s.new_node_share, -len(s.contributors), -s.stage))


def _logs(event: Any, client: ProtocolContracts, model_id: int) -> list[Any]:
    return list(event().get_logs(from_block=client.deployment.block_number, argument_filters={"modelId": model_id}))


def model_report(client: ProtocolContracts, model_id: int) -> ModelReport:
    """What `pmn models` shows of one model (read-only calls and event logs)."""
    info = client.get_model(model_id)
    t = info.terms
    n = t.num_stages
    members: dict[str, int] = {}  # node key -> stage, replaying assignments in order
    events = _logs(client.nodes.events.StageAssigned, client, model_id) + _logs(client.nodes.events.StageLeft, client,
                                                                                   model_id)
    events.sort(key=lambda e: (e["blockNumber"], e["logIndex"]))
    for ev in events:
        key = str(ev["args"]["nodeKey"])
        if ev["event"] == "StageAssigned":
            members[key] = int(ev["args"]["stage"])
        else:
            members.pop(key, None)
    claims = _logs(client.ledger.events.LeafClaimed, client, model_id)
    stage_of_node = {k.lower(): s for k, s in members.items()}
    for ev in events:  # a node that left keeps the credit of the stage it served
        stage_of_node.setdefault(str(ev["args"]["nodeKey"]).lower(), int(ev["args"]["stage"]))
    units = [0] * n
    for ev in claims:
        s = stage_of_node.get(str(ev["args"]["node"]).lower())
        if s is not None and 0 <= s < n:
            units[s] += int(ev["args"]["units"])
    epochs = len({int(ev["args"]["epoch"]) for ev in claims})
    per_epoch = [u / epochs if epochs else 0.0 for u in units]
    counts = [sum(1 for s in members.values() if s == i) for i in range(n)]
    minted = sum(per_epoch)
    if minted > 0:
        shares = [per_epoch[i] / (counts[i] + 1) / minted for i in range(n)]
    else:  # nothing settled yet: stages taken as equal work
        shares = [1.0 / n / (counts[i] + 1) for i in range(n)]
    supply = client.total_supply(model_id)
    revenue = int(client.token(model_id).functions.totalDeposited().call())
    score = (revenue + t.inference_fee_wei) / max(supply + minted, 1.0)
    per_stage = [StageReport(i, sorted(k for k, s in members.items() if s == i), units[i], per_epoch[i], shares[i])
                 for i in range(n)]
    return ModelReport(model_id, info.status, info.proposer, "0x" + t.spec_hash.hex(), info.share_token,
                       t.metadata_uri, n, t.audit_rate_bps / 10_000, t.epoch_length, t.challenge_window,
                       t.inference_fee_wei, supply, revenue, epochs, per_stage, score)


def all_reports(client: ProtocolContracts) -> list[ModelReport]:
    """Every proposed model, by id."""
    return [model_report(client, m) for m in range(1, client.model_count() + 1)]


def choose(reports: list[ModelReport]) -> tuple[ModelReport, StageReport, str]:
    """(model, stage, why) under the rule of this module's docstring; CLIError when no model can be joined."""
    open_models = [r for r in reports if r.status in JOINABLE]
    if not open_models:
        raise CLIError(f"no model to join: none of the {len(reports)} proposed models is Proposed or Training")
    best = max(open_models, key=lambda r: (r.score, r.fee_wei, -r.model_id))
    stage = best.best_stage()
    others = ", ".join(f"model {r.model_id}: {r.score:.4g}" for r in open_models if r is not best)
    why = (f"model {best.model_id} has the best expected revenue per compute unit, {best.score:.4g} wei/unit "
           f"((revenue {best.revenue_deposited_wei} + fee {best.fee_wei} wei) / (shares {best.total_shares} + one "
           f"epoch's {sum(s.units_per_epoch for s in best.per_stage):.0f} new))" + (f" (others: {others})" if others else "")
           + f"; stage {stage.stage}: a newcomer would do {100 * stage.new_node_share:.1f}% of an epoch's compute there "
           f"({len(stage.contributors)} node(s) serve it now)")
    return best, stage, why


def _short(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"


def cmd_models(args: argparse.Namespace) -> int:
    from pmn.cmd_chain import open_session, role_config
    from pmn.config import HolderConfig

    with open_session(role_config(HolderConfig, args)) as session:
        reports = all_reports(session.client)
    if args.json:
        print(json.dumps([asdict(r) for r in reports]))
        return 0
    console = Console()
    table = Table(title="proposed models (shares: one per verified compute unit)")
    for col in ("id", "status", "stages", "audit", "epoch", "fee (wei)", "revenue (wei)", "shares", "per stage: "
                "nodes / compute credited / newcomer's share of an epoch", "wei/unit"):
        table.add_column(col, justify="right" if col not in ("status",) else "left")
    for r in reports:
        stages = "  ".join(f"s{s.stage}: {len(s.contributors)} / {_short(s.units_credited)} / {100 * s.new_node_share:.0f}%"
                           for s in r.per_stage)
        table.add_row(str(r.model_id), r.status, str(r.stages), f"{r.audit_rate:g}", str(r.epoch_length),
                      _short(r.fee_wei), _short(r.revenue_deposited_wei), _short(r.total_shares), stages, f"{r.score:.3g}")
    console.print(table)
    if any(r.status in JOINABLE for r in reports):
        console.print("auto choice: " + choose(reports)[2])
    return 0


def resolve_onchain(rpc_url: str, deployment: str, model: str, bootstrap: list[str], json_dir: Path,
                    node_address: str | None = None) -> tuple[int, int | None, dict[str, Any], str]:
    """For `--model auto|ID`: (model id, chosen stage or None, the spec fetched from a peer and checked against
    the on-chain hash, why). The spec's architecture is written to json_dir/model.json. A node
    (`node_address`) the chain already assigned to a stage of the model serves that stage (`pmn node join`)."""
    import trio

    from contracts.chain import connect, disconnect
    from contracts.deploy import Deployment
    from node.services.spec_exchange import SpecExchangeError, fetch_spec_from

    if not rpc_url or not deployment:
        raise CLIError(f"--model {model} reads the chain: set rpc_url and deployment (--rpc-url, --deployment)")
    w3 = connect(rpc_url)
    try:
        client = ProtocolContracts(w3, Deployment.load(Path(deployment).expanduser()))
        if model == "auto":
            best, stage, why = choose(all_reports(client))
            model_id, chosen = best.model_id, stage.stage
        else:
            model_id = int(model)
            if not 1 <= model_id <= client.model_count():
                raise CLIError(f"model {model_id} does not exist on chain ({client.model_count()} proposed)")
            report = model_report(client, model_id)
            if report.status not in JOINABLE:
                raise CLIError(f"model {model_id} is {report.status}: it cannot be joined")
            chosen, why = None, f"model {model_id} chosen by --model"
        spec_hash = client.get_model(model_id).terms.spec_hash
        assigned = client.stage_of(model_id, node_address) if node_address else None
        if assigned is not None and assigned != chosen:
            chosen, why = assigned, f"{why}; stage {assigned}: the chain assigned this node to it"
    finally:
        disconnect(w3)
    try:
        spec, peer = trio.run(fetch_spec_from, list(bootstrap), spec_hash)
    except SpecExchangeError as exc:
        raise CLIError(f"model {model_id}: {exc}") from None
    json_dir.mkdir(parents=True, exist_ok=True)
    (json_dir / "model.json").write_text(json.dumps(spec["model"], sort_keys=True))
    return model_id, chosen, spec, f"{why}; spec 0x{spec_hash.hex()[:16]}… fetched from {peer.split('/p2p/')[-1][:16]}… " \
                                    "and checked against the chain"


__all__ = ["ModelReport", "StageReport", "all_reports", "choose", "cmd_models", "model_report", "resolve_onchain"]
