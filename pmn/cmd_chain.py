"""Chain-facing commands: propose, models, shares, claim, contracts build|deploy, ledger verify.

A holder needs only an RPC URL and the deployment file; nothing here needs a running node.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from eth_account.signers.local import LocalAccount
from rich.console import Console
from rich.table import Table

from contracts.chain import connect, disconnect
from contracts.client import ProtocolContracts
from contracts.config import ChainConfig
from contracts.deploy import Deployment
from pmn.config import ChainSettings, HolderConfig, ResearcherConfig, load_config
from pmn.errors import CLIError, DeploymentError
from pmn.wallet import read_password, unlock_keystore

C = TypeVar("C", bound=ChainSettings)


@dataclass
class Session:
    """A connected chain client plus the role config it came from."""

    client: ProtocolContracts
    config: ChainSettings

    def close(self) -> None:
        """Close the connection to the chain."""
        disconnect(self.client.w3)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def role_config(cls: type[C], args: argparse.Namespace) -> C:
    """Role config from --config, PMN_* variables and the command's flags."""
    cfg = load_config(cls, getattr(args, "config", None))
    if getattr(args, "rpc_url", None):
        cfg.rpc_url = args.rpc_url
    if getattr(args, "deployment", None):
        cfg.deployment = str(args.deployment)
    if getattr(args, "keystore", None) and hasattr(cfg, "keystore"):
        cfg.keystore = str(args.keystore)  # type: ignore[attr-defined]
    if getattr(args, "outbox_dir", None) and hasattr(cfg, "outbox_dir"):
        cfg.outbox_dir = str(args.outbox_dir)  # type: ignore[attr-defined]
    return cfg


def chain_config(cfg: ChainSettings) -> ChainConfig:
    """Map a role's RPC settings onto the chain client's config."""
    return ChainConfig(connect_attempts=max(1, cfg.rpc_retries), backoff_initial_s=cfg.rpc_backoff_s,
                       request_timeout_s=cfg.rpc_timeout_s)


def load_deployment(cfg: ChainSettings) -> Deployment:
    """The configured deployment file (nothing is asked of the chain); clear errors when the RPC URL or the
    file is missing."""
    if not cfg.rpc_url:
        raise CLIError("no chain: pass --rpc-url URL (or set rpc_url / PMN_RPC_URL); only `pmn demo` runs an embedded chain")
    path = Path(cfg.deployment).expanduser()
    if not path.exists():
        raise DeploymentError(f"deployment file {path} not found: pass --deployment FILE (written by `pmn contracts deploy`)")
    try:
        return Deployment.load(path)
    except (ValueError, KeyError) as exc:
        raise DeploymentError(f"{path} is not a deployment file: {exc}") from None


def open_session(cfg: ChainSettings) -> Session:
    """Connect to the configured RPC URL and bind the deployment; clear errors when either is missing."""
    deployment = load_deployment(cfg)
    ccfg = chain_config(cfg)
    w3 = connect(cfg.rpc_url, ccfg)
    try:
        deployment.check_chain(w3)
        return Session(ProtocolContracts(w3, deployment, ccfg), cfg)
    except BaseException:
        disconnect(w3)
        raise


def unlock(cfg: Any, args: argparse.Namespace) -> LocalAccount:
    """The role's account, decrypted from its keystore."""
    return unlock_keystore(Path(cfg.keystore).expanduser(), read_password(getattr(args, "password_file", None)))


def _require_model(client: ProtocolContracts, model_id: int) -> None:
    count = client.model_count()
    if not 1 <= model_id <= count:
        raise CLIError(f"unknown model id {model_id}: this deployment has models 1..{count} (see `pmn models`)")


# -- researcher ------------------------------------------------------------------------------------


def cmd_propose(args: argparse.Namespace) -> int:
    from pmn.spec import load_proposal
    from protocol.accounting import accounting_function_hash

    proposal = load_proposal(args.spec)
    print(f"spec hash 0x{proposal.content_hash().hex()}")
    if args.dry_run:
        return 0
    cfg = role_config(ResearcherConfig, args)
    with open_session(cfg) as session:
        account = unlock(cfg, args)
        terms = proposal.terms
        model_id = session.client.propose_model(
            account, proposal.content_hash(), terms.metadata_uri or cfg.metadata_uri, proposal.training.stages,
            accounting_function_hash(), terms.epoch_length, terms.challenge_window_s, proposal.audit_rate_bps,
            terms.inference_fee_wei)
        print(f"model id {model_id}")
        return 0


def cmd_models(args: argparse.Namespace) -> int:
    with open_session(role_config(HolderConfig, args)) as session:
        models = session.client.list_models()
        rows = [{"model_id": m.model_id, "status": m.status, "proposer": m.proposer, "stages": m.terms.num_stages,
                 "spec_hash": "0x" + m.terms.spec_hash.hex(), "share_token": m.share_token,
                 "fee_wei": m.terms.inference_fee_wei, "total_shares": session.client.total_supply(m.model_id)}
                for m in models]
        if args.json:
            print(json.dumps(rows))
            return 0
        table = Table(title="models")
        for col in ("id", "status", "stages", "spec hash", "shares", "fee (wei)", "proposer"):
            table.add_column(col)
        for r in rows:
            table.add_row(str(r["model_id"]), str(r["status"]), str(r["stages"]), str(r["spec_hash"])[:18] + "…",
                          str(r["total_shares"]), str(r["fee_wei"]), str(r["proposer"]))
        Console().print(table)
        return 0


# -- holder ----------------------------------------------------------------------------------------


