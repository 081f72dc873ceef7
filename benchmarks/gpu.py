"""One stage and a 2-stage pipeline on one device: tokens/s, model-FLOPs utilisation, peak memory.

Stage: the whole model as one stage (`build_stage_on`, the node's execution policy: bf16 autocast, fused
AdamW and fp32 master weights on CUDA; fp32 on CPU), trained on random token windows; forward + backward +
optimizer step timed after warm-up. Pipeline: the same model split in 2 stages, two node processes over
libp2p on 127.0.0.1 (`node.testing.swarm`), both on the same device, subspace codec; tokens/s between step
completions after warm-up (benchmarks/pipeline.py's measure).

MFU = tokens/s x `sharding.flops.model_flops_per_token` (6N-style matmul FLOPs, full T x T attention) /
the device's dense bf16 peak (PEAK_BF16_FLOPS by device name; H100/H200 SXM: 989 TFLOP/s). On CPU there
is no stated peak: mfu and pipeline_mfu are null and the table shows achieved GFLOP/s instead.
peak_mem_gib: torch.cuda.max_memory_allocated on CUDA; the process's peak RSS (ru_maxrss) on CPU.
Model: d_model 2048, 24 layers, seq 2048 on a GPU with >= 40 GiB (12 layers with --quick); d_model 256,
4 layers, seq 128 on CPU (2 layers with --quick).

    python benchmarks/gpu.py --quick          # CPU here: < 2 min on an idle 2-core machine
    python benchmarks/gpu.py --device cuda    # one H200
Last line: JSON with device, tokens_per_s, mfu, peak_mem_gib, pipeline_tokens_per_s, pipeline_mfu.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from node.testing.swarm import run_local_swarm  # noqa: E402
from sharding import ModelConfig, OptimConfig, model_flops_per_token  # noqa: E402
from sharding.device import ExecutionPolicy, device_info, resolve_device  # noqa: E402
from sharding.memory import estimate_stage  # noqa: E402
from sharding.stage import build_stage_on, plan_for  # noqa: E402
from sharding.stagespec import full_spec  # noqa: E402
from sharding.train import make_optimizer, optimizer_step  # noqa: E402

# dense bf16 tensor-core peak, FLOP/s, by a substring of torch.cuda.get_device_name (first match wins)
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12),
    ("L4", 121e12), ("A10G", 70e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12),
)


@dataclass(frozen=True)
class Sizing:
    """Model and batch of one run."""

    model: ModelConfig  # the benchmarked architecture
    microbatch_size: int  # sequences per microbatch
    microbatches: int  # microbatches per step (stage run: accumulated before each optimizer step)
    steps: int  # timed optimizer steps (after `warmup`)
    warmup: int  # untimed steps first
    pipeline_steps: int  # steps of the 2-stage pipeline run (its first `warmup` are not timed)


def sizing(device: torch.device, quick: bool) -> Sizing:
    """The model sized to the device: large on a big GPU, small on CPU."""
    if device.type == "cuda":
        free = device_info(device).free_bytes or 0
        big = free >= 40 * 2**30
        layers = (12 if quick else 24) if big else (4 if quick else 8)
        d = 2048 if big else 1024
        model = ModelConfig(vocab_size=32768, seq_len=2048, d_model=d, n_layers=layers, n_heads=d // 128,
                            subspace_rank=64, free_tail_layers=1)
        return Sizing(model, 4, 2, 5 if quick else 10, 2, 6 if quick else 12)
    layers = 2 if quick else 4
    model = ModelConfig(vocab_size=256, seq_len=128, d_model=256, n_layers=layers, n_heads=4, subspace_rank=8,
                        free_tail_layers=1)
    return Sizing(model, 4, 2, 3 if quick else 8, 1, 4 if quick else 10)


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of `device`, None when unknown (CPU, MPS, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS if k in name), None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_stage(device: torch.device, s: Sizing) -> tuple[float, float]:
    """(tokens/s, peak memory GiB) of the one-stage model trained on `device`."""
    cfg = s.model
    policy = ExecutionPolicy(str(device)).validate()
    plan = plan_for(policy, s.microbatch_size, s.microbatches)
    module = build_stage_on(cfg, full_spec(cfg), policy, plan)
    optim = OptimConfig()
    opt = make_optimizer(module, optim, policy.adamw_kwargs())
    gen = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, cfg.vocab_size, (s.microbatch_size, cfg.seq_len + 1), generator=gen).to(device)
               for _ in range(s.microbatches)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step(i: int) -> None:
        for w in windows:
            with policy.autocast():
                loss = module(w[:, :-1], targets=w[:, 1:])
            (loss / s.microbatches).backward()
        optimizer_step(module, opt, i, optim)

    for i in range(s.warmup):
        step(i)
    _sync(device)
    t0 = time.perf_counter()
    for i in range(s.steps):
        step(s.warmup + i)
    _sync(device)
    seconds = time.perf_counter() - t0
    tokens = s.steps * s.microbatches * s.microbatch_size * cfg.seq_len
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # Linux: KiB
    return tokens / seconds, peak


def throughput(records: list[dict], warmup: int) -> float:
    """Tokens per second between the end of step `warmup - 1` and the last step."""
    recs = sorted(records, key=lambda r: r["step"])
    window = recs[warmup - 1:] if warmup > 0 else recs
    span = window[-1]["end_time"] - window[0]["end_time"]
    return sum(r["tokens"] for r in window[1:]) / span


def run_pipeline(device: torch.device, s: Sizing, threads: int) -> float:
    """Tokens/s of 2 node processes over libp2p loopback, both on `device` (`threads` torch threads each)."""
    with tempfile.TemporaryDirectory(prefix="pmn-bench-gpu-") as tmp:
        model_path = Path(tmp) / "model.json"
        model_path.write_text(json.dumps(s.model.to_dict()))
        res = run_local_swarm(2, s.pipeline_steps, Path(tmp) / "pipe", model=str(model_path), codec="subspace",
                              microbatches=s.microbatches * 2, microbatch_size=s.microbatch_size, corpus="synthetic",
                              threads=[threads] * 2, timeout_s=900,
                              extra_args=["--checkpoint-every", "0", "--device", str(device)])
    return throughput(res.steps[1], s.warmup)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer layers and steps")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU torch threads of the stage run and of each pipeline node (more than the idle cores "
                        "makes OpenMP spin: 2 threads on a loaded 2-core machine ran 25x slower)")
    p.add_argument("--no-pipeline", action="store_true", help="skip the 2-stage pipeline run")
    a = p.parse_args(argv)
    device = resolve_device(a.device)
    if device.type == "cpu":
        torch.set_num_threads(a.threads)
    s = sizing(device, a.quick)
    cfg = s.model
    info = device_info(device)
    flops = model_flops_per_token(cfg)
    peak = peak_flops(device)
    need = estimate_stage(cfg, full_spec(cfg), plan_for(ExecutionPolicy(str(device)), s.microbatch_size,
                                                        s.microbatches))
    print(info.line())
    print(f"model d={cfg.d_model} L={cfg.n_layers} T={cfg.seq_len} V={cfg.vocab_size} k={cfg.subspace_rank}, "
          f"{s.microbatches}x{s.microbatch_size} microbatches, {s.steps} timed steps ({s.warmup} warm-up); "
          f"estimated stage memory {need.describe()}")
    tps, mem = run_stage(device, s)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the stage run's blocks, before the pipeline's node processes take the device
    pipe_tps = None if a.no_pipeline else run_pipeline(device, s, a.threads)

    def mfu(x: float | None) -> float | None:
        return None if x is None or peak is None else x * flops / peak

    print(f"{'run':<30}{'tokens/s':>12}{'TFLOP/s':>10}{'MFU':>8}")
    for name, x in (("one stage", tps), ("2-stage pipeline (libp2p)", pipe_tps)):
        if x is None:
            continue
        u = mfu(x)
        print(f"{name:<30}{x:>12.0f}{x * flops / 1e12:>10.3f}{'n/a' if u is None else f'{u:.1%}':>8}")
    print(f"peak memory {mem:.2f} GiB ({'max_memory_allocated' if device.type == 'cuda' else 'process peak RSS'}); "
          f"MFU against {'n/a (no stated peak for this device)' if peak is None else f'{peak / 1e12:.0f} TFLOP/s bf16'}")
    out = {"device": str(device) if device.type != "cuda" else f"{device} {info.name}",
           "tokens_per_s": round(tps, 1), "mfu": None if mfu(tps) is None else round(mfu(tps) or 0.0, 4),
           "peak_mem_gib": round(mem, 3), "pipeline_tokens_per_s": None if pipe_tps is None else round(pipe_tps, 1),
           "pipeline_mfu": None if mfu(pipe_tps) is None else round(mfu(pipe_tps) or 0.0, 4),
           "model": {"d_model": cfg.d_model, "n_layers": cfg.n_layers, "seq_len": cfg.seq_len},
           "flops_per_token": flops, "peak_flops": peak}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
