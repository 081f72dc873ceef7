"""`pmn infer`: pay the model's fee on chain, then stream text generated through the stage peers."""

from __future__ import annotations

import argparse
import os
import sys

import trio

from pmn.cmd_chain import _require_model, open_session, role_config, unlock
from pmn.config import HolderConfig
from pmn.errors import CLIError


def cmd_infer(args: argparse.Namespace) -> int:
    from node.host import parse_peer_addr
    from node.inference import generate, head_stream_opener

    cfg = role_config(HolderConfig, args)
    peers = args.bootstrap or cfg.bootstrap
    if not peers:
        raise CLIError("no stage peer: pass --bootstrap MULTIADDR of a stage-0 node (printed by `pmn node start`)")
    parse_peer_addr(peers[0])  # a malformed address fails here, before any fee is paid
    session = open_session(cfg)
    _require_model(session.client, args.model)
    fee = session.client.get_model(args.model).terms.inference_fee_wei
    account = unlock(cfg, args)
    request_id = os.urandom(32)
    tx_hash = session.client.deposit_revenue(account, args.model, fee, request_id)
    print(f"paid {fee} wei for request 0x{request_id.hex()} in tx 0x{tx_hash.hex()}", file=sys.stderr)

    async def run() -> None:
        async with head_stream_opener(peers[0]) as open_stream:
            sys.stdout.write(args.prompt)
            async for token in generate(open_stream, list(args.prompt.encode()), request_id=request_id,
                                        tx_hash=tx_hash, max_new_tokens=args.max_new_tokens):
                sys.stdout.write(bytes([token]).decode("latin-1"))
                sys.stdout.flush()
            sys.stdout.write("\n")

    trio.run(run)
    return 0
