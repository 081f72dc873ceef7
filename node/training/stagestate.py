"""A stage's trainable state as flat named tensors: what checkpoints and state transfers carry.

Weights are the module's state dict; the AdamW state is flattened to `"<param index>/<name>"` keys
(safetensors holds flat tensor maps only) with the optimizer's param groups kept apart as JSON.
"""

from __future__ import annotations

from typing import Any

import torch

from node.training.worker import StageWorker


def stage_tensors(worker: StageWorker) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[Any]]:
    """(weights, flat optimizer state, param groups): detached contiguous copies, safe to serialise."""
    weights = {k: v.detach().contiguous().clone() for k, v in worker.module.state_dict().items()}
    opt = worker.optimizer.state_dict()
    optim: dict[str, torch.Tensor] = {}
    for idx, st in opt["state"].items():
        for key, val in st.items():
            t = val if isinstance(val, torch.Tensor) else torch.tensor(val)
            optim[f"{idx}/{key}"] = t.detach().contiguous().clone()
    return weights, optim, opt["param_groups"]


def install_stage_tensors(worker: StageWorker, weights: dict[str, torch.Tensor], optim: dict[str, torch.Tensor],
                          param_groups: list[Any]) -> None:
    """Inverse of `stage_tensors`. Raises RuntimeError, ValueError or KeyError when they do not fit the stage."""
    worker.module.load_state_dict(weights, strict=True)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, val in optim.items():
        idx, name = key.split("/", 1)
        state.setdefault(int(idx), {})[name] = val
    worker.optimizer.load_state_dict({"state": state, "param_groups": param_groups})