def share_report(client: ProtocolContracts, model_id: int, holder: str) -> dict[str, Any]:
    """Balance, fraction, claimable, claimed and per-epoch history of one holder."""
    _require_model(client, model_id)
    balance = client.balance_of(model_id, holder)
    supply = client.total_supply(model_id)
    history = [{"epoch": e, "units": u, "node": n} for e, n, u in leaf_history(client, model_id, holder)]
    return {"model_id": model_id, "holder": holder, "balance": balance, "total_supply": supply,
            "fraction": balance / supply if supply else 0.0, "claimable_wei": client.claimable(model_id, holder),
            "claimed_wei": client.claimed(model_id, holder), "history": history}


def leaf_history(client: ProtocolContracts, model_id: int, holder: str) -> list[tuple[int, str, int]]:
    """(epoch, node, units) of every leaf claim that minted shares to `holder`, from the ledger's LeafClaimed events."""
    logs = client.ledger.events.LeafClaimed().get_logs(from_block=client.deployment.block_number,
                                                        argument_filters={"modelId": model_id})
    return sorted((int(ev["args"]["epoch"]), str(ev["args"]["node"]), int(ev["args"]["units"])) for ev in logs
                  if str(ev["args"]["operator"]).lower() == holder.lower())


def cmd_shares(args: argparse.Namespace) -> int:
    cfg = role_config(HolderConfig, args)
    with open_session(cfg) as session:
        holder = args.holder or unlock(cfg, args).address
        report = share_report(session.client, args.model, holder)
        if args.json:
            print(json.dumps(report))
            return 0
        table = Table(title=f"shares of model {args.model} held by {holder}")
        table.add_column("figure")
        table.add_column("value", justify="right")
        for key in ("balance", "total_supply", "fraction", "claimable_wei", "claimed_wei"):
            value = report[key]
            table.add_row(key, f"{value:.6f}" if isinstance(value, float) else str(value))
        for h in report["history"]:
            table.add_row(f"epoch {h['epoch']}", f"{h['units']} units (node {h['node']})")
        Console().print(table)
        return 0


def cmd_claim(args: argparse.Namespace) -> int:
    """Claim through the holder's durable outbox (pmn/holder_outbox.py): recorded, then sent exactly once;
    while the chain is down the claim stays queued and a re-run sends it."""
    from pmn.holder_outbox import HolderOutbox, connection_lost, quiet_outbox_log

    quiet_outbox_log()
    cfg = role_config(HolderConfig, args)
    deployment = load_deployment(cfg)
    account = unlock(cfg, args)
    with HolderOutbox(cfg, deployment, account) as outbox:
        if not outbox.queued_claim(args.model):  # a new claim: check it is worth sending (when the chain answers)
            try:
                _require_model(outbox.box.client, args.model)
                if outbox.box.client.claimable(args.model, account.address) == 0:
                    raise CLIError(f"nothing to claim: {account.address} has 0 wei of model {args.model}'s revenue "
                                   "accrued (see `pmn shares`)")
            except Exception as exc:
                if not connection_lost(exc):
                    raise
                # the chain is down: record the claim anyway; an unknown model is refused when it is sent
        got = outbox.claim(args.model)
        print(f"claimed {got['amount_wei']} wei for {account.address} (model {args.model})")
        return 0


# -- tooling ---------------------------------------------------------------------------------------


def cmd_contracts_build(args: argparse.Namespace) -> int:
    from contracts.build import build

    changed = build(check=args.check)
    if args.check:
        if changed:
            raise CLIError(f"committed artifacts differ from a fresh compile: {', '.join(changed)}; run `pmn contracts build`")
        print("artifacts match a fresh compile")
    else:
        print("wrote " + (", ".join(changed) if changed else "nothing (artifacts already up to date)"))
    return 0


def cmd_contracts_deploy(args: argparse.Namespace) -> int:
    from eth_utils import is_address

    from contracts.deploy import deploy_all

    bad = [v for v in args.validator if not is_address(v)]
    if bad:
        raise CLIError(f"--validator {bad[0]!r} is not an address (0x + 40 hex digits)")
    most = max(1, len(args.validator))
    if not 1 <= args.quorum <= most:
        raise CLIError(f"--quorum must be in 1..{most} (the number of validators), got {args.quorum}")
    cfg = role_config(ResearcherConfig, args)
    if not cfg.rpc_url:
        raise CLIError("no chain: pass --rpc-url URL")
    ccfg = chain_config(cfg)
    w3 = connect(cfg.rpc_url, ccfg)
    try:
        admin = unlock(cfg, args)
        validators = args.validator or [admin.address]
        deployment = deploy_all(w3, admin, validators, args.quorum, config=ccfg)
    finally:
        disconnect(w3)
    deployment.save(args.out)
    print(f"deployed to chain {deployment.chain_id}; wrote {args.out}")
    for name, addr in sorted(deployment.addresses.items()):
        print(f"  {name:<22} {addr}")
    return 0


def cmd_ledger_verify(args: argparse.Namespace) -> int:
    from protocol.settlement import verify_onchain_epoch

    with open_session(role_config(HolderConfig, args)) as session:
        _require_model(session.client, args.model)
        if not args.receipts.exists():
            raise CLIError(f"receipts file {args.receipts} not found")
        result = verify_onchain_epoch(session.client, args.model, args.epoch, args.receipts.read_bytes())
        print(f"epoch {args.epoch} of model {args.model}: root 0x{result.root.hex()} matches the "
              f"{len(result.tree.leaves)} leaves recomputed from {len(result.receipts)} receipts "
              f"(total units {result.total_units})")
        return 0
