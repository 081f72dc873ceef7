"""Operator commands: `pmn node start`, `pmn node status`, `pmn swarm`."""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from node.config import ChainConfig, NodeConfig
from node.errors import NodeError
from pmn.config import OperatorConfig, load_config
from pmn.errors import CLIError
from pmn.spec import TrainingRecipe, load_proposal
from sharding.config import PRESETS, ModelConfig
from sharding.dataset import DataSpec
from sharding.partition import partition


@dataclass(frozen=True)
class NodeModel:
    """The model a node trains, as `pmn node start|status` resolve it from a preset, spec TOML or JSON."""

    config: ModelConfig  # architecture (FLOPs, hence compute units, depend on it)
    stages: int  # pipeline depth it is split into
    daemon_model: str  # what the daemon's --model takes: a preset name or a ModelConfig JSON path
    recipe: TrainingRecipe | None  # the spec's training recipe, when the model came from a spec TOML
    data: DataSpec | None = None  # the spec's [data] section (dataset and tokenizer), when it has one


def resolve_model(model: str, stages: int | None, default_stages: int, json_dir: Path | None = None) -> NodeModel:
    """Resolve `model` (preset, spec TOML, ModelConfig JSON); a spec's stage count wins over `default_stages`.

    Presets and JSON files go through the node's own resolver (`node.model.load_model_config`). With
    `json_dir`, a spec TOML's architecture is written there as model.json for the node.
    """
    from node.model import load_model_config

    recipe = None
    data = None
    path = Path(model).expanduser()
    if model not in PRESETS and path.suffix == ".toml" and path.exists():
        proposal = load_proposal(path)
        config, recipe, data = proposal.model, proposal.training, proposal.data
        daemon_model = str(path)
        if json_dir is not None:
            proposal.check_local_data()  # the tokenizer file matches the spec: before the node allocates a weight
            json_dir.mkdir(parents=True, exist_ok=True)
            daemon_model = str(json_dir / "model.json")
            Path(daemon_model).write_text(json.dumps(config.to_dict(), sort_keys=True))
            if data is not None:
                (json_dir / "data.json").write_text(json.dumps(data.to_dict(), sort_keys=True))
    else:
        try:
            config = load_model_config(model)
        except ValueError as exc:
            hint = "" if path.exists() else ": pass --model NAME or a spec TOML path"
            raise CLIError(f"{exc}{hint}") from None
        daemon_model = model if model in PRESETS else str(path)
    n = stages if stages is not None else recipe.stages if recipe is not None else default_stages
    if n < 1 or n > config.n_layers:
        raise CLIError(f"--stages must be in 1..{config.n_layers} (the model's layers), got {n}")
    return NodeModel(config, n, daemon_model, recipe, data)


def node_config(op: OperatorConfig, flags: dict[str, Any]) -> NodeConfig:
    """The NodeConfig `pmn node start` runs: the operator config (file + PMN_* environment), the spec's
    training recipe, then the NodeConfig flags given (`flags`: dotted path -> value, see node.cli)."""
    from node.cli import apply_flags

    flags = dict(flags)
    data_dir = Path(flags.pop("data_dir", None) or op.data_dir).expanduser()
    model = flags.pop("model", None) or op.model
    if model == "auto" or model.isdigit():  # an on-chain model: its spec comes from its peers, checked by hash
        m, op = onchain_model(op, model, flags, data_dir)
    else:
        m = resolve_model(model, flags.pop("num_stages", None), op.stages, json_dir=data_dir)
    cfg = NodeConfig(data_dir=str(data_dir), model=m.daemon_model, num_stages=m.stages, stage=op.stage,
                     listen=list(op.listen), bootstrap=list(op.bootstrap), metrics_port=op.metrics_port,
                     capacity=op.capacity, device=op.device)
    if m.recipe is not None:  # the spec's recipe, all of it: nodes with another one would not interoperate
        from dataclasses import fields

        r = cfg.runtime
        r.codec, r.num_microbatches, r.microbatch_size = m.recipe.codec, m.recipe.microbatches, m.recipe.microbatch_size
        cfg.optim_lr = m.recipe.lr
        for f in fields(cfg.recipe):  # warm-up, data order, schedule, AdamW, clipping, batch tokens
            setattr(cfg.recipe, f.name, getattr(m.recipe, f.name))
        if m.recipe.total_steps is not None:
            r.steps = m.recipe.total_steps
        r.replica_averaging, r.powersgd_rank = m.recipe.replica_averaging, m.recipe.powersgd_rank
        r.powersgd_bits, r.powersgd_iterations = m.recipe.powersgd_bits, m.recipe.powersgd_iterations
        r.powersgd_block_rank, r.replica_exchange = m.recipe.powersgd_block_rank, m.recipe.replica_exchange
        r.schedule, r.max_staleness = m.recipe.pipeline_schedule, m.recipe.max_staleness
        r.async_lookahead = m.recipe.async_lookahead
    if m.data is not None:  # the spec's dataset and tokenizer, hash-checked by the node at start
        if flags.get("corpus") is not None:
            raise CLIError("--corpus conflicts with the spec's [data] section: the node trains on what the spec "
                           "pins; drop --corpus")
        cfg.dataset = str(data_dir / "data.json")
    if op.rpc_url:  # on-chain mode: co-signed receipts for every hop, paid inference after training
        if op.model_id < 1:
            raise CLIError("rpc_url is set but model_id is not: set model_id (or PMN_MODEL_ID) to the on-chain model id")
        cfg.chain = ChainConfig(op.rpc_url, str(Path(op.deployment).expanduser()), op.model_id)
        cfg.linger = True
    return apply_flags(cfg, flags)


