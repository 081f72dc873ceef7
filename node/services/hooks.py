"""What the node's command-line entry points share: the chain service hooks and the one-line error report.

Used by `node.daemon` and `node.testing.adversary` (the same arguments, the same output on failure).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path
from typing import Any

from node.config import NodeConfig
from node.errors import NodeError


def chain_hooks(a: argparse.Namespace, cfg: NodeConfig) -> tuple[Any, list[Any]]:
    """(receipt hook, service hooks) for `--rpc-url/--deployment/--model-id`; (None, []) without `--rpc-url`.

    ValueError when `--rpc-url` is given without `--deployment FILE` and `--model-id N` (N >= 1).
    """
    if not a.rpc_url:
        return None, []
    if not a.deployment or a.model_id < 1:
        raise ValueError("--rpc-url needs --deployment FILE and --model-id N")
    from node.daemon import load_model_config
    from node.net.identity import load_or_create_identity
    from node.services.chain_link import chain_services

    model = load_model_config(cfg.model)
    ident = load_or_create_identity(Path(cfg.data_dir).expanduser())
    _, receipts, serve = chain_services(cfg.data_dir, ident.account, cfg.runtime.microbatch_size,
                                        model.seq_len, a.rpc_url, a.deployment, a.model_id)
    return receipts, [serve]


def report_error(caught: BaseException) -> int:
    """Print one JSON error line on stdout and `error: ...` on stderr; returns exit code 1.

    A one-member exception group (a service hook's error) is reported as its member; exceptions other
    than NodeError / ValueError are bugs and also print their traceback to stderr.
    """
    exc = caught
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    print(json.dumps({"event": "error", "error": str(exc), "type": type(exc).__name__}), flush=True)
    print(f"error: {exc}", file=sys.stderr)
    if not isinstance(exc, NodeError | ValueError):
        traceback.print_exception(exc, file=sys.stderr)
    return 1
