"""The fixed pieces of a subspace network: the basis U and the frozen token embedding E_fixed."""

from __future__ import annotations

import torch

from .config import ModelConfig
from .seeding import generator


def subspace_basis(config: ModelConfig) -> torch.Tensor:
    """Orthonormal U (d_model, k), fp32, from the QR of a seeded Gaussian (sign-fixed, so unique)."""
    if config.subspace_rank is None:
        raise ValueError("ModelConfig.subspace_rank is None: subspace_basis needs a subspace config")
    g = generator(config.seed, "subspace.U")
    a = torch.randn(config.d_model, config.subspace_rank, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return q.to(torch.float32).contiguous()


def fixed_embedding(config: ModelConfig) -> torch.Tensor:
    """Frozen token embedding E_fixed (vocab_size, d_model), fp32."""
    g = generator(config.seed, "subspace.E_fixed")
    e = torch.randn(config.vocab_size, config.d_model, generator=g, dtype=torch.float32)
    return (e * config.fixed_embed_std).contiguous()


def to_subspace(h: torch.Tensor, ids: torch.Tensor, u: torch.Tensor, e_fixed: torch.Tensor) -> torch.Tensor:
    """z = U^T (h - E_fixed[ids]): (B, T, d) -> (B, T, k)."""
    return (h - e_fixed[ids]) @ u


def from_subspace(z: torch.Tensor, ids: torch.Tensor, u: torch.Tensor, e_fixed: torch.Tensor) -> torch.Tensor:
    """h = E_fixed[ids] + U z: (B, T, k) -> (B, T, d)."""
    return e_fixed[ids] + z @ u.t()


def restream(h: torch.Tensor, ids: torch.Tensor, u: torch.Tensor, e_fixed: torch.Tensor) -> torch.Tensor:
    """Re-express h as E_fixed[ids] + U U^T (h - E_fixed[ids]); identity when the invariant holds."""
    return from_subspace(to_subspace(h, ids, u, e_fixed), ids, u, e_fixed)


def off_subspace_residual(
    h: torch.Tensor, ids: torch.Tensor, u: torch.Tensor, e_fixed: torch.Tensor
) -> float:
    """max |h - restream(h)| / max |h|: how far h is from E_fixed[ids] + span(U)."""
    with torch.no_grad():
        diff = (h - restream(h, ids, u, e_fixed)).abs().max()
        return float(diff / h.abs().max().clamp_min(1e-30))