def onchain_model(op: OperatorConfig, model: str, flags: dict[str, Any], data_dir: Path
                  ) -> tuple[NodeModel, OperatorConfig]:
    """`--model auto|ID`: the model (and with auto, the stage) chosen from the chain, its spec fetched from the
    bootstrap peers and checked against the on-chain hash; prints why. Returns the model and the operator
    config bound to it (model_id, stage)."""
    import sys
    from dataclasses import replace

    from pmn.cmd_models import resolve_onchain
    from protocol.modelspec import TrainingSection

    rpc_url = flags.pop("chain.rpc_url", None) or op.rpc_url
    deployment = flags.pop("chain.deployment", None) or op.deployment
    bootstrap = flags.get("bootstrap") or op.bootstrap
    model_id, stage, spec, why = resolve_onchain(rpc_url, deployment, model, list(bootstrap), data_dir,
                                                 _node_address(data_dir, {}))
    print(f"joining {why}", file=sys.stderr, flush=True)
    try:
        config = ModelConfig.from_dict(spec["model"])
        training = TrainingSection.from_dict(spec["training"]).validate(config)  # later fields: defaults
    except (TypeError, ValueError) as exc:
        raise CLIError(f"model {model_id}: the fetched spec is not one this node software runs: {exc}") from None
    recipe = training
    data = None
    if spec.get("data") is not None:  # the spec's [data] (hashed fields; the documents and tokenizer are local)
        from sharding.dataset import DataSpec

        try:
            data = DataSpec(**spec["data"]).validate()
        except (TypeError, ValueError) as exc:
            raise CLIError(f"model {model_id}: the fetched spec's [data] is not one this node software reads: "
                           f"{exc}") from None
        data_dir.mkdir(parents=True, exist_ok=True)
        (data_dir / "data.json").write_text(json.dumps(data.to_dict(), sort_keys=True))
    flags.pop("num_stages", None)  # the spec's stage count is the model's
    chosen = str(stage) if stage is not None and "stage" not in flags else op.stage
    op = replace(op, rpc_url=rpc_url, deployment=str(deployment), model_id=model_id, stage=chosen)
    return NodeModel(config, training.stages, str(data_dir / "model.json"), recipe, data), op


def cmd_node_start(args: argparse.Namespace) -> int:
    from node import cli as node_cli

    cfg = node_config(load_config(OperatorConfig, args.config), node_cli.flag_values(args))
    return node_cli.start(cfg)  # the node prints its own one-line error; 130/143 = stopped by a signal


def _node_address(data_dir: Path, status: dict[str, Any]) -> str | None:
    """The node key's address: from the status file, else from the key file (never creates a key)."""
    if status.get("address"):
        return str(status["address"])
    from node.net.identity import KEY_FILE, node_account

    key = data_dir / KEY_FILE
    if not key.exists():
        return None
    try:
        return str(node_account(bytes.fromhex(key.read_text().strip().removeprefix("0x"))).address)
    except (ValueError, NodeError) as exc:
        raise CLIError(f"{key} is not a node key: {exc}") from None


