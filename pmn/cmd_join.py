"""`pmn node join`: put this node on chain for a model, so its peers admit it.

An operator picks a model (`--model auto` by the rule of docs/MODEL_CHOICE.md, or `--model ID`) and a stage
(`--stage N`, or the stage the rule gives). Then, with the operator's keystore paying:
  1. the node key in the data directory (created when missing) is registered with the stake its capacity
     needs, signed by the node key itself (skipped when it is already registered by this operator);
  2. the node is assigned to the stage, adding the stake one more stage needs (skipped when it already serves
     that stage).
Both steps are read back from the chain first, so running `join` twice changes nothing the second time. It
ends with the `pmn node start` line that trains what it joined.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from eth_account.signers.local import LocalAccount

from contracts.client import ProtocolContracts
from contracts.errors import ContractsError
from pmn.cmd_chain import open_session, role_config, unlock
from pmn.cmd_models import JOINABLE, all_reports, choose, model_report
from pmn.config import OperatorConfig
from pmn.errors import CLIError


@dataclass
class JoinResult:
    """What `pmn node join` did (its --json output)."""

    model_id: int  # the model joined
    stage: int  # the stage the node serves in it
    node_key: str  # the node's address (its key lives in the data directory)
    operator: str  # the operator account that staked for it
    registered: bool  # True when this run registered the node key (False: it already was)
    assigned: bool  # True when this run assigned the stage (False: the node already served it)
    why: str  # why this model and stage
    start: str  # the command that trains what was joined


def choose_target(client: ProtocolContracts, model: str, stage: int | None) -> tuple[int, int, str]:
    """(model id, stage, why) for `--model auto|ID [--stage N]`; CLIError for what cannot be joined."""
    if model == "auto":
        best, best_stage, why = choose(all_reports(client))
        model_id = best.model_id
        chosen = best_stage.stage if stage is None else stage
        if stage is not None:
            why = f"model {model_id} by the auto rule; stage {stage} chosen by --stage"
    elif model.isdigit():
        model_id = int(model)
        if not 1 <= model_id <= client.model_count():
            raise CLIError(f"model {model_id} does not exist on chain ({client.model_count()} proposed; see "
                           "`pmn models`)")
        report = model_report(client, model_id)
        if report.status not in JOINABLE:
            raise CLIError(f"model {model_id} is {report.status}: it cannot be joined")
        chosen = report.best_stage().stage if stage is None else stage
        why = f"model {model_id} chosen by --model; stage {chosen} " + (
            "chosen by --stage" if stage is not None else "where a newcomer does the largest part of the work")
    else:
        raise CLIError(f"--model {model!r}: join takes an on-chain model id or 'auto'")
    stages = client.get_model(model_id).terms.num_stages
    if not 0 <= chosen < stages:
        raise CLIError(f"--stage {chosen}: model {model_id} has stages 0..{stages - 1}")
    return model_id, chosen, why


def join(client: ProtocolContracts, operator: LocalAccount, data_dir: Path, model: str, stage: int | None,
         capacity: int) -> JoinResult:
    """Register the data directory's node key (if needed) and assign it to the chosen stage (if needed)."""
    from node.net.identity import load_or_create_identity

    model_id, chosen, why = choose_target(client, model, stage)
    ident = load_or_create_identity(data_dir)
    current = client.stage_of(model_id, ident.address)
    if stage is None and current is not None and current != chosen:  # no --stage: keep the stage it serves
        chosen, why = current, f"model {model_id}; stage {current}, which this node already serves"
    op_address = str(operator.address)
    info = client.node_info(ident.address)
    registered = False
    if info.status == "None":
        client.register_node(operator, ident.account, capacity, client.stake_required(capacity))
        registered = True
    elif info.operator.lower() != op_address.lower():
        raise CLIError(f"node key {ident.address} is registered by operator {info.operator}, not by "
                       f"{op_address}: use that operator's keystore")
    elif info.status != "Active":
        raise CLIError(f"node key {ident.address} is {info.status}: it cannot take a stage (register a new node "
                       "key in another --data-dir)")
    assigned = False
    if current is None:
        client.assign_stage(operator, ident.address, model_id, chosen)
        assigned = True
    elif current != chosen:
        raise CLIError(f"node key {ident.address} already serves stage {current} of model {model_id}: start it "
                       f"with --stage {current}, or leave that stage first")
    start = f"pmn node start --model {model_id} --stage {chosen} --data-dir {data_dir} --rpc-url URL " \
            "--deployment FILE --bootstrap PEER"
    return JoinResult(model_id, chosen, ident.address, op_address, registered, assigned, why, start)


def cmd_node_join(args: argparse.Namespace) -> int:
    cfg = role_config(OperatorConfig, args)
    data_dir = Path(args.data_dir or cfg.data_dir).expanduser()
    model = args.model or cfg.model
    capacity = args.capacity if args.capacity is not None else cfg.capacity
    with open_session(cfg) as session:
        operator = unlock(cfg, args)
        try:
            result = join(session.client, operator, data_dir, model, args.stage, capacity)
        except ContractsError as exc:
            raise CLIError(f"joining model {model}: {exc}") from None
    if args.json:
        print(json.dumps(asdict(result)))
        return 0
    print(f"joining {result.why}")
    print(f"node key {result.node_key}: " + ("registered now" if result.registered else "already registered")
          + f" (operator {result.operator})")
    print(f"stage {result.stage} of model {result.model_id}: " + ("assigned now" if result.assigned
                                                                 else "already assigned"))
    print(f"train it: {result.start}")
    return 0


__all__ = ["JoinResult", "choose_target", "cmd_node_join", "join"]
