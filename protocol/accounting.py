"""The accounting function: compute units of a stage for a number of tokens (pure, versioned).

units = forward+backward FLOPs per token of the stage's shard (``sharding.flops``) x tokens.
Its hash (`accounting_function_hash`) is pinned in the model's on-chain proposal, so anyone can
recompute every balance from the published receipts with the same function.
"""

from __future__ import annotations

import inspect
import json
from functools import lru_cache

from eth_utils import keccak

from protocol.errors import AccountingError
from protocol.spotcheck import SPOTCHECK_RULE  # the audit metric and its tolerances are part of the terms
from sharding import flops as _flops
from sharding.config import ModelConfig
from sharding.partition import check_spec
from sharding.stagespec import StageSpec

ACCOUNTING_VERSION = 1

FORMULA = (
    "units(config, spec, tokens) = tokens * stage_flops_per_token(config, spec); "
    "stage_flops_per_token = 3 * (sum of block_forward_flops over spec's blocks + head_forward_flops if has_lm_head)"
)


def compute_units(config: ModelConfig, spec: StageSpec, tokens: int) -> int:
    """Compute units credited to `spec`'s stage for processing `tokens` tokens (forward and backward)."""
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise AccountingError("tokens", f"must be an integer >= 0, got {tokens!r}")
    try:
        check_spec(config, spec)
    except ValueError as exc:
        raise AccountingError("spec", str(exc)) from exc
    return tokens * _flops.stage_flops_per_token(config, spec)


@lru_cache(maxsize=1)
def accounting_function_hash() -> bytes:
    """keccak256 of the canonical description: version, formula text, the source of the FLOP functions and the
    spot-check rule (metric and tolerances, `protocol.spotcheck.SPOTCHECK_RULE`)."""
    sources = {
        name: "0x" + keccak(text=inspect.getsource(getattr(_flops, name))).hex()
        for name in ("block_forward_flops", "head_forward_flops", "stage_flops_per_token")
    }
    sources["compute_units"] = "0x" + keccak(text=inspect.getsource(compute_units)).hex()
    description = {"version": ACCOUNTING_VERSION, "formula": FORMULA, "sources": sources, "spotcheck": SPOTCHECK_RULE}
    return keccak(json.dumps(description, sort_keys=True, separators=(",", ":")).encode())
