"""Deterministic generators derived from (model seed, name), independent of global RNG state."""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, *names: object) -> int:
    """A 63-bit seed from the model seed and a tuple of names (stable across processes)."""
    text = "\x1f".join([str(seed), *(str(n) for n in names)]).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def generator(seed: int, *names: object) -> torch.Generator:
    """A CPU torch.Generator seeded from derive_seed(seed, *names)."""
    g = torch.Generator(device="cpu")
    g.manual_seed(derive_seed(seed, *names))
    return g
