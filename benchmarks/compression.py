"""Compression benchmark: dense vs int8 vs subspace stage boundaries, same seed, same tokens.

Trains the same small byte-level GPT (d_model >= 512) split into pipeline stages, in one process,
with every boundary crossing its codec's bytes:
  dense     plain pre-norm GPT, fp32 boundaries
  int8      plain GPT, int8 boundaries with a per-token scale, at the best dense learning rate
  control   subspace architecture with k = d_model (no compression), fp32 boundaries
  subspace  subspace architecture with k = --k, bf16 z (or int8 z with --z-int8) at the boundaries
dense, control and subspace each sweep the same learning-rate grid; each arm reports its best
validation loss (so no arm is flattered by a learning rate tuned for another). Runs execute in
`--workers` processes with one torch thread each.
Wire bytes per token = codec payload + 2 bytes of token id. Prints a table; the last line is JSON.

    python benchmarks/compression.py --quick      # < 60 s, machinery check only
    python benchmarks/compression.py              # the full run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sharding.codecs import token_id_bytes  # noqa: E402
from sharding.config import ModelConfig  # noqa: E402
from sharding.data import Corpus, load_corpus  # noqa: E402
from sharding.pipeline import LocalPipeline  # noqa: E402
from sharding.train import OptimConfig  # noqa: E402


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run's shape and budget."""

    d_model: int = 512  # model width (compression against fp32 scales with it)
    n_layers: int = 4  # transformer blocks
    n_heads: int = 8  # attention heads
    mlp_ratio: int = 4  # MLP width multiple
    seq_len: int = 64  # tokens per sequence
    batch_size: int = 8  # sequences per optimizer step (one microbatch)
    steps: int = 300  # optimizer steps per run (token budget = steps * batch_size * seq_len)
    stages: int = 3  # pipeline stages (2-4)
    k: int = 8  # subspace rank of the compressed run
    free_tail_layers: int = 2  # last blocks left unconstrained in subspace mode (node0: 2)
    lrs: tuple[float, ...] = (5e-4, 1e-3, 2e-3)  # learning-rate grid swept by every arm; best val wins
    warmup_frac: float = 0.1  # warm-up steps as a fraction of steps
    z_int8: bool = False  # send z as int8 + bf16 scale instead of bf16
    eval_batches: int = 8  # validation windows: eval_batches * batch_size sequences
    seed: int = 0  # model seed (and data seed)


QUICK = BenchConfig(
    n_layers=3, seq_len=32, batch_size=4, steps=6, stages=2, free_tail_layers=1, lrs=(1e-3,), eval_batches=2
)


def model_config(b: BenchConfig, rank: int | None) -> ModelConfig:
    return ModelConfig(
        vocab_size=256,
        seq_len=b.seq_len,
        d_model=b.d_model,
        n_layers=b.n_layers,
        n_heads=b.n_heads,
        mlp_ratio=b.mlp_ratio,
        subspace_rank=rank,
        free_tail_layers=b.free_tail_layers if rank is not None else 0,
        seed=b.seed,
    ).validate()