def compute_report(data_dir: Path, model: NodeModel, address: str | None, stage: int | None) -> dict[str, Any]:
    """Compute credited and pending of the node `address`, from its receipt store, by the attesters' rules.

    Credited: microbatches the crediting rule (`protocol.epoch.credit`, units by `protocol.accounting`)
    grants this node from its co-signed, verified receipts. Pending: microbatches it took part in that are
    not credited yet (a hop not co-signed or missing), valued with the same accounting function.
    """
    from protocol.accounting import compute_units
    from protocol.epoch import AnyKey, EpochContext, credit, select_receipts
    from protocol.errors import ProtocolError
    from protocol.receipts import Domain
    from protocol.store import ReceiptStore, StoreConfig

    out: dict[str, Any] = {"credited_units": 0, "credited_microbatches": 0, "pending_units": 0,
                           "pending_microbatches": 0, "receipts_cosigned": 0, "receipts_pending": 0,
                           "receipts_invalid": 0, "epochs": []}
    db = data_dir / "receipts.sqlite"
    if not db.exists() or address is None:
        return out
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            groups = conn.execute("SELECT DISTINCT model_id, epoch, chain_id, verifying_contract FROM receipts "
                                  "ORDER BY CAST(model_id AS INTEGER), epoch").fetchall()
    except sqlite3.Error as exc:
        raise CLIError(f"cannot read the receipt store {db}: {exc}") from None
    specs = tuple(partition(model.config, model.stages))
    me = address.lower()
    for model_id, epoch, chain_id, contract in groups:
        domain = Domain(int(chain_id), contract)
        try:
            with ReceiptStore(StoreConfig(data_dir=data_dir), domain, AnyKey()) as store:
                rows = [r for r in store.epoch_receipts(int(model_id), int(epoch))
                        if r.domain == domain and me in (r.receipt.sender.lower(), r.receipt.receiver.lower())]
        except ProtocolError as exc:
            raise CLIError(f"cannot read the receipt store {db}: {exc}") from None
        for r in rows:
            worst = max(r.receipt.stage, r.receipt.receiver_stage)
            if worst >= model.stages:
                raise CLIError(f"stored receipts name stage {worst} but the model has {model.stages} stages: "
                               "pass --stages (or --model) of the model this node trains")
        cosigned = [r for r in rows if r.cosigned]
        ctx = EpochContext(int(model_id), int(epoch), model.config, specs, domain)
        accepted, rejected = select_receipts(cosigned, ctx, AnyKey())
        mine = [c for c in credit(accepted, model.config, specs).credits if c.node.lower() == me]
        credited = {(c.step, c.microbatch) for c in mine}
        tokens: dict[tuple[int, int], int] = {}
        stage_of: dict[tuple[int, int], int] = {}
        for r in rows:
            mb = (r.receipt.step, r.receipt.microbatch)
            tokens[mb] = min(tokens.get(mb, r.receipt.tokens), r.receipt.tokens)
            own = r.receipt.stage if r.receipt.sender.lower() == me else r.receipt.receiver_stage
            stage_of[mb] = stage if stage is not None else own
        pending = {mb: t for mb, t in tokens.items() if mb not in credited}
        pending_units = sum(compute_units(model.config, specs[stage_of[mb]], t) for mb, t in pending.items())
        row = {"model_id": int(model_id), "epoch": int(epoch), "credited_units": sum(c.units for c in mine),
               "credited_microbatches": len(mine), "pending_units": pending_units,
               "pending_microbatches": len(pending), "receipts_cosigned": len(cosigned),
               "receipts_pending": len(rows) - len(cosigned), "receipts_invalid": len(rejected)}
        out["epochs"].append(row)
        for key in row:
            if key not in ("model_id", "epoch"):
                out[key] += row[key]
    return out


def nat_rows(nat: dict[str, Any] | None) -> list[tuple[str, str]]:
    """Status-table rows of a node's `nat` section: reachability and why, relays, each peer's path."""
    if not nat:
        return []
    rows = [("reachability", f"{nat.get('reachability')} ({nat.get('reason', '')})"),
            ("relay service", "on" if nat.get("relay_service") else "off")]
    if nat.get("reachability") == "private":
        rows.append(("relays", ", ".join(nat.get("relays") or []) or "none"))
        for relay, why in sorted((nat.get("relay_refused") or {}).items()):
            rows.append((f"relay {relay[:16]}...", f"not used: {why}"))
    punch = nat.get("holepunch") or {}
    for peer, path in sorted((nat.get("peers") or {}).items()):
        extra = f" (hole punch: {punch[peer]})" if peer in punch and punch[peer] != path else ""
        rows.append((f"peer {peer[:16]}...", f"{path}{extra}"))
    return rows


