"""The optimisers a recipe may name: AdamW, or Muon on the blocks' matrices with AdamW on the rest.

Muon (torch.optim.Muon: momentum, then the update orthogonalised by Newton-Schulz iterations) takes the
2-D weights inside the transformer blocks; the embedding, the output head and the norm gains stay on AdamW,
as Muon's authors prescribe. Both run with the recipe's learning rate: Muon scales each matrix's step to
AdamW's update RMS (`adjust_lr_fn="match_rms_adamw"`), so one lr and one schedule drive both.

Why it is offered: the async schedule's delayed gradients cost AdamW more than they cost Muon (Zmushko et al.,
"One-Step Gradient Delay is Not a Barrier for Large-Scale Asynchronous Pipeline Parallel LLM Pretraining", 2026,
report the same for a one-step delay). Measured here (`benchmarks/async_recipe.py`, bench model, 3000 steps,
staleness 1): AdamW lr 1e-3 async / sync 1.0367 with look-ahead 1; Muon lr 1e-2 0.991 with look-ahead 2, its
sync run (1.2011) on a par with AdamW's best (1.2042).

`MuonAdamW` is one `torch.optim.Optimizer` over every parameter, so checkpoints, state transfers and the
scheduled step treat it as they treat AdamW: its `param_groups` and `state` are those of the two torch
optimisers it steps (the Muon groups first), and `load_state_dict` re-links them. torch has no optimiser that
routes parameters to two algorithms; upstream would need a "per-group algorithm" hook for this class to go.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


def is_muon_param(name: str, param: nn.Parameter) -> bool:
    """Whether Muon updates this parameter: a matrix inside a transformer block (not embedding, head or norm)."""
    return param.dim() == 2 and name.startswith("blocks.")


class MuonAdamW(torch.optim.Optimizer):
    """Muon over `muon_params`, AdamW over `adamw_groups` (see the module doc); stepped, saved and loaded as one."""

    def __init__(self, muon_params: Iterable[nn.Parameter], adamw_groups: list[dict[str, Any]], lr: float,
                 weight_decay: float, momentum: float, betas: tuple[float, float], eps: float,
                 adamw_kernel: dict[str, bool] | None = None) -> None:
        muon_list = list(muon_params)
        adamw_groups = [g for g in adamw_groups if g["params"]]
        # the torch optimisers this one steps, each with its number of groups (a stage may lack either kind)
        self._parts: list[tuple[torch.optim.Optimizer, int]] = []
        if muon_list:
            muon = torch.optim.Muon(muon_list, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=True,
                                    adjust_lr_fn="match_rms_adamw")
            self._parts.append((muon, len(muon.param_groups)))
        if adamw_groups:
            adamw = torch.optim.AdamW(adamw_groups, lr=lr, betas=betas, eps=eps, **(adamw_kernel or {}))
            self._parts.append((adamw, len(adamw.param_groups)))
        super().__init__([g for part, _ in self._parts for g in part.param_groups], {})
        self._link()

    def _link(self) -> None:
        """Point the torch optimisers at this one's groups and state (after construction and every load)."""
        first = 0
        for part, count in self._parts:
            part.param_groups = self.param_groups[first:first + count]
            part.state = self.state
            first += count

    @property
    def parts(self) -> list[torch.optim.Optimizer]:
        """The torch optimisers this one steps: Muon (when the module has blocks), then AdamW."""
        return [part for part, _ in self._parts]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._link()

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """One Muon step on the blocks' matrices and one AdamW step on the rest."""
        if closure is not None:
            raise ValueError("MuonAdamW.step takes no closure")
        for part, _ in self._parts:
            part.step()
        return None


def split_params(module: nn.Module, muon: bool) -> tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]]:
    """`module`'s trainable parameters in order as (Muon's, decayed matrices, undecayed vectors); Muon's stays
    empty unless `muon`."""
    parts: tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]] = ([], [], [])
    for name, p in module.named_parameters():
        if p.requires_grad:
            parts[0 if muon and is_muon_param(name, p) else 1 if p.dim() >= 2 else 2].append(p)
    return parts


def build_muon_adamw(module: nn.Module, lr: float, weight_decay: float, momentum: float,
                     betas: tuple[float, float], eps: float, kernel: dict[str, bool] | None = None) -> MuonAdamW:
    """`MuonAdamW` over `module`: blocks' matrices on Muon; other matrices decayed and vectors not, on AdamW."""
    muon, decay, no_decay = split_params(module, muon=True)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return MuonAdamW(muon, groups, lr, weight_decay, momentum, betas, eps, kernel)
