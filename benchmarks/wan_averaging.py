"""Replica averaging traffic, dense vs compressed: a replicated local swarm on 127.0.0.1 (stage 0 is the
step authority and stays single; stages 1 and 2 have 2 replicas each) trained the same number of steps
(equal tokens) once with a dense exchange (`--dense`: `dense-bf16` by default, the fair baseline; `dense`
sends fp32) and once with `powersgd`. Reports the
`/pmn/avg/1.0.0` bytes per step between replicas (counted by each node's averaging server on the real
streams: pushes received, pull requests and answers, headers included; Noise/yamux framing not
included), the validation loss of the final model (every stage's shutdown checkpoint, 8 fixed
validation batches) and whether the replicas of a stage ended bit-identical.

`--math` instead compares the methods of `sharding.gradcompress` in one process (2 simulated replicas
of the whole model, 4 microbatches per step): dense (fp32 or bf16), PowerSGD (rank r, bf16, int8 or int4 factors,
`--iterations` power iterations), top-k and DiLoCo (H inner steps, outer Nesterov), loss at equal tokens
against bytes (`compression` against fp32, `compression_vs_bf16` against a bf16 dense exchange). With
`--exchange step` each replica sends one contribution per step (the node's `replica_exchange = "step"`), and
`powersgd-shared` / `powersgd-shared-int4` run the code that is linear across replicas (`sharding.sharedpowersgd`,
what a sharded exchange needs) at the same bytes per replica as the node's PowerSGD.

    python benchmarks/wan_averaging.py [--quick] [--steps N] [--rank R] [--bits 16|8|4] [--iterations I] [--seed S]
                                       [--dense dense-bf16|dense] [--lr LR] [--model wide|tiny] [--block-rank B]
                                       [--optimizer adamw|muon] [--schedule gpipe|async --max-staleness S]
    python benchmarks/wan_averaging.py --math [--steps N] [--model tiny|wide] [--methods ...] [--ranks R,..]
                                       [--iterations I] [--seed S] [--exchange microbatch|step]
                                       [--optimizer adamw|muon] [--lr LR]

Measured here (session 29, 2 cores, swarm mode: stage 0 single, stages 1 and 2 with 2 replicas each; wide model,
600 steps = 307,200 tokens, `--exchange step --rank 12 --bits 4 --iterations 3`, each schedule's
dense-bf16 and PowerSGD arms; async at `--max-staleness 1`), the async schedule with replicated stages against
gpipe, validation loss at equal tokens:

AdamW lr 1e-3 and the Muon recipe (`--optimizer muon --lr 1e-2`, the node's default async look-ahead):

| optimiser | seed | gpipe dense-bf16 | gpipe PowerSGD | async dense-bf16 | async PowerSGD | async PowerSGD / gpipe dense |
|---|---|---|---|---|---|---|
| AdamW | 0 | 1.1101 | 1.1025 | 1.2218 | 1.1324 | 1.0201 |
| | 1 | 1.1310 | 1.1060 | 1.1377 | 1.1572 | 1.0231 |
| | 2 | 1.1024 | 1.1274 | 1.1775 | 1.1442 | 1.0379 |
| | median ratio | | 0.9931 of dense | 1.0681 of gpipe's | 1.0272 of gpipe's | **1.0231** |
| Muon | 0 | 1.0886 | 1.1160 | 1.1645 | 1.1713 | 1.0760 |
| | 1 | 1.0361 | 1.1567 | 1.1505 | 1.1407 | 1.1009 |
| | 2 | 1.1039 | 1.1550 | 1.1405 | 1.1835 | 1.0720 |
| | median ratio | | 1.0462 of dense | 1.0697 of gpipe's | 1.0247 of gpipe's | **1.0760** |

(PowerSGD against dense under gpipe with Muon: 1.0462, against session 24's 1.036; Muon's async penalty fades only
over far longer runs, 0.991 over 3000 steps in benchmarks/async_recipe.py.)

With AdamW, the whole replicated-async recipe (staleness 1, PowerSGD int4 once per replica and step) ends 2.3 % above the
synchronous dense run at the median, just outside the 2 % goal at this length with AdamW; with dense averaging the
async penalty is larger (1.068). PowerSGD itself stays within 2 % of dense under gpipe (0.9931). Replica traffic: 61x
below dense-bf16 per exchange (session 29's figures were measured bytes per step: seed 0's gpipe dense arm read 45.5x,
seed 2's async PowerSGD arm 66.3x).

Bytes per step follow the routing (found in session 30): a replica that computed nothing in a step pushes nothing,
and a replica that missed a push pulls it later, so the measured bytes per step of one arm depend on how many replicas
got work, not only on the encoding. `replica_compression` is therefore the ratio of a *full step* (every replica
computes): each replicated stage's measured push bytes per contribution received (`avg_push_bytes` /
`avg_pushes_in`, both counted by the receiving node's server), times the contributions a full step sends. The measured
bytes per step stay in the table and the JSON (`*_replica_bytes_per_step`). Thirteen 6-step async runs here (`--rank 4
--bits 4`, ten of them two at a time): bytes per step 5.23-6.56 MB dense and 27-36 KB PowerSGD, the full-step ratio
174.7-175.0x.

Measured here (session 28, 2 cores, one thread per process, `--math --model wide --steps 600 --exchange step --ranks 12
--iterations 3`, int4 factors, 61.2x against bf16 for both codes; loss over `dense-bf16` at equal tokens): the node's
PowerSGD (each replica its own Q, 3 power iterations) against the code linear across replicas that a sharded exchange
needs (`powersgd-shared-int4`: a common Q, one power iteration, two rounds):

| optimiser | seed | dense-bf16 val | node's PowerSGD | linear (shared Q) | linear / node |
|---|---|---|---|---|---|
| Muon lr 1e-2 | 0 | 1.0987 | 1.0202 | 1.0476 | 1.027 |
| | 1 | 1.0695 | 1.0277 | 1.1449 | 1.114 |
| | 2 | 1.1312 | 0.9951 | 1.0587 | 1.064 |
| | 3 | 1.0610 | 1.0659 | 1.1597 | 1.088 |
| | median | | 1.0239 | 1.1018 | 1.076 |
| AdamW lr 1e-3 | 0 | 1.1146 | 0.9857 | 0.9993 | 1.014 |
| | 1 | 1.1079 | 0.9899 | 1.0353 | 1.046 |
| | 2 | 1.1022 | 1.0037 | 1.0295 | 1.026 |
| | median | | 0.9899 | 1.0295 | 1.026 |

The linear code is worse on every seed. More rank does not rescue it (Muon, seed 0: rank 24 1.1491, 1.0459 of
bf16; rank 48 1.2989, 1.1822; seed 1: rank 24 1.1961, 1.1184; rank 48 1.1588, 1.0835, against rank 12's 1.1448
and the node's 1.0277). With each replica's error against the mean's approximation (PyTorch's
`powerSGD_hook`) instead of its own share it was worse still (Muon seed 0: 1.2916, 1.1756). The dense arms scatter
by several per cent with Muon (seed 3: fp32 1.1154, bf16 1.0610), so only the every-seed direction and the medians
mean much. With 2 replicas both codes send one bundle per uplink; at 16 the linear code's sharded exchange would
send 1.9 bundles where the node sends 15, which is what it would have to pay for.

Measured here (session 26, 2 cores, wide model, AdamW lr 1e-3, 150 steps, 3 power iterations, int4 factors, against
`dense-bf16`), the step exchange (`--exchange step`: one contribution per replica and step, what the async schedule
with replicated stages needs): rank 6 seed 0 120.2x at 1.0467 (seeds 1-2 not run); rank 12 seeds 0 / 1 / 2 61.0x /
74.2x / 61.5x at 1.0138 / 1.0316 / 1.0355, median 1.0316. With the per-microbatch exchange rank 6 gave 1.0099 (median,
session 21, below): at the same total rank per step (2 replicas x 12 against 4 microbatches x 6) one compression
per replica and step loses more than one per microbatch at 150 steps. Over 600 steps (307,200 tokens) the penalty is
gone: rank 12 seeds 0 / 1 / 2 60.8x / 61.1x / 60.0x at 1.0047 / 0.9818 / 1.0147 (dense val 1.1101 / 1.1230 /
1.0969), median 1.0047, every seed within 2 % and replicas bit-identical: with AdamW the step exchange meets the
replica goal (>= 50x within 2 % at equal tokens). An in-process probe (not kept; 2 replicas x 4 microbatches, whole
wide model, int4) agreed: per replica and step at rank 12 0.9919 / 0.9801 / 1.0021 over 600 steps (per microbatch
at rank 6 1.0065 / 0.9876 / 1.0088), and at 150 steps 1.0181 / 1.0141 / 1.0550 (rank 6 per microbatch 1.0037 /
1.0155 / 1.0146; rank 24 per replica and step 1.0160 / 1.0219 / 1.0284, no better than 12).

Measured here (session 22, 2 cores, wide model, Muon lr 1e-2, 600 steps = 307,200 tokens, 3 power iterations, int4
factors, against `dense-bf16`): `--block-rank 12` (the spec's `powersgd_block_rank = 12`) sends the blocks' matrices,
Muon's, at rank 12 and the embedding and head at rank 6:

| seed | rank 6 / blocks 12: dense val, ratio (bytes) | rank 6: dense val, ratio (bytes) |
|---|---|---|
| 0 | 1.0938, 1.0010 (63.1x) | 1.0938, 1.0338 (121.4x; session 21) |
| 1 | 1.0270, 1.0784 (62.8x) | 1.0270, 1.0776 (120.0x; session 21) |
| 2 | 1.0993, 1.0324 (62.8x) | 1.0993, 1.0321 (119.6x) |
| 3 | 1.0959, 0.9740 (62.9x) | 1.1207, 1.0327 (119.7x) |
| median | 1.0167 | 1.0333 |

Blocks at rank 12 did better on seeds 0 and 3 and the same on seeds 1 and 2: the median comes within 2 % at 63x,
two of four seeds within it, so the Muon penalty shrinks but is not gone. Seed 3's two dense arms differ (1.0959,
1.1207): the Muon swarm is not run-to-run deterministic (its compressed arms 1.0675 and 1.1573 differ more).

Why the blocks: an in-process probe (ad-hoc, not kept: the `--math` loop with Muon, 2 replicas, 600 steps, seeds
0-3, one thread per process) compressed one part of the model at a time. Loss over dense-bf16, seeds 0 / 1 / 2 / 3:
everything at rank 6 int4 1.0170 / 1.0386 / 1.0051 / 1.0627 (median 1.028); only the blocks' matrices 1.0402 /
1.0709 / 1.0029 / 1.0174 (1.029); only the embedding and head 0.9547 / 1.0372 / 0.9652 / 1.0432 (1.001); blocks at
rank 12 and the rest at 6 0.9939 / 1.0540 / 0.9919 / 0.9986 (0.996, 63.6x). The penalty lives in the matrices Muon
orthogonalises; single runs scatter by several per cent (one process gave 1.4496 and another 1.4158 for the same
60-step dense run at 2 threads against 1), so only medians over seeds say anything.

Measured here (session 21, 2 cores, wide model, 150 steps, 3 power iterations, against `dense-bf16`; int4 factors,
`--bits 4`, two 4-bit codes to a byte with the same bf16 column scales; `python -m simulations.averaging_loss`
stored these for the simulator):

| optimiser, lr | rank | replica bytes vs dense-bf16 | loss ratio, seeds 0 / 1 / 2 / 3 | median |
|---|---|---|---|---|
| adamw, 1e-3 | 6 | 118.9x / 120.2x / 119.7x | 0.9991 / 1.0119 / 1.0099 | 1.0099 |
| muon, 1e-2 | 6 | 120.1x / 120.7x / 113.1x / 114.8x | 1.0756 / 1.0401 / 0.9023 / 1.0192 | 1.0297 |
| muon, 1e-2 | 8 | 90.6x / 90.6x / 91.3x / 90.4x | 1.0544 / 1.0070 / 0.8899 / 0.9969 | 1.0020 |
| muon, 1e-2, 600 steps | 6 | 121.4x / 120.0x | 1.0338 / 1.0776 | 1.0557 |
| muon, 1e-2, 600 steps | 8 | 90.9x / 76.9x | 1.0123 / 1.1123 | 1.0623 |

With AdamW the int4 factors keep the loss of the int8 ones (session 19 below: 1.0200 / 1.0030) at twice the
compression: replica traffic 119x below dense-bf16 within 2 % on all three seeds. The Muon recipe's ratios
scatter far more: its dense control is itself unstable at lr 1e-2 over 150 steps (seed 2 ended at 1.4063 against
1.23-1.29 on the others, hence 0.90 and 0.89; seed 3's dense arm gave 1.2903 and 1.2650 in two runs of the same
settings, so the Muon swarm is not run-to-run deterministic under load). Four seeds cannot tell rank 6 from rank
8 there; the medians are what `simulations.averaging_loss` hands the simulator. An in-process probe (not kept)
lowering the lr of Muon's AdamW part (embedding, head, norms) made the compressed arm worse, not better.
Over 600 steps (307,200 tokens) the Muon penalty does not shrink as AdamW's int8 one did (1.0045, session 19):
rank 6 1.0338 and 1.0776, rank 8 1.0123 and 1.1123, while the dense Muon control trained well (val 1.0938 and
1.0270; seed 1's rank-8 run also moved more bytes, 76.9x, its replicas pulling more). Muon with compressed
averaging carries a real penalty of a few per cent here; `simulations.averaging_loss` hands the simulator the
longest run's median. Replicas ended bit-identical in every run.

Measured here (session 19, 2 cores, wide model, lr 1e-3, against `dense-bf16`, the fair baseline: the node
now has it, so a dense exchange moves bf16 rather than fp32). The swarm, 150 steps (76,800 tokens), PowerSGD
rank 6 with int8 factors (`--rank 6 --bits 8`), loss ratio per data seed 0 / 1 / 2:

| power iterations | replica bytes vs dense-bf16 | loss ratio, seeds 0 / 1 / 2 | mean |
|---|---|---|---|
| 1 | 60.3x / 60.4x / 60.8x | 1.0180 / 1.0086 / 1.0097 | 1.012 |
| 3 | 60.8x / 59.5x / 60.6x | 1.0200 / 1.0030 / 1.0103 | 1.011 |

At 600 steps (307,200 tokens, seed 0, 3 iterations): 58.1x at 1.0045. Replicas ended bit-identical in every
run; each arm of a 150-step run took about a minute. So replica traffic is about 60x below a bf16 dense
exchange at a loss within 2 % on average (seed 0 at 150 steps sits at the edge: 1.018 and 1.020).
`--math` (one process, the whole model compressed, 150 steps; loss over fp32 dense): rank 6 int8 with one
power iteration 1.042 / 1.021 / 1.037 (seeds 0 / 1 / 2), with 3: 1.007 / 1.000 / 1.008; rank 4 int8 (90x
against bf16) with 3: 1.009 / 1.023 / 1.026, with 5: 1.030 / 1.028 / 1.018. Extra iterations cost the sender
compute only (each replica encodes its own contribution; no extra round trip), and in one process they close
most of the gap; in the swarm (stage 0, with the embedding, is not replicated there) one iteration was already
close. Rank 8 at a 384-wide model (69x against bf16, one iteration, `--math`): 1.028 and 1.064 (seeds 0, 1).

Earlier figures (fp32 dense baseline, one power iteration):

Measured here (session 15, 2 cores), the swarm, wide model (d 256), 150 steps = 76,800 tokens, lr 1e-3:
dense 26.30 MB per step at validation loss 1.3140; PowerSGD rank 8 with int8 factors (`--rank 8 --bits 8`)
370.9 kB per step at 1.3297: 70.9x less replica traffic at a loss ratio of 1.012 (the two arms ran as two
`run_swarm` calls with these settings). Dense contributions travel fp32, so against a bf16 dense exchange
the same run is about 35x. A first try of the int8 arm, with other runs on the machine, stopped with one
node short of one step record; its files went with it, so the cause is not known. The swarm now needs each
step recorded by one replica of every stage and reports what each node lacks (`steps_fetched_by_node`).
`benchmarks/wan.py` ran the same comparison (its defaults): 93.3x at 1.0176. At 600 steps (307,200 tokens;
`--steps 600 --rank 8 --bits 8 --lr 1e-3`, nothing else running): dense 26.33 MB per step at 1.1152, rank 8
int8 287.8 kB at 1.1193: 91.5x at a loss ratio of 1.0037, replicas bit-identical.
Session 20, the Muon recipe (`--optimizer muon --lr 1e-2 --rank 6 --bits 8 --iterations 3`, 150 steps, against
dense-bf16): seed 0 60.1x at 1.0153 (dense 1.2692), seed 1 59.9x at 1.0378 (dense 1.2243); replicas bit-identical.
Muon orthogonalises the averaged low-rank gradient, and the compressed arm falls further behind than with AdamW
(1.0200 / 1.0030 on the same seeds, session 19): the replica goal holds for AdamW, not yet for Muon.
`--math` (one process, wide, lr 1e-3; `--methods dense,powersgd-int8 --seed S`), loss over dense:

| steps | seed | rank 4 int8 (180x) | rank 8 int8 (92x) |
|---|---|---|---|
| 150 | 0 | 1.044 | 1.039 |
| 150 | 1 | 1.016 | 1.006 |
| 150 | 2 | 1.063 | 1.016 |
| 600 | 0 | 1.048 | 0.994 |
| 600 | 1 | 1.031 | 1.018 |

Rank 8 int8: mean 1.015, 4 of 5 runs within 2 %. At the bytes of rank 8 int8, rank 4 bf16 (91x) gave 1.035
(150 steps, seed 0), rank 2 bf16 (175x) 1.070. Single runs differ by a few percent with the seed, so no one
run decides. At lr 3e-3 the wide model's dense run was worse (1.450 against 1.314 at 150 steps, the ad-hoc
script below, whose dense arm is this one's), hence 1e-3.
On the tiny model (d 64; an ad-hoc script, not this one) rank 4 int8 was 45x at 1.014 (600 steps), rank 3
int8 59x at 1.031: narrow matrices leave little to compress. DiLoCo H 25 (100x, tiny, session 14): 1.020 at
150 steps, 1.043 at 600.

The last line is one JSON object (`replica_compression` = dense bytes / compressed bytes per step,
`loss_ratio_compressed_avg` = compressed / dense validation loss). `compare_averaging()` is the
function benchmarks/wan.py calls.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from node.observability.status import read_progress  # noqa: E402
from node.testing.swarm import NodeProcess, await_ready, spawn_node, start_node, stop_nodes  # noqa: E402
from node.training.checkpoint import latest_checkpoint  # noqa: E402
from protocol.modelspec import POWERSGD_BITS, REPLICA_EXCHANGE  # noqa: E402
from sharding import PRESETS, ModelConfig, OptimConfig, build_model, build_stage, load_corpus, partition  # noqa: E402
from sharding.data import Corpus  # noqa: E402
from sharding.gradcompress import (  # noqa: E402
    OuterNesterov,
    PowerSGDEncoder,
    PowerSGDLayout,
    TopKEncoder,
    dequantize_factors,
    powersgd_decode,
    topk_decode,
)
from sharding.optimconfig import OPTIMIZERS  # noqa: E402
from sharding.sharedpowersgd import SharedPowerSGD  # noqa: E402
from sharding.train import make_optimizer, optimizer_step  # noqa: E402

M, B, STAGES = 4, 2, 3  # microbatches per step, sequences per microbatch, pipeline stages
MODELS = {  # --model choices: the tiny preset (64 wide) and a 256-wide one where rank-4 factors save more
    "tiny": PRESETS["tiny"],
    "wide": ModelConfig(vocab_size=256, seq_len=64, d_model=256, n_layers=3, n_heads=4),
}
MATH_LR = {"tiny": 3e-3, "wide": 1e-3}  # --math peak lr per model (wide: dense trains better at 1e-3 than 3e-3)
VAL_BATCHES, VAL_SIZE, VAL_SEED = 8, 8, 1  # validation: batches, sequences per batch, seed
DENSE_BASELINES = ("dense-bf16", "dense")  # the swarm's dense arm: the node's bf16 exchange (the fair one) or fp32


def _args(steps: int, averaging: str, rank: int, model: str, bits: int = 16, lr: float | None = None,
          iterations: int = 1, data_seed: int = 0, optimizer: str = "adamw", block_rank: int = 0,
          exchange: str = "microbatch", schedule: str = "gpipe", max_staleness: int = 0) -> list[str]:
    return ["--schedule", schedule, "--max-staleness", str(max_staleness), "--replica-exchange", exchange, "--powersgd-block-rank", str(block_rank), "--recipe-optimizer", optimizer, "--recipe-data-seed", str(data_seed), "--powersgd-iterations", str(iterations), "--model", model, *(["--lr", str(lr)] if lr is not None else []), "--powersgd-bits", str(bits), "--stages", str(STAGES), "--steps", str(steps), "--replicated", "--microbatches", str(M),
            "--microbatch-size", str(B), "--corpus", "synthetic", "--threads", "1", "--replica-timeout", "20",
            "--avg-timeout", "20", "--commit-poll", "0.3", "--checkpoint-every", "0", "--no-replica-timeout", "120",
            "--replica-averaging", averaging, "--powersgd-rank", str(rank)]


def val_loss(modules: list[torch.nn.Module], corpus: Corpus, cfg: ModelConfig) -> float:
    """Mean loss of the stage modules chained over the fixed validation batches."""
    total = 0.0
    with torch.no_grad():
        for i in range(VAL_BATCHES):
            w = corpus.batch("val", 0, i, VAL_SIZE, cfg.seq_len, VAL_SEED)
            ids, targets = w[:, :-1], w[:, 1:]
            h = None
            for m in modules[:-1]:
                h = m(ids, h)
            total += float(modules[-1](ids, h, targets=targets))
    return total / VAL_BATCHES


def _stage_weights(data_dir: Path, stage: int) -> dict[str, torch.Tensor]:
    ckpt = latest_checkpoint(data_dir, stage)
    if ckpt is None:
        raise RuntimeError(f"no checkpoint of stage {stage} in {data_dir}")
    return load_file(str(ckpt / "model.safetensors"))


def run_swarm(root: Path, steps: int, averaging: str, rank: int, timeout_s: float,
              cfg: ModelConfig, bits: int = 16, lr: float | None = None, iterations: int = 1,
              data_seed: int = 0, optimizer: str = "adamw", block_rank: int = 0,
              exchange: str = "microbatch", schedule: str = "gpipe", max_staleness: int = 0) -> dict[str, Any]:
    """One replicated run of model `cfg` (PowerSGD factors in `bits` from `iterations` power iterations, the
    node's default lr unless `lr`, the data order of `data_seed`, the recipe's `optimizer`, the pipeline `schedule`
    with `max_staleness`); returns bytes per step between replicas, losses and the replica check."""
    root.mkdir(parents=True, exist_ok=True)
    model_file = root / "model.json"
    model_file.write_text(json.dumps(cfg.to_dict()))
    args = _args(steps, averaging, rank, str(model_file), bits, lr, iterations, data_seed, optimizer, block_rank,
                 exchange, schedule, max_staleness)
    head = start_node(0, root / "head", args)
    boot = ["--bootstrap", head.ready["addrs"][0]]
    layout = [(1, "mid0"), (1, "mid1"), (2, "tail0"), (2, "tail1")]
    rest = [spawn_node(s, root / name, args + boot) for s, name in layout]
    nodes: list[NodeProcess] = [head, *rest]
    t0 = time.monotonic()
    try:
        for n in rest:
            await_ready(n, 120.0)
        deadline = time.monotonic() + timeout_s
        for n in nodes:
            n.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        codes = [n.proc.returncode for n in nodes]
        if any(codes):
            raise RuntimeError(f"{averaging}: node exit codes {codes} (logs under {root})")
    finally:
        stop_nodes(nodes)
    wall = time.monotonic() - t0
    recs = {name: {int(r["step"]): r for r in read_progress(root / name)} for name in
            ["head", *(name for _, name in layout)]}
    stages: dict[int, list[str]] = {0: ["head"]}
    for s, name in layout:
        stages.setdefault(s, []).append(name)
    done = [s for s in range(steps) if all(any(s in recs[n] for n in names) for names in stages.values())]
    if len(done) < steps:
        raise RuntimeError(f"{averaging}: only {len(done)} of {steps} steps completed by a replica of every stage")
    # a replica that missed a step's contributions past avg_timeout fetches the state instead (no record of it)
    synced = {name: steps - len(r) for name, r in recs.items() if len(r) < steps}
    wire = {name: int(r[max(r)].get("avg_wire_bytes", 0)) if r else 0 for name, r in recs.items()}
    # contributions that crossed between the replicas, counted by each receiving node with its bytes (a replica that
    # computed nothing in a step sends nothing, so bytes per step follow the routing; bytes per contribution follow the
    # encoding): per replicated stage, bytes per contribution, and what a step moves when every replica computes
    pushes = {name: int(r[max(r)].get("avg_pushes_in", 0)) if r else 0 for name, r in recs.items()}
    push_bytes = {name: int(r[max(r)].get("avg_push_bytes", 0)) if r else 0 for name, r in recs.items()}
    per_contribution: dict[int, float] = {}
    for s_, names in stages.items():
        if len(names) > 1:
            n_in = sum(pushes[n] for n in names)
            if not n_in:
                raise RuntimeError(f"{averaging}: no contribution reached a replica of stage {s_} (avg_pushes_in of "
                                   f"each node's last record: {pushes}, bytes: {wire})")
            per_contribution[s_] = sum(push_bytes[n] for n in names) / n_in  # pulls of missed ones not included
    # a full step: every replica's bundle to each other replica (step exchange), or each of the M microbatches'
    # contribution to each other replica (microbatch exchange)
    full_step = sum(c * (len(stages[s_]) if exchange == "step" else M) * (len(stages[s_]) - 1)
                    for s_, c in per_contribution.items())
    corpus = load_corpus("synthetic")
    modules: list[torch.nn.Module] = []
    for stage, name in ((0, "head"), (1, "mid0"), (2, "tail0")):
        m = build_stage(cfg, partition(cfg, STAGES)[stage])
        m.load_state_dict(_stage_weights(root / name, stage))
        m.eval()
        modules.append(m)
    identical = all(
        all(torch.equal(a[k], b[k]) for k in a)
        for a, b in ((_stage_weights(root / "mid0", 1), _stage_weights(root / "mid1", 1)),
                     (_stage_weights(root / "tail0", 2), _stage_weights(root / "tail1", 2))))
    tail_losses = [next(recs[n][s] for n in stages[2] if s in recs[n]).get("loss") for s in done]
    return {"steps": steps, "wall_s": wall, "replica_bytes_per_step": sum(wire.values()) / steps,
            "replica_bytes_per_full_step": full_step, "replica_bytes_per_contribution": per_contribution,
            "bytes_by_node": wire, "contributions_by_node": pushes, "val_loss": val_loss(modules, corpus, cfg),
            "final_train_loss": tail_losses[-1], "replicas_identical": identical, "steps_fetched_by_node": synced}


def compare_averaging(steps: int = 40, rank: int = 4, timeout_s: float = 900.0, root: Path | None = None,
                      model: str = "wide", bits: int = 16, lr: float | None = None,
                      dense: str = "dense-bf16", iterations: int = 1, data_seed: int = 0,
                      optimizer: str = "adamw", block_rank: int = 0, exchange: str = "microbatch",
                      schedule: str = "gpipe", max_staleness: int = 0) -> dict[str, Any]:
    """A dense baseline (`dense`: the node's `dense-bf16`, the fair one, or fp32 `dense`) vs PowerSGD rank `rank`
    (factors in `bits`: 16 bf16, 8 int8, 4 int4; `iterations` power iterations) on the replicated local swarm, same steps (equal tokens) and lr (None:
    the node's default), both with the data order of `data_seed` and the replica exchange `exchange` (the spec's
    replica_exchange: one contribution per microbatch, or per replica and step, in both arms so that the ratio is the
    encoding's) and the pipeline `schedule` (async: `max_staleness`, which needs the step exchange).

    Returns `replica_compression` (dense / compressed replica bytes of a step in which every replica computes: each
    stage's measured bytes per contribution received, times the contributions such a step sends; the routing does not
    change it, where the measured bytes per step also count how many replicas got work), `loss_ratio_compressed_avg`
    (compressed / dense validation loss) and both runs' figures (`dense`, `compressed`)."""
    if dense not in DENSE_BASELINES:
        raise ValueError(f"dense baseline {dense!r}: use one of {', '.join(DENSE_BASELINES)}")
    cfg = MODELS[model]
    base = root or Path(tempfile.mkdtemp(prefix="pmn-wan-avg-"))
    try:
        base_run = run_swarm(base / "dense", steps, dense, rank, timeout_s, cfg, lr=lr, data_seed=data_seed,
                             optimizer=optimizer, exchange=exchange, schedule=schedule, max_staleness=max_staleness)
        comp = run_swarm(base / "powersgd", steps, "powersgd", rank, timeout_s, cfg, bits, lr, iterations, data_seed,
                         optimizer, block_rank, exchange, schedule, max_staleness)
    finally:
        if root is None:
            shutil.rmtree(base, ignore_errors=True)
    return {"replica_compression": base_run["replica_bytes_per_full_step"] / max(1.0, comp["replica_bytes_per_full_step"]),
            "loss_ratio_compressed_avg": comp["val_loss"] / base_run["val_loss"], "rank": rank, "bits": bits,
            "block_rank": block_rank, "exchange": exchange, "schedule": schedule, "max_staleness": max_staleness,
            "iterations": iterations, "data_seed": data_seed, "steps": steps, "model": model, "tokens": steps * M * B * cfg.seq_len, "dense_baseline": dense,
            "dense": base_run, "compressed": comp}


# -- the in-process comparison of the methods (--math) ------------------------------------------------


def _flat(model: torch.nn.Module, grads: bool) -> torch.Tensor:
    ps = [p for p in model.parameters() if p.requires_grad]
    if not grads:
        return torch.cat([p.detach().reshape(-1) for p in ps])
    out = torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel()) for p in ps])
    for p in ps:
        p.grad = None
    return out