def cmd_node_status(args: argparse.Namespace) -> int:
    from node.observability.status import node_status, read_progress

    cfg = load_config(OperatorConfig, args.config)
    data_dir = Path(args.data_dir or cfg.data_dir).expanduser()
    if not data_dir.is_dir():
        raise CLIError(f"no node data in {data_dir}: pass --data-dir of a node started with `pmn node start`")
    if args.stages is not None and args.stages < 1:
        raise CLIError(f"--stages must be >= 1, got {args.stages}")
    model = resolve_model(args.model or cfg.model, args.stages, cfg.stages)
    try:
        status = node_status(data_dir)
        progress = read_progress(data_dir)
    except (ValueError, OSError) as exc:
        raise CLIError(f"the status files in {data_dir} are unreadable: {exc}") from None
    stage = status.get("stage")
    stage = int(stage) if isinstance(stage, int) else None
    if stage is not None and not 0 <= stage < model.stages:
        raise CLIError(f"the node serves stage {stage} but the model has {model.stages} stages: pass --stages")
    address = _node_address(data_dir, status)
    tokens = sum(int(r.get("tokens", 0)) for r in progress)
    seconds = sum(float(r.get("seconds", 0.0)) for r in progress)
    report = {"data_dir": str(data_dir), "state": status.get("state"), "stage": stage, "stages": model.stages,
              "peer_id": status.get("peer_id"), "address": address, "step": status.get("step"),
              "loss": status.get("loss"), "peers": status.get("peers"),
              "tokens_per_s": status.get("tokens_per_s"),
              "tokens_per_s_mean": tokens / seconds if seconds > 0 else None, "steps_recorded": len(progress),
              "nat": status.get("nat"),
              **compute_report(data_dir, model, address, stage)}
    if args.json:
        print(json.dumps(report, default=str))
        return 0
    table = Table(title=f"node in {data_dir}")
    table.add_column("field")
    table.add_column("value", justify="right")
    for key in ("state", "stage", "peer_id", "address", "step", "loss", "peers", "tokens_per_s", "tokens_per_s_mean",
                "steps_recorded"):
        value = report[key]
        table.add_row(key.replace("_", " "), "" if value is None else f"{value:.4g}" if isinstance(value, float)
                      else str(value))
    table.add_row("compute credited", f"{report['credited_units']} units ({report['credited_microbatches']} "
                                      f"microbatches, {report['receipts_cosigned']} co-signed receipts)")
    table.add_row("compute pending", f"{report['pending_units']} units ({report['pending_microbatches']} "
                                     f"microbatches, {report['receipts_pending']} receipts not co-signed)")
    for label, value in nat_rows(report["nat"]):
        table.add_row(label, value)
    for e in report["epochs"]:
        table.add_row(f"model {e['model_id']} epoch {e['epoch']}",
                      f"{e['credited_units']} credited, {e['pending_units']} pending")
    Console().print(table)
    return 0


def cmd_swarm(args: argparse.Namespace) -> int:
    from node.testing.swarm import run_local_swarm

    if args.stages < 1 or args.steps < 1:
        raise CLIError("--stages and --steps must be >= 1")
    from sharding.device import device_info, resolve_device
    from sharding.errors import DeviceError

    try:
        print(device_info(resolve_device(getattr(args, "device", "auto"))).line(), file=sys.stderr, flush=True)
    except DeviceError as exc:
        raise CLIError(str(exc)) from None
    codec = args.codec or ("subspace" if "subspace" in args.model else "dense")
    tmp = None
    root = args.data_dir
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="pmn-swarm-")
        root = Path(tmp.name)
    try:
        result = run_local_swarm(args.stages, args.steps, root, model=args.model, codec=codec,
                                 extra_args=["--device", getattr(args, "device", "auto")])
    finally:
        if tmp is not None:
            tmp.cleanup()
    if not args.json:
        table = Table(title=f"local swarm: {args.stages} node processes, {args.steps} steps, codec {codec}")
        table.add_column("step", justify="right")
        table.add_column("tail loss", justify="right")
        for i, loss in enumerate(result.losses):
            table.add_row(str(i), f"{loss:.4f}")
        Console().print(table)
        for peer in result.peers:
            print(f"stage {peer['stage']}: {peer['peer_id']} {' '.join(peer['addrs'])}")
    print(json.dumps({"stages": args.stages, "steps": args.steps, "codec": codec, "losses": result.losses,
                      "peers": [p["peer_id"] for p in result.peers]}))
    return 0
