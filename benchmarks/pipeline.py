"""Tokens/s of a P-stage pipeline over libp2p (P node processes on 127.0.0.1) vs one process.

Both runs use the node daemon (same code path, same data, synchronous GPipe schedule); the
pipeline's processes get total_threads / P torch threads each, the single run total_threads.
Throughput is measured between step completions after warm-up steps (checkpoints off in both).
The machine's other load moves both figures; compare them from the same run only. comm_fraction is the mean
share of a stage's step spent waiting for frames or acks (pipeline bubble included).
Last line: JSON with single_tokens_per_s, pipeline_tokens_per_s, ratio, comm_fraction.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from node.testing.swarm import run_local_swarm  # noqa: E402
from sharding import ModelConfig  # noqa: E402

# subspace model sized so that a step is dominated by compute, not by process overheads
BENCH_MODEL = ModelConfig(vocab_size=256, seq_len=128, d_model=256, n_layers=4, n_heads=4, subspace_rank=8,
                          free_tail_layers=1)


def throughput(records: list[dict], warmup: int) -> float:
    """Tokens per second between the end of step `warmup - 1` and the last step."""
    recs = sorted(records, key=lambda r: r["step"])
    if len(recs) < warmup + 2:
        raise ValueError(f"need at least {warmup + 2} steps, got {len(recs)}")
    window = recs[warmup - 1:] if warmup > 0 else recs
    span = window[-1]["end_time"] - window[0]["end_time"]
    return sum(r["tokens"] for r in window[1:]) / span


def run(stages: int, steps: int, threads: int, codec: str, microbatches: int, mb_size: int, root: Path,
        model_path: Path) -> dict[int, list[dict]]:
    """Progress records per stage of one swarm run."""
    per = max(1, threads // stages)
    res = run_local_swarm(stages, steps, root, model=str(model_path), codec=codec, microbatches=microbatches,
                          microbatch_size=mb_size, corpus="synthetic", threads=[per] * stages, timeout_s=900,
                          extra_args=["--checkpoint-every", "0"])
    return res.steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="few steps (< 60 s)")
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="total torch threads (split across stages)")
    p.add_argument("--codec", default="subspace")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--microbatches", type=int, default=16)
    p.add_argument("--microbatch-size", type=int, default=2)
    a = p.parse_args()
    steps = a.steps or (4 if a.quick else 12)
    warmup = 1 if a.quick else 2
    with tempfile.TemporaryDirectory(prefix="pmn-bench-pipeline-") as tmp:
        model_path = Path(tmp) / "model.json"
        model_path.write_text(json.dumps(BENCH_MODEL.to_dict()))
        single = run(1, steps, a.threads, a.codec, a.microbatches, a.microbatch_size, Path(tmp) / "single", model_path)
        pipe = run(a.stages, steps, a.threads, a.codec, a.microbatches, a.microbatch_size, Path(tmp) / "pipe",
                   model_path)
    single_tps = throughput(single[0], warmup)
    pipe_tps = throughput(pipe[a.stages - 1], warmup)
    fractions = []
    for recs in pipe.values():
        for r in recs[warmup:]:
            fractions.append(r["comm_wait_s"] / r["seconds"] if r["seconds"] else 0.0)
    comm = sum(fractions) / len(fractions)
    wire = sum(r["bytes_out"] for r in pipe[0][warmup:]) / max(1, len(pipe[0][warmup:]))
    bubble = (a.stages - 1) / (a.microbatches + a.stages - 1)
    print(f"model d={BENCH_MODEL.d_model} L={BENCH_MODEL.n_layers} T={BENCH_MODEL.seq_len} k={BENCH_MODEL.subspace_rank}, "
          f"codec {a.codec}, {a.microbatches}x{a.microbatch_size} microbatches, {steps} steps ({warmup} warm-up)")
    print(f"{'run':<34}{'threads':>8}{'tokens/s':>12}")
    print(f"{'single process':<34}{a.threads:>8}{single_tps:>12.0f}")
    print(f"{f'{a.stages}-stage pipeline over libp2p':<34}{f'{a.stages}x{max(1, a.threads // a.stages)}':>8}{pipe_tps:>12.0f}")
    print(f"ratio {pipe_tps / single_tps:.3f}  comm_fraction {comm:.3f}  GPipe bubble bound {bubble:.3f}  "
          f"stage-0 bytes out per step {wire:,.0f}")
    print(json.dumps({"single_tokens_per_s": round(single_tps, 1), "pipeline_tokens_per_s": round(pipe_tps, 1),
                      "ratio": round(pipe_tps / single_tps, 3), "comm_fraction": round(comm, 3),
                      "stages": a.stages, "threads": a.threads, "codec": a.codec, "steps": steps,
                      "microbatches": a.microbatches, "microbatch_size": a.microbatch_size,
                      "bubble_fraction_bound": round(bubble, 3), "stage0_bytes_out_per_step": round(wire)}))


if __name__ == "__main__":
    main()
