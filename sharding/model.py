"""The decoder, nanoGPT style: every block in this file, tensor shapes in the comments.

Shapes: B batch, T tokens, d d_model, V vocab_size, H query heads, Hkv key/value heads, hd head_dim = d / H,
F MLP hidden width, k subspace_rank. RMSNorm everywhere, rotary position embeddings, no biases.

Options (sharding.config.ModelConfig): `mlp` GELU or SwiGLU, `n_kv_heads` (grouped-query attention),
`qk_norm`, `tie_embeddings`, and `subspace_rank`: the residual stream of the constrained blocks stays in
E_fixed[ids] + span(U), each of their sublayer outputs passing a weightless RMSNorm before the add; with
`subspace_param = "coordinates"` their stream writers hold k coordinates A (k, d_in), applied as U A, instead
of full weights projected onto span(U) after every optimizer step.

`GPT(config)` is the whole model. A pipeline stage (`sharding.stage.StageModule`) is the same class holding
a contiguous slice: blocks [first, last), the embedding on the first stage, the final norm and head on
the last. Parameter names are global (`blocks.<i>.attn.qkv.weight`), so the stages' state dicts together
are exactly the whole model's, and every parameter is initialised from (model seed, its name).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .seeding import generator
from .subspace import fixed_embedding, restream, subspace_basis

# parameters whose init std is divided by sqrt(2 * n_layers) (the projections written into the stream)
RESIDUAL_OUT = ("attn.proj.weight", "mlp.proj.weight")


class RMSNorm(nn.Module):
    """x / rms(x) over the last dimension, times a learned gain when `learnable`: one per coordinate, or one for
    all of them with `scalar` (the subspace post-norm: weightless, or scalar so that its output stays in span(U))."""

    def __init__(self, dim: int, eps: float, learnable: bool = True, scalar: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(1 if scalar else dim)) if learnable else None  # (dim,) or (1,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., dim) -> (..., dim)
        y = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return y * self.weight if self.weight is not None else y


def rope_tables(config: ModelConfig, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables (seq_len, hd/2) for rotary position embeddings."""
    half = config.head_dim // 2
    inv = 1.0 / (config.rope_base ** (torch.arange(half, dtype=torch.float64, device=device) / half))
    t = torch.arange(config.seq_len, dtype=torch.float64, device=device)
    ang = torch.outer(t, inv)  # (seq_len, hd/2)
    return torch.cos(ang).to(torch.float32), torch.sin(ang).to(torch.float32)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of the head dimension of x (B, heads, T, hd)."""
    t = x.shape[-2]
    c, s = cos[:t], sin[:t]  # (T, hd/2)
    x1, x2 = x.chunk(2, dim=-1)  # (B, heads, T, hd/2) each
    return torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)


class CausalSelfAttention(nn.Module):
    """Causal self-attention with rotary embeddings; grouped-query (H/Hkv queries per key/value head) when
    n_kv_heads < n_heads, optional QK-norm. One fused projection `qkv` (d -> d + 2 Hkv hd) as in nanoGPT."""

    def __init__(self, config: ModelConfig, out_dim: int | None = None) -> None:
        super().__init__()
        self.n_heads = config.n_heads  # H
        self.n_kv_heads = config.kv_heads  # Hkv
        self.head_dim = config.head_dim  # hd
        self.kv_dim = self.n_kv_heads * self.head_dim  # Hkv * hd
        d = config.d_model
        self.qkv = nn.Linear(d, d + 2 * self.kv_dim, bias=False)  # weight (d + 2 Hkv hd, d)
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        # output projection, weight (d, d) written into the stream (or (k, d): its coordinates in span(U))
        self.proj = nn.Linear(d, out_dim or d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape  # (B, T, d)
        q, k, v = self.qkv(x).split([d, self.kv_dim, self.kv_dim], dim=-1)  # (B, T, d), (B, T, Hkv hd) x2
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # each group of H/Hkv query heads attends with one key/value head
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))  # (B, H, T, hd) -> (B, T, d) (or (B, T, k))


class MLP(nn.Module):
    """Two-layer GELU MLP: proj(gelu(fc(x)))."""

    def __init__(self, config: ModelConfig, out_dim: int | None = None) -> None:
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.hidden_dim, bias=False)  # weight (F, d)
        # weight (d, F) written into the stream (or (k, F): its coordinates in span(U))
        self.proj = nn.Linear(config.hidden_dim, out_dim or config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, T, d)
        return self.proj(F.gelu(self.fc(x)))  # hidden (B, T, F)


class SwiGLU(nn.Module):
    """Llama's gated MLP: proj(silu(gate(x)) * up(x)), gate and up fused in `fc`; `proj` is the down projection."""

    def __init__(self, config: ModelConfig, out_dim: int | None = None) -> None:
        super().__init__()
        self.hidden = config.hidden_dim  # F
        self.fc = nn.Linear(config.d_model, 2 * self.hidden, bias=False)  # weight (2F, d): [gate; up]
        # weight (d, F) written into the stream (or (k, F): its coordinates in span(U))
        self.proj = nn.Linear(self.hidden, out_dim or config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, T, d)
        gate, up = self.fc(x).split(self.hidden, dim=-1)  # (B, T, F) each
        return self.proj(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm block; when `constrained`, sublayer outputs pass the post-norm (`post_norm`: a weightless RMSNorm
    by default, one with a learned scalar gain, or none) before the add. With
    `coordinates` (constrained blocks of subspace_param "coordinates") the sublayers output k coordinates z and
    the block writes U z into the stream (`forward` gets U)."""

    def __init__(self, config: ModelConfig, constrained: bool, coordinates: bool = False) -> None:
        super().__init__()
        self.constrained = constrained
        self.coordinates = coordinates
        out = int(config.subspace_rank or 0) if coordinates else None  # k, or d (None)
        self.ln1 = RMSNorm(config.d_model, config.norm_eps)
        self.attn = CausalSelfAttention(config, out)
        self.ln2 = RMSNorm(config.d_model, config.norm_eps)
        self.mlp: nn.Module = SwiGLU(config, out) if config.mlp == "swiglu" else MLP(config, out)
        post = constrained and config.post_norm != "none"
        scalar = config.post_norm == "scalar"
        # post-norms of the attention and MLP writes (weightless ones hold no state: sharing one would do)
        self.post_attn = RMSNorm(config.d_model, config.norm_eps, learnable=scalar, scalar=True) if post else None
        self.post_mlp = RMSNorm(config.d_model, config.norm_eps, learnable=scalar, scalar=True) if post else None

    def _write(self, y: torch.Tensor, u: torch.Tensor | None, post: RMSNorm | None) -> torch.Tensor:
        """A sublayer's output as added to the stream: (B, T, d), or (B, T, k) coordinates -> U z (B, T, d)."""
        if self.coordinates:
            assert u is not None, "a block in k coordinates needs U"
            y = y @ u.t()  # (B, T, k) -> (B, T, d)
        return post(y) if post is not None else y

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                u: torch.Tensor | None = None) -> torch.Tensor:  # (B, T, d); u (d, k) the subspace basis
        x = x + self._write(self.attn(self.ln1(x), cos, sin), u, self.post_attn)
        return x + self._write(self.mlp(self.ln2(x)), u, self.post_mlp)

    def stream_writers(self) -> tuple[nn.Linear, nn.Linear]:
        """The two projections whose outputs are added to the stream: attention out, MLP down (proj)."""
        assert isinstance(self.attn.proj, nn.Linear) and isinstance(self.mlp.proj, nn.Linear)
        return self.attn.proj, self.mlp.proj


