"""`pmn infer`: pay the model's fee on chain, then stream text generated through the stage peers."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import trio

from pmn.cmd_chain import _require_model, open_session, role_config, unlock
from pmn.config import HolderConfig
from pmn.errors import CLIError


def cmd_infer(args: argparse.Namespace) -> int:
    import multiaddr

    from node.host import make_host, parse_peer_addr
    from node.identity import identity_from_secret
    from node.inference import INFER_PROTOCOL, generate

    cfg = role_config(HolderConfig, args)
    peers = args.bootstrap or cfg.bootstrap
    if not peers:
        raise CLIError("no stage peer: pass --bootstrap MULTIADDR of a stage-0 node (printed by `pmn node start`)")
    info = parse_peer_addr(peers[0])
    session = open_session(cfg)
    _require_model(session.client, args.model)
    fee = session.client.get_model(args.model).terms.inference_fee_wei
    account = unlock(cfg, args)
    request_id = os.urandom(32)
    tx_hash = session.client.deposit_revenue(account, args.model, fee, request_id)
    print(f"paid {fee} wei for request 0x{request_id.hex()} in tx 0x{tx_hash.hex()}", file=sys.stderr)
    prompt = list(args.prompt.encode())

    async def run() -> None:
        host = make_host(identity_from_secret(os.urandom(31).rjust(32, b"\x01")))
        async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            async def open_stream() -> Any:
                await host.connect(info)
                return await host.new_stream(info.peer_id, [INFER_PROTOCOL])

            sys.stdout.write(args.prompt)
            async for token in generate(open_stream, prompt, request_id=request_id, tx_hash=tx_hash,
                                        max_new_tokens=args.max_new_tokens):
                sys.stdout.write(bytes([token]).decode("latin-1"))
                sys.stdout.flush()
            sys.stdout.write("\n")

    trio.run(run)
    return 0