def _install(model: torch.nn.Module, flat: torch.Tensor, grads: bool) -> None:
    off = 0
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                part = flat[off: off + p.numel()].reshape(p.shape).clone()
                if grads:
                    p.grad = part
                else:
                    p.copy_(part)
                off += p.numel()


def simulate(method: str, steps: int, rank: int = 4, fraction: float = 0.01, inner: int = 25,
             replicas: int = 2, half: bool = True, model_name: str = "tiny", bits: int = 16,
             lr: float | None = None, seed: int = 0, iterations: int = 1, exchange: str = "microbatch",
             optimizer: str = "adamw") -> dict[str, Any]:
    """Train the whole model `steps` steps of M microbatches, microbatch i computed by replica i % replicas.

    dense / powersgd / topk: each microbatch gradient travels (encoded by its replica, error feedback
    there), every replica applies the mean of the decoded ones. diloco: each replica takes AdamW steps
    on its own microbatches; every `inner` steps the mean parameter delta (bf16 if `half`) goes through
    the outer Nesterov step. diloco-delayed: the same, but the replicas do not wait for the average: the
    outer step of round r arrives at the end of round r + 1 (its exchange overlapped with that round's compute)
    and each replica then sits at the new global weights plus its own progress of round r + 1 (the final model
    applies the last round's step). powersgd `bits` 8: int8 factors with a bf16 scale per column (the
    error feedback absorbs the rounding). exchange "step" (dense and powersgd): each replica sends one
    contribution per step, the sum of its microbatches' gradients, as the node's `replica_exchange = "step"` does.
    powersgd-shared (step exchange only): the code linear across replicas (`sharding.sharedpowersgd`, two rounds
    per step, the same bytes per replica as one powersgd contribution). lr: MATH_LR[model_name] unless given;
    optimizer: the recipe's (adamw or muon); seed: initial weights and data order. Returns the validation loss and
    the dense / method bytes ratio per contribution."""
    torch.manual_seed(seed)
    cfg = MODELS[model_name]
    corpus = load_corpus("synthetic")
    if method == "powersgd-shared" and exchange != "step":
        raise ValueError("powersgd-shared sends one contribution per replica and step: use exchange 'step'")
    optim = OptimConfig(lr=MATH_LR[model_name] if lr is None else lr, warmup_steps=10, optimizer=optimizer)
    model = build_model(cfg)
    shapes = [tuple(p.shape) for p in model.parameters() if p.requires_grad]
    size = sum(math.prod(s) for s in shapes)
    dense_bytes = steps * M * (replicas - 1) * 4 * size
    if method in ("diloco", "diloco-delayed"):
        reps = [copy.deepcopy(model) for _ in range(replicas)]
        opts = [make_optimizer(m, optim) for m in reps]
        outer = OuterNesterov(size)
        start = _flat(model, False)
        sent = 0
        prev = [start] * replicas  # where each replica began this round (diloco: all at `start`)
        pending: torch.Tensor | None = None  # diloco-delayed: the averaged delta of the round before, in flight
        for step in range(steps):
            for r, rep in enumerate(reps):
                mine = range(r, M, replicas)
                for mb in mine:
                    w = corpus.batch("train", step, mb, B, cfg.seq_len, seed)
                    (rep(w[:, :-1], targets=w[:, 1:]) / len(mine)).backward()
                optimizer_step(rep, opts[r], step, optim)
            if (step + 1) % inner:
                continue
            ends = [_flat(m, False) for m in reps]
            delta = torch.stack(prev).mean(0) - torch.stack(ends).mean(0)  # the round's mean progress
            if half:
                delta = delta.to(torch.bfloat16).float()
            sent += replicas * (replicas - 1) * (2 if half else 4) * size
            if method == "diloco":  # everyone waits for the average and restarts from the outer step
                start = outer.step(start, delta)
                prev = [start] * replicas
            elif pending is None:  # diloco-delayed, first round: nothing has arrived yet, go on from here
                prev, pending = ends, delta
            else:  # diloco-delayed: last round's outer step arrived; keep this round's own progress on top
                start = outer.step(start, pending)
                prev, pending = [start + (e - p) for p, e in zip(prev, ends, strict=True)], delta
            for m, w in zip(reps, prev, strict=True):
                _install(m, w, False)
        if pending is not None:
            start = outer.step(start, pending)
        _install(model, start, False)
        return {"method": method, "inner": inner, "val_loss": val_loss([model], corpus, cfg),
                "compression": dense_bytes / max(1, sent), "compression_vs_bf16": dense_bytes / 2 / max(1, sent)}
    opt = make_optimizer(model, optim)
    wire_dtype = torch.bfloat16 if half else torch.float32
    shared: SharedPowerSGD | None = None  # powersgd-shared: the replica group's code
    if method in ("powersgd", "powersgd-shared"):
        lay = PowerSGDLayout.build(shapes, rank)
        pencs = [PowerSGDEncoder(lay, seed=r, wire_dtype=wire_dtype, iterations=iterations)
                 for r in range(replicas if method == "powersgd" else 0)]
        shared = SharedPowerSGD(lay, replicas, seed=seed, bits=bits) if method == "powersgd-shared" else None
        per = (lay.wire_size * bits // 8 + 2 * lay.scale_count if bits in (8, 4)
               else lay.wire_size * (2 if half else 4))
    elif method == "topk":
        tencs = [TopKEncoder(size, fraction) for _ in range(replicas)]
        per = tencs[0].wire_size * 4
    elif method == "dense-bf16":
        per = 2 * size
    else:
        per = 4 * size

    def decoded(v: torch.Tensor, r: int) -> torch.Tensor:  # replica r's contribution `v` as every replica decodes it
        if method == "powersgd" and bits in (8, 4):
            codes, scales = pencs[r].encode_quantized(v, bits)
            return powersgd_decode(lay, dequantize_factors(lay, codes, scales, bits))
        if method == "powersgd":
            return powersgd_decode(lay, pencs[r].encode(v))
        if method == "topk":
            return topk_decode(tencs[r].encode(v), size, fraction)
        if method == "dense-bf16":  # the node's dense-bf16 exchange: every value rounded once
            return v.to(torch.bfloat16).float()
        return v

    for step in range(steps):
        vecs = []
        # exchange step: each replica's sum of its microbatches
        sums = [torch.zeros(size) for _ in range(replicas)] if exchange == "step" else []
        for mb in range(M):
            w = corpus.batch("train", step, mb, B, cfg.seq_len, seed)
            (model(w[:, :-1], targets=w[:, 1:]) / M).backward()
            v = _flat(model, True)
            if exchange == "step":
                sums[mb % replicas] += v
            else:
                vecs.append(decoded(v, mb % replicas))
        if shared is not None:
            vecs = [shared.step(sums) * replicas]
        elif exchange == "step":
            vecs = [decoded(v, r) for r, v in enumerate(sums)]
        _install(model, torch.stack(vecs).sum(0), True)
        optimizer_step(model, opt, step, optim)
    out: dict[str, Any] = {"method": method, "val_loss": val_loss([model], corpus, cfg), "exchange": exchange,
                           "optimizer": optimizer, "compression": 4 * size / per, "compression_vs_bf16": 2 * size / per}
    if method in ("powersgd", "powersgd-shared"):
        out["rank"], out["bits"], out["iterations"] = rank, bits, iterations
    if method == "topk":
        out["fraction"] = fraction
    return out