class GPT(nn.Module):
    """Token embedding -> blocks -> final RMSNorm -> LM head (or the slice given by blocks/embedding/head).

    In subspace mode the stream starts at E_fixed[ids] + embed(ids) (embed projected onto span(U)), and after
    each constrained block it is re-expressed in E_fixed[ids] + span(U) (`restream`, exact when the weights
    written into the stream are projected, as `after_optimizer_step` does). With `tie_embeddings` the head
    reuses the input embedding (E_fixed + embed in subspace mode), so it needs embedding and head together.
    On device "meta" nothing is allocated or initialised (parameter counts and shapes of large specs).
    """

    def __init__(self, config: ModelConfig, blocks: range | None = None, embedding: bool = True, head: bool = True,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        config.validate()
        blocks = range(config.n_layers) if blocks is None else blocks
        if config.tie_embeddings and embedding != head:
            raise ValueError("ModelConfig.tie_embeddings needs the embedding and the LM head in one module: "
                             "use one pipeline stage or tie_embeddings = false")
        self.config = config
        self.has_head = head
        d, v = config.d_model, config.vocab_size
        with torch.device("meta"):
            self.embed = nn.Embedding(v, d) if embedding else None  # weight (V, d)
            self.blocks = nn.ModuleDict({str(i): Block(config, config.is_constrained(i), config.in_coordinates(i))
                                         for i in blocks})
            self.norm_f = RMSNorm(d, config.norm_eps) if head else None
            untied = head and not config.tie_embeddings
            self.lm_head = nn.Linear(d, v, bias=False) if untied else None  # weight (V, d)
        self.to_empty(device=device)
        meta = torch.device(device).type == "meta"
        cos, sin = rope_tables(config, device)  # (seq_len, hd/2) each
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.u: torch.Tensor | None  # (d, k) orthonormal basis of the subspace
        self.e_fixed: torch.Tensor | None  # (V, d) frozen token embedding
        sub = config.is_subspace
        k = int(config.subspace_rank or 0)
        u = (torch.empty(d, k, device=device) if meta else subspace_basis(config).to(device)) if sub else None
        e = (torch.empty(v, d, device=device) if meta else fixed_embedding(config).to(device)) if sub else None
        self.register_buffer("u", u, persistent=False)
        self.register_buffer("e_fixed", e, persistent=False)
        if not meta:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise every parameter from (model seed, global parameter name), then project. A stream writer held in
        k coordinates starts at U^T W0 for the W0 (d, d_in) its projected twin draws: both start as the same model."""
        cfg = self.config
        gains = {id(m.weight) for m in self.modules() if isinstance(m, RMSNorm) and m.weight is not None}
        coords = {id(lin.weight) for b in self.blocks.values() if isinstance(b, Block) and b.coordinates
                  for lin in b.stream_writers()}
        with torch.no_grad():
            for name, p in self.named_parameters():
                if id(p) in gains:  # norm gains start at 1
                    p.fill_(1.0)
                    continue
                std = cfg.init_std
                if name.endswith(RESIDUAL_OUT):
                    std = std / math.sqrt(2 * cfg.n_layers)
                g = generator(cfg.seed, "param", name)
                if id(p) in coords:
                    assert self.u is not None
                    w0 = torch.randn((cfg.d_model, p.shape[1]), generator=g, dtype=torch.float32) * std  # (d, d_in)
                    p.copy_(self.u.t() @ w0)  # (k, d_in)
                else:
                    p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * std)
        self.after_optimizer_step()

    def after_optimizer_step(self) -> None:
        """Project the weights written into the stream of constrained blocks back onto span(U) (no-op when dense)."""
        if self.u is None:
            return
        u = self.u  # (d, k)
        with torch.no_grad():
            if self.embed is not None:
                w = self.embed.weight  # (V, d): rows are written into the stream
                w.copy_((w @ u) @ u.t())
            for key, block in self.blocks.items():
                if not self.config.is_constrained(int(key)) or self.config.in_coordinates(int(key)):
                    continue  # free, or in k coordinates: U A is in span(U) by construction
                assert isinstance(block, Block)
                for lin in block.stream_writers():
                    w = lin.weight  # (d, d_in): columns are written into the stream
                    w.copy_(u @ (u.t() @ w))

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, d) initial stream (plus E_fixed[ids] in subspace mode)."""
        assert self.embed is not None
        x = self.embed(ids)
        return x + self.e_fixed[ids] if self.e_fixed is not None else x

    def head_weight(self) -> torch.Tensor:
        """(V, d) weight of the LM head: its own, or the input embedding when tied."""
        if self.lm_head is not None:
            return self.lm_head.weight
        assert self.embed is not None
        w = self.embed.weight
        return w + self.e_fixed if self.e_fixed is not None else w

    def forward(
        self, ids: torch.Tensor, h: torch.Tensor | None = None, targets: torch.Tensor | None = None
    ) -> torch.Tensor:
        """ids (B, T); h (B, T, d) the incoming stream when this module has no embedding.

        Returns the mean cross-entropy (head + targets), the logits (B, T, V) (head), else the stream (B, T, d).
        """
        cfg = self.config
        x = self.embed_tokens(ids) if self.embed is not None else h
        assert x is not None
        for key, block in self.blocks.items():
            x = block(x, self.rope_cos, self.rope_sin, self.u)  # (B, T, d)
            if self.u is not None and self.e_fixed is not None and cfg.is_constrained(int(key)):
                x = restream(x, ids, self.u, self.e_fixed)  # E_fixed[ids] + U U^T (x - E_fixed[ids])
        if not self.has_head:
            return x
        assert self.norm_f is not None
        if self.lm_head is not None:
            logits = self.lm_head(self.norm_f(x))  # (B, T, V)
        else:
            logits = F.linear(self.norm_f(x), self.head_weight())  # (B, T, V)
        if targets is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
