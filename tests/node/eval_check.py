"""The validation loss a swarm's evaluation must report, recomputed in-process from the nodes' final checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from node.training.checkpoint import latest_checkpoint
from node.training.worker import StageWorker
from sharding import PRESETS, OptimConfig, load_corpus, partition


def checkpoint_val_loss(data_dirs: list[Path], optim: OptimConfig, microbatch_size: int, eval_batches: int,
                        preset: str = "tiny", codec: str = "dense", eval_seed: int = 1234) -> float:
    """Mean loss of the `eval_batches` validation microbatches through the final checkpoints of stage k in
    `data_dirs[k]`, activations through `codec` as on the wire (what the head records as `val_loss`)."""
    cfg = PRESETS[preset]
    workers = []
    for spec in partition(cfg, len(data_dirs)):
        w = StageWorker(cfg, spec, codec=codec, optim=optim, num_microbatches=1, microbatch_size=microbatch_size,
                        corpus=load_corpus("synthetic") if spec.is_first else None, eval_batches=eval_batches,
                        eval_seed=eval_seed)
        ckpt = latest_checkpoint(data_dirs[spec.index], spec.index)
        assert ckpt is not None, f"no checkpoint of stage {spec.index} in {data_dirs[spec.index]}"
        w.module.load_state_dict(load_file(str(ckpt / "model.safetensors")))
        workers.append(w)
    losses = []
    for i in range(eval_batches):
        window = workers[0].eval_window(i)
        h: torch.Tensor | None = None
        for w in workers[:-1]:
            out = w.forward_eval(window, h)
            assert isinstance(out, bytes)
            h = w.codec.decode_activation(out, window[:, :-1], torch.device("cpu"))
        losses.append(float(workers[-1].forward_eval(window, h)))
    return sum(losses) / len(losses)