def run(b: BenchConfig, cfg: ModelConfig, codec: str, lr: float, corpus: Corpus) -> dict:
    optim = OptimConfig(
        lr=lr, warmup_steps=max(1, int(b.steps * b.warmup_frac)), decay_steps=b.steps, data_seed=b.seed
    )
    pipe = LocalPipeline(cfg, b.stages, codec, optim)
    t0 = time.time()
    losses = [pipe.train_step(s, corpus, 1, b.batch_size) for s in range(b.steps)]
    train_bytes = pipe.bytes_sent + pipe.id_bytes_sent
    val = pipe.evaluate(corpus, b.eval_batches, b.batch_size)
    tokens = b.steps * b.batch_size * b.seq_len
    boundaries = len(pipe.specs) - 1
    # measured: forward payload + ids + backward payload, per token per boundary, halved = one direction
    measured = train_bytes / (tokens * boundaries) / 2 + token_id_bytes(cfg) / 2 if boundaries else 0.0
    return {
        "codec": codec,
        "k": cfg.subspace_rank,
        "lr": lr,
        "val_loss": val,
        "train_loss_last10": sum(losses[-10:]) / len(losses[-10:]),
        "wire_bytes_per_token": pipe.wire_bytes_per_token,
        "measured_bytes_per_token": measured,
        "stages": [(s.block_start, s.block_end) for s in pipe.specs],
        "seconds": time.time() - t0,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny budget (< 60 s): checks the machinery only")
    ap.add_argument("--steps", type=int, help="optimizer steps per run")
    ap.add_argument("--k", type=int, help="subspace rank")
    ap.add_argument("--lrs", type=str, help="comma-separated learning-rate grid swept by every arm")
    ap.add_argument("--layers", type=int, help="n_layers")
    ap.add_argument("--stages", type=int, help="pipeline stages")
    ap.add_argument("--free-tail-layers", type=int, help="unconstrained last blocks")
    ap.add_argument("--batch", type=int, help="sequences per step")
    ap.add_argument("--seq", type=int, help="sequence length")
    ap.add_argument("--z-int8", action="store_true", help="send z as int8 with a bf16 per-token scale")
    ap.add_argument("--skip-int8", action="store_true", help="skip the int8-boundary run")
    ap.add_argument("--workers", type=int, default=2, help="parallel run processes (one torch thread each)")
    args = ap.parse_args(argv)
    b = QUICK if args.quick else BenchConfig()
    overrides = {
        "steps": args.steps, "k": args.k, "n_layers": args.layers, "stages": args.stages,
        "free_tail_layers": args.free_tail_layers, "batch_size": args.batch, "seq_len": args.seq,
    }
    b = dataclasses.replace(b, **{k: v for k, v in overrides.items() if v is not None})
    if args.lrs:
        b = dataclasses.replace(b, lrs=tuple(float(x) for x in args.lrs.split(",")))
    if args.z_int8:
        b = dataclasses.replace(b, z_int8=True)
    corpus = load_corpus()
    t0 = time.time()
    dense_cfg = model_config(b, None)
    sub_codec = "subspace-int8" if b.z_int8 else "subspace"
    arms = {
        "dense": (dense_cfg, "dense"),
        "control": (model_config(b, b.d_model), "dense"),
        "subspace": (model_config(b, b.k), sub_codec),
    }
    jobs = [(arm, lr) for arm in arms for lr in b.lrs]  # dense first: int8 starts once its lr is known
    with _executor(args.workers) as pool:
        futures = [pool.submit(_one, (b, arms[a][0], arms[a][1], lr)) for a, lr in jobs]
        dense = min((f.result() for (a, _), f in zip(jobs, futures, strict=True) if a == "dense"),
                    key=lambda r: r["val_loss"])
        int8_future = None if args.skip_int8 else pool.submit(_one, (b, dense_cfg, "int8", dense["lr"]))
        by_arm: dict[str, list[dict]] = {a: [] for a in arms}
        for (arm, _), f in zip(jobs, futures, strict=True):
            by_arm[arm].append(f.result())
        int8 = int8_future.result() if int8_future is not None else None
    control, sub = (min(by_arm[a], key=lambda r: r["val_loss"]) for a in ("control", "subspace"))

    rows = [("dense", r) for r in by_arm["dense"]] + ([("int8", int8)] if int8 else [])
    rows += [("control k=d", r) for r in by_arm["control"]]
    rows += [(f"subspace k={b.k}", r) for r in by_arm["subspace"]]
    base = dense["wire_bytes_per_token"]
    print(
        f"d_model={b.d_model} layers={b.n_layers} stages={b.stages} free_tail={b.free_tail_layers} "
        f"steps={b.steps} tokens/run={b.steps * b.batch_size * b.seq_len} corpus=stdlib ({corpus.num_files} files)"
    )
    print(f"{'run':<14}{'codec':<15}{'lr':>8}{'B/token':>9}{'measured':>10}{'x fp32':>8}{'val loss':>10}"
          f"{'/dense':>8}{'/control':>9}{'train':>8}{'sec':>7}")
    for label, r in rows:
        print(
            f"{label:<14}{r['codec']:<15}{r['lr']:>8.1e}{r['wire_bytes_per_token']:>9}"
            f"{r['measured_bytes_per_token']:>10.2f}{base / r['wire_bytes_per_token']:>8.1f}{r['val_loss']:>10.4f}"
            f"{r['val_loss'] / dense['val_loss']:>8.4f}{r['val_loss'] / control['val_loss']:>9.4f}"
            f"{r['train_loss_last10']:>8.4f}{r['seconds']:>7.0f}"
        )
    result = {
        "mode": "quick" if args.quick else "full",
        "d_model": b.d_model,
        "n_layers": b.n_layers,
        "stages": b.stages,
        "k": b.k,
        "free_tail_layers": b.free_tail_layers,
        "steps": b.steps,
        "tokens_per_run": b.steps * b.batch_size * b.seq_len,
        "codec": sub["codec"],
        "bytes_per_token_dense": base,
        "bytes_per_token": sub["wire_bytes_per_token"],
        "compression": base / sub["wire_bytes_per_token"],
        "dense_lr": dense["lr"],
        "lr": sub["lr"],
        "control_lr": control["lr"],
        "lr_grid": list(b.lrs),
        "val_loss_dense": dense["val_loss"],
        "val_loss": sub["val_loss"],
        "loss_ratio": sub["val_loss"] / dense["val_loss"],
        "val_loss_control": control["val_loss"],
        "loss_ratio_control": sub["val_loss"] / control["val_loss"],
        "bytes_per_token_int8": int8["wire_bytes_per_token"] if int8 else None,
        "val_loss_int8": int8["val_loss"] if int8 else None,
        "seconds": time.time() - t0,
    }
    print(json.dumps(result))
    return result


def _worker_init() -> None:
    torch.set_num_threads(1)


def _one(args: tuple[BenchConfig, ModelConfig, str, float]) -> dict:
    b, cfg, codec, lr = args
    return run(b, cfg, codec, lr, load_corpus())


class _InlineExecutor:
    """`submit` runs the task at once in this process (workers <= 1)."""

    def __enter__(self) -> _InlineExecutor:
        _worker_init()
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def submit(self, fn: Callable[[Any], dict], arg: Any) -> Future[dict]:
        fut: Future[dict] = Future()
        fut.set_result(fn(arg))
        return fut


def _executor(workers: int) -> ProcessPoolExecutor | _InlineExecutor:
    """Runs tasks in `workers` spawned processes (one torch thread each), or inline for workers <= 1."""
    if workers <= 1:
        return _InlineExecutor()
    ctx = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init)


if __name__ == "__main__":
    main()
