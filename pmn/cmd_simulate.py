"""`pmn simulate wan|incentives`: thin wrappers over `simulations` printing a table and a JSON last line."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console
from rich.table import Table


def _print(result: dict[str, Any], title: str, as_json: bool) -> None:
    if not as_json:
        table = Table(title=title)
        table.add_column("figure")
        table.add_column("value", justify="right")
        for key, value in result.items():
            if isinstance(value, (int, float, str)):
                table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
            elif isinstance(value, dict) and all(isinstance(v, (int, float)) for v in value.values()):
                for sub, v in value.items():
                    table.add_row(f"{key}.{sub}", f"{v:.4g}" if isinstance(v, float) else str(v))
            elif isinstance(value, list) and all(isinstance(v, str) for v in value):
                for i, v in enumerate(value):
                    table.add_row(f"{key}[{i}]", v)
        Console().print(table)
    print(json.dumps(result, sort_keys=True, default=str))


def _overlap(args: argparse.Namespace) -> bool:
    """--overlap-averaging as given, else on for every averaging option but dense (PowerSGD: the node's exchange)."""
    given = getattr(args, "overlap_averaging", None)
    return bool(given) if given is not None else not str(args.averaging).startswith("dense")


def _node_as_built(args: argparse.Namespace, schedule: str) -> tuple[str, str]:
    """--contributions and --head as given, else the node as built: async with replicas runs only with the step
    exchange and its delegated head (`NodeConfig`: replica_exchange = step, replicas.head_delegation)."""
    contributions = getattr(args, "contributions", None)
    if contributions is None:
        contributions = "step" if schedule == "async" and _overlap(args) and \
            str(args.averaging).startswith("powersgd") else "microbatch"
    head = getattr(args, "head", None)
    if head is None:
        head = "delegated" if contributions == "step" else "leader"
    return contributions, head


def cmd_wan(args: argparse.Namespace) -> int:
    from simulations.wan import run_wan

    if getattr(args, "vs", None) == "datacenter":
        from pmn.errors import CLIError
        from simulations.calibrate import DEFAULT_PATH, load_calibration
        from simulations.datacenter import MICROBATCH_SEQS, run_vs_datacenter
        from simulations.params import Schedule

        if args.preset != "protocolnanogpt":
            raise CLIError(f"--vs datacenter compares the protocolnanogpt model; got --preset {args.preset}")
        schedule: Schedule = args.schedule or "async"
        contributions, head = _node_as_built(args, schedule)
        try:
            result = run_vs_datacenter(load_calibration(DEFAULT_PATH), schedule=schedule,
                                       max_staleness=args.max_staleness, averaging=args.averaging,
                                       overlap_averaging=_overlap(args),
                                       contributions=contributions,
                                       microbatch_seqs=getattr(args, "microbatch_seqs", MICROBATCH_SEQS),
                                       head=head,
                                       async_loss_ratio=args.async_loss_ratio,
                                       averaging_loss_ratio=args.averaging_loss_ratio,
                                       inflight_per_replica=getattr(args, "inflight_per_replica", None),
                                       tasks_per_delegate=getattr(args, "tasks_per_delegate", None),
                                       collective=getattr(args, "collective", "direct"))
        except ValueError as exc:
            raise CLIError(str(exc)) from None
        _print(result, "WAN vs datacenter: protocolnanogpt, 8 stages x 16 replicas", args.json)
        return 0
    kwargs: dict[str, Any] = {}
    if args.plots is not None:
        kwargs["plots_dir"] = args.plots
    if getattr(args, "schedule", None):
        kwargs["schedule"] = args.schedule
    result = run_wan(args.preset, **kwargs)
    _print(result, f"WAN pipeline simulation: {args.preset}", args.json)
    return 0


def cmd_incentives(args: argparse.Namespace) -> int:
    from simulations.incentives import run_incentives

    kwargs: dict[str, Any] = {}
    if args.plots is not None:
        kwargs["plots_dir"] = args.plots
    result = run_incentives(**kwargs)
    _print(result, "Incentive simulation: net earnings per class", args.json)
    return 0
