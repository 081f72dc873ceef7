"""Operator commands: `pmn node start`, `pmn node status`, `pmn swarm`."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pmn.config import OperatorConfig, load_config
from pmn.errors import CLIError


def cmd_node_start(args: argparse.Namespace) -> int:
    from node.daemon import main as daemon_main

    cfg = load_config(OperatorConfig, args.config)
    argv = ["--model", args.model or cfg.model, "--stage", args.stage or cfg.stage,
            "--data-dir", str(args.data_dir or cfg.data_dir),
            "--metrics-port", str(args.metrics_port if args.metrics_port is not None else cfg.metrics_port),
            "--capacity", str(cfg.capacity)]
    for addr in args.listen or cfg.listen:
        argv += ["--listen", addr]
    for addr in args.bootstrap or cfg.bootstrap:
        argv += ["--bootstrap", addr]
    if cfg.rpc_url:  # on-chain mode: co-signed receipts for every hop, paid inference after training
        if cfg.model_id < 1:
            raise CLIError("rpc_url is set but model_id is not: set model_id (or PMN_MODEL_ID) to the on-chain model id")
        argv += ["--rpc-url", cfg.rpc_url, "--deployment", str(Path(cfg.deployment).expanduser()),
                 "--model-id", str(cfg.model_id), "--linger"]
    return daemon_main(argv)  # the daemon prints its own one-line error; 130/143 = stopped by a signal


def cmd_node_status(args: argparse.Namespace) -> int:
    from node.status import node_status, read_progress

    cfg = load_config(OperatorConfig, args.config)
    data_dir = Path(args.data_dir or cfg.data_dir).expanduser()
    if not data_dir.exists():
        raise CLIError(f"no node data in {data_dir}: pass --data-dir of a node started with `pmn node start`")
    status = node_status(data_dir)
    progress = read_progress(data_dir)
    credited = pending = 0
    db = data_dir / "receipts.sqlite"
    if db.exists():
        import sqlite3

        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2) as conn:
            credited = int(conn.execute("SELECT COUNT(*) FROM receipts WHERE receiver_signature IS NOT NULL").fetchone()[0])
            pending = int(conn.execute("SELECT COUNT(*) FROM receipts WHERE receiver_signature IS NULL").fetchone()[0])
    report = {**status, "steps_recorded": len(progress), "receipts_cosigned": credited, "receipts_pending": pending}
    if args.json:
        print(json.dumps(report, default=str))
        return 0
    table = Table(title=f"node in {data_dir}")
    table.add_column("field")
    table.add_column("value", justify="right")
    for key in ("state", "stage", "peer_id", "address", "step", "loss", "tokens_per_s", "peers", "steps_recorded",
                "receipts_cosigned", "receipts_pending"):
        if key in report:
            value = report[key]
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    Console().print(table)
    return 0


def cmd_swarm(args: argparse.Namespace) -> int:
    from node.swarm import run_local_swarm

    if args.stages < 1 or args.steps < 1:
        raise CLIError("--stages and --steps must be >= 1")
    codec = args.codec or ("subspace" if "subspace" in args.model else "dense")
    tmp = None
    root = args.data_dir
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="pmn-swarm-")
        root = Path(tmp.name)
    try:
        result = run_local_swarm(args.stages, args.steps, root, model=args.model, codec=codec)
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