@dataclass(frozen=True)
class MathArgs:
    """What every --math arm is run with."""

    steps: int  # global steps (equal tokens for every arm)
    inner: int  # DiLoCo inner steps per outer round (H)
    model: str  # MODELS key
    seed: int  # initial weights and data order
    ranks: tuple[int, ...] | None  # PowerSGD ranks (None: each powersgd arm's own)
    iterations: int  # PowerSGD power iterations per contribution
    exchange: str = "microbatch"  # dense, powersgd and top-k arms: one contribution per microbatch, or per replica and step
    optimizer: str = "adamw"  # the recipe's optimiser in every arm
    lr: float | None = None  # peak lr of every arm (None: MATH_LR of the model)

    def kw(self, exchange: bool = True) -> dict[str, Any]:
        """simulate()'s keywords every arm shares (`exchange`: the arm has contributions to send)."""
        return {"model_name": self.model, "seed": self.seed, "optimizer": self.optimizer, "lr": self.lr,
                **({"exchange": self.exchange} if exchange else {})}


MATH_METHODS: dict[str, Callable[[MathArgs], list[dict[str, Any]]]] = {  # --math arms
    "dense": lambda a: [simulate("dense", a.steps, **a.kw())],
    "dense-bf16": lambda a: [simulate("dense-bf16", a.steps, **a.kw())],
    "powersgd": lambda a: [simulate("powersgd", a.steps, rank=r, iterations=a.iterations, **a.kw())
                           for r in a.ranks or (2, 4)],
    "powersgd-int8": lambda a: [simulate("powersgd", a.steps, rank=r, bits=8, iterations=a.iterations, **a.kw())
                                for r in a.ranks or (4, 8)],
    "powersgd-int4": lambda a: [simulate("powersgd", a.steps, rank=r, bits=4, iterations=a.iterations, **a.kw())
                                for r in a.ranks or (6, 8)],
    "powersgd-shared": lambda a: [simulate("powersgd-shared", a.steps, rank=r, **a.kw()) for r in a.ranks or (4, 8)],
    "powersgd-shared-int4": lambda a: [simulate("powersgd-shared", a.steps, rank=r, bits=4, **a.kw())
                                       for r in a.ranks or (6, 12)],
    "topk": lambda a: [simulate("topk", a.steps, fraction=0.01, **a.kw())],
    "diloco": lambda a: [simulate("diloco", a.steps, inner=a.inner, **a.kw(False))],
    "diloco-delayed": lambda a: [simulate("diloco-delayed", a.steps, inner=a.inner, **a.kw(False))],
}
SHARED_METHODS = ("powersgd-shared", "powersgd-shared-int4")  # --math arms that need --exchange step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short runs")
    p.add_argument("--steps", type=int, default=None, help="global steps per run (equal tokens)")
    p.add_argument("--rank", type=int, default=4, help="PowerSGD rank")
    p.add_argument("--block-rank", type=int, default=0,
                   help="swarm: PowerSGD rank of the transformer blocks' matrices (the spec's powersgd_block_rank; "
                        "0: --rank)")
    p.add_argument("--exchange", choices=REPLICA_EXCHANGE, default=REPLICA_EXCHANGE[0],
                   help="the spec's replica_exchange in every arm (--math: dense, powersgd and top-k): one "
                        "contribution per microbatch a replica computes, or one per replica and step")
    p.add_argument("--model", choices=sorted(MODELS), default=None, help="model (default: wide; --math: tiny)")
    p.add_argument("--math", action="store_true", help="compare the methods in one process instead of the swarm")
    p.add_argument("--inner", type=int, default=25, help="--math: DiLoCo inner steps per outer round (H)")
    p.add_argument("--methods", default=",".join(MATH_METHODS), help="--math: comma-separated methods to compare")
    p.add_argument("--seed", type=int, default=0,
                   help="--math: initial weights and data order; swarm: the data order (the spec's data_seed)")
    p.add_argument("--ranks", default=None,
                   help="--math: comma-separated PowerSGD ranks of the powersgd arms (default: bf16 2,4; int8 4,8)")
    p.add_argument("--iterations", type=int, default=1,
                   help="PowerSGD power iterations per contribution (the spec's powersgd_iterations)")
    p.add_argument("--dense", choices=DENSE_BASELINES, default=DENSE_BASELINES[0],
                   help="swarm: the dense arm, the node's dense-bf16 exchange (the fair baseline) or fp32 dense")
    p.add_argument("--bits", type=int, choices=POWERSGD_BITS, default=16,
                   help="PowerSGD factors in bf16, int8 or int4 (codes with a bf16 scale per column)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak lr (default: swarm, the node's 3e-3; --math, the model's MATH_LR)")
    p.add_argument("--schedule", choices=("gpipe", "async"), default="gpipe",
                   help="swarm: the pipeline schedule of both arms (async needs --exchange step)")
    p.add_argument("--max-staleness", type=int, default=1, help="swarm, --schedule async: the staleness bound")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw",
                   help="the recipe's optimiser in every arm (recipe.optimizer)")
    a = p.parse_args(argv)
    if a.block_rank < 0:
        p.error(f"--block-rank {a.block_rank}: a rank >= 1, or 0 for --rank")
    if a.iterations < 1:
        p.error(f"--iterations {a.iterations}: PowerSGD needs at least one power iteration")
    if a.math:
        steps = a.steps or (60 if a.quick else 150)
        mod = a.model or "tiny"
        methods = [m for m in a.methods.split(",") if m]
        unknown = sorted(set(methods) - set(MATH_METHODS))
        if unknown or "dense" not in methods:
            p.error(f"--methods {a.methods!r}: use dense (required: the baseline) and any of {list(MATH_METHODS)}")
        try:
            ranks = tuple(int(r) for r in a.ranks.split(",")) if a.ranks else None
        except ValueError:
            p.error(f"--ranks {a.ranks!r}: comma-separated integers >= 1")
        if ranks is not None and min(ranks) < 1:
            p.error(f"--ranks {a.ranks!r}: comma-separated integers >= 1")
        if set(methods) & set(SHARED_METHODS) and a.exchange != "step":
            p.error(f"--methods {a.methods!r}: {', '.join(SHARED_METHODS)} send one contribution per replica and "
                    "step: add --exchange step")
        margs = MathArgs(steps, a.inner, mod, a.seed, ranks, a.iterations, a.exchange, a.optimizer, a.lr)
        runs = [run for m in MATH_METHODS if m in methods for run in MATH_METHODS[m](margs)]
        dense = runs[0]["val_loss"]
        print(f"{'method':22} {'vs fp32':>8} {'vs bf16':>8} {'val loss':>9} {'vs dense':>9}")
        for r in runs:
            name = r["method"] + (f" r{r['rank']}" if "rank" in r else "") + (
                f" int{r['bits']}" if r.get("bits") in (8, 4) else "") + (f" it{r['iterations']}" if r.get("iterations", 1) > 1 else "") + (
                f" k={r['fraction']}" if "fraction" in r else "") + (f" H={r['inner']}" if "inner" in r else "")
            print(f"{name:22} {r['compression']:>7.1f}x {r['compression_vs_bf16']:>7.1f}x {r['val_loss']:>9.4f} "
                  f"{r['val_loss'] / dense:>9.4f}")
        print(json.dumps({"steps": steps, "model": mod, "tokens": steps * M * B * MODELS[mod].seq_len,
                          "lr": MATH_LR[mod] if a.lr is None else a.lr, "seed": a.seed, "exchange": a.exchange,
                          "optimizer": a.optimizer, "runs": runs}))
        return 0
    steps = a.steps or (30 if a.quick else 150)
    if a.schedule == "async" and a.exchange != "step":
        p.error("--schedule async with replicated stages needs --exchange step (the node's rule)")
    staleness = a.max_staleness if a.schedule == "async" else 0
    res = compare_averaging(steps, a.rank, timeout_s=600 if a.quick else 3600, model=a.model or "wide", bits=a.bits,
                            lr=a.lr, dense=a.dense, iterations=a.iterations, data_seed=a.seed,
                            optimizer=a.optimizer, block_rank=a.block_rank, exchange=a.exchange, schedule=a.schedule,
                            max_staleness=staleness)
    print(f"{'averaging':12} {'steps':>5} {'replica B/step':>15} {'B/full step':>15} {'val loss':>9} "
          f"{'train loss':>10} {'identical':>9} {'wall s':>7}")
    for name, r in ((a.dense, res["dense"]), (f"powersgd r{a.rank}" + (f"/{a.block_rank}" if a.block_rank else "")
                                              + (f" int{a.bits}" if a.bits < 16 else ""),
                                              res["compressed"])):
        print(f"{name:12} {r['steps']:>5} {r['replica_bytes_per_step']:>15.0f} "
              f"{r['replica_bytes_per_full_step']:>15.0f} {r['val_loss']:>9.4f} "
              f"{r['final_train_loss']:>10.4f} {str(r['replicas_identical']):>9} {r['wall_s']:>7.1f}")
    print(f"replica traffic {res['replica_compression']:.1f}x smaller, validation loss ratio "
          f"{res['loss_ratio_compressed_avg']:.4f} at {res['tokens']} tokens")
    print(json.dumps({"replica_compression": res["replica_compression"],
                      "loss_ratio_compressed_avg": res["loss_ratio_compressed_avg"], "rank": a.rank, "bits": a.bits,
                      "block_rank": a.block_rank, "exchange": a.exchange, "schedule": a.schedule,
                      "max_staleness": staleness, "lr": a.lr, "optimizer": a.optimizer, "steps": steps, "dense_baseline": a.dense,
                      "iterations": a.iterations, "seed": a.seed,
                      "model": res["model"], "tokens": res["tokens"],
                      "dense_replica_bytes_per_step": res["dense"]["replica_bytes_per_step"],
                      "compressed_replica_bytes_per_step": res["compressed"]["replica_bytes_per_step"],
                      "dense_replica_bytes_per_full_step": res["dense"]["replica_bytes_per_full_step"],
                      "compressed_replica_bytes_per_full_step": res["compressed"]["replica_bytes_per_full_step"],
                      "dense_val_loss": res["dense"]["val_loss"], "compressed_val_loss": res["compressed"]["val_loss"],
                      "replicas_identical": res["dense"]["replicas_identical"] and
                      res["compressed"]["replicas_identical"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
