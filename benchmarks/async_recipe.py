"""The async schedule's loss at equal tokens against GPipe's, per recipe: where the delayed gradient costs.

For each (learning rate, warm-up steps) of the grid, trains the benchmark model of benchmarks/wan.py twice
with the same recipe and data: synchronously (`sharding.train_reference`, what gpipe and 1f1b compute)
and with gradients `--staleness` steps late plus the async runner's look-ahead
(`sharding.delayed.train_delayed`, what the async schedule computes: the node swarm reproduces both
exactly, tests/node/test_schedules.py). Validation loss on 64 windows of the corpus's validation split.

Reported: the ratio async / sync per recipe (`loss_ratio_same_recipe`), and the ratio of the best async
run over the best sync run of the grid (`loss_ratio_tuned`, each arm at its own best recipe: the fair
figure for issue 19's "within 2 % at equal tokens"). Runs go to `--workers` processes, one torch thread
each. Prints a table; the last line is JSON.

`--horizons 300,1500,3000` trains every recipe once per horizon (equal tokens within a horizon) and adds
`loss_ratio_by_steps` (async / sync per horizon, same recipe): what one step of delay costs shrinks as the
run grows, so a short comparison overstates it. `--staleness 1,2` adds an async arm per bound beside the one
sync run (the first bound is the headline's) and `loss_ratio_by_staleness` (bound -> horizon -> recipe ->
async / sync). `--model tiny` runs the tests' model instead of wan.py's.

    python benchmarks/async_recipe.py --quick     # tiny model, machinery check (< 60 s)
    python benchmarks/async_recipe.py             # bench model, 300 steps, 3 recipes (about 30 min on 2 cores)
    python benchmarks/async_recipe.py --model tiny --grid 1e-3:10 --horizons 300,1500,3000   # about 8 min

Measured (the command above; tiny, lr 1e-3, warm-up 10 then constant, staleness 1, look-ahead 1), validation
loss sync -> async: 300 steps 2.0219 -> 2.1349 (1.056), 1500 steps 1.5318 -> 1.5535 (1.014), 3000 steps
1.3880 -> 1.3951 (1.005). With `--staleness 2`: 3000 steps 1.4376 (1.036); `--staleness 4`: 1500 steps 2.0465
(1.336), 3000 steps 1.7189 (1.238); look-ahead 1 was the best of 0.25 / 0.5 / 1 / 1.5 / 2 at staleness 4, 1500
steps.

Measured on the bench model (session 16: `--grid 1e-3:10 --horizons 300,1000,3000 --staleness 1,2`, 2 workers,
about 55 min), validation loss sync -> async: staleness 1: 300 steps 1.9192 -> 2.2254 (1.1596), 1000 steps
1.4829 -> 1.5597 (1.0518), 3000 steps 1.2042 -> 1.2485 (1.0367); staleness 2: 2.5470 (1.3271), 1.8605
(1.2547), 1.3444 (1.1164). Unlike the tiny model's, the bench model's penalty fades slowly: by the 25-step
train-loss curves (staleness 1), async reaches at step 1000 / 2000 / 3000 the loss sync had at step 725 / 1575
/ 2275, i.e. it takes 1.38 / 1.27 / 1.32x the steps. `python -m simulations.async_loss` stores the loss ratios
for the datacenter comparison, which turns a ratio into steps with its assumed data exponent 0.28: 1.0367 ->
1.14x, below the 1.32x these curves show (this model's sync loss falls with exponent 0.19 from 1000 to 3000
steps), so that comparison is optimistic about async.

Recipe probes on the bench model (300 steps, staleness 1, an ad-hoc script over the same functions, not this
script's grid): global-norm clipping helps async most. Sync 1.9192 (no clip), 1.8970 (clip 1), 1.8957 (0.5),
1.8954 (0.25); async 2.2254 (no clip), 2.0845 (clip 1), 2.0315 (0.5), 2.0502 (0.25), 2.0121 (0.25 with
look-ahead 1.5): 1.06 against the best sync. Warm-up 100 instead of 10: async 2.0925, sync 1.9569.
Look-ahead 0.5 or 2 instead of 1: worse (2.5760, 2.5251). The node's async schedule does not clip yet (the
global norm needs every stage's share of a step without a flush), so these recipes are not what it runs.

Session 17: the async schedule now clips (`recipe.grad_clip`, norms carried on NORM frames between steps), and
`--grad-clip C` runs both arms with it. `--grid 1e-3:10 --horizons 1000,3000 --grad-clip 0.5` (staleness 1,
2 workers, other work on the machine): sync -> async 1000 steps 1.4904 -> 1.5324 (1.0282), 3000 steps 1.2536 ->
1.2809 (1.0218). The same-recipe gap narrows (1.0367 unclipped), but clip 0.5 costs sync more than it gains
async at this length: against the best sync run (unclipped, 1.2042) clipped async is 1.064 and unclipped async
1.0367, so at 3000 steps clipping is not the better recipe and the simulator's calibration keeps the unclipped
ratios. The clip helps short runs (300 steps, above) and was not probed at other values over 3000 steps.

Session 18: `--schedule cosine` (both arms decay to `OptimConfig.min_lr_ratio` x lr over the run, what a spec's
`total_steps` gives).
`--grid 1e-3:10 --horizons 3000 --staleness 1,2 --schedule cosine` (3 workers on 2 cores): sync 1.2164, async
1.2700 (1.0440) at staleness 1, 1.4358 (1.1803) at staleness 2: the decay does not close the gap, and it costs
sync (constant: 1.2042, session 16). The async train-loss curve stalls early (2.98 from step 50 to 100 while sync falls
through 2.39 to 2.29) and stays behind: the lag is made in the first few hundred steps, which a decay at the
end does not undo. Tiny (`--model tiny --horizons 300,600 --staleness 1,2 --schedule cosine`): 1.0472 / 1.0468
at staleness 1, 1.1818 / 1.1533 at staleness 2. Ad-hoc probes on tiny, 600 steps, cosine: lr 2e-3 in both arms
widens the gap (sync 1.7634, async 1.9408: 1.10), so the penalty grows with lr x delay rather than async
wanting a larger step; a fresh tail stage (delays 1, 1, 0 over 3 stages, what a FIFO tail could run without
waiting) was worse than the uniform delay (2.0013 against 1.9939): stages out of step with each other cost more
than the shared delay.
Warm-up: `--grid 1e-3:200 --horizons 3000` (constant after 200 warm-up steps, 2 workers): sync 1.2462, async
1.2595, **1.0107** for the same recipe, the first recipe within 2 % on the bench model; but the long warm-up
costs sync more (1.2042 with 10 warm-up steps, session 16), so against the best sync run async is 1.046 (1.0367
with 10, session 16).
Session 19, AdamW beta1 (an ad-hoc script; tiny, 600 steps, lr 1e-3, warm-up 10, constant, staleness 1,
look-ahead 1), validation loss: async 1.9764 / 1.9154 / 1.8733 / 1.8992 at beta1 0.7 / 0.8 / 0.9 / 0.95; sync
1.8080 at 0.9 and 1.8287 at 0.95. Less momentum does not offset the delay here (the "asynchrony begets
momentum" argument would have it help); the default 0.9 is best for both arms.
Session 19, warm-up 100 (`--grid 1e-3:100 --horizons 3000 --staleness 1`, 2 workers): sync 1.2475, async 1.2817
(1.0275 same recipe; 1.064 against the best sync run, warm-up 10, session 16): no better than 10 or 200 for
either arm. Warm-up 200 at staleness 2 (`--grid 1e-3:200 --horizons 3000 --staleness 2`): sync 1.2462, async
1.3272, 1.0650 for the same recipe and 1.102 against the best sync run; the warm-up-10 run at staleness 2 was
1.116 against the same sync (session 16), so at the simulator's bound the long warm-up is the better async
recipe. The calibration keeps the warm-up-10 ratios (one recipe for every bound). Warm-up 50 was not tried.

Session 20, why AdamW loses: on tiny, 300 synchronous steps then staleness 1, the train loss jumps by 0.2 within
10 steps of the switch (0.4 without the look-ahead) and stays 0.07 above sync; halving the lr at the switch cuts
the gap to 0.025: a delay lowers the step size AdamW tolerates. A synchronous start of 100 / 300 / 550 of 600
steps still left 1.0327 / 1.0206 / 1.0163 (the switch itself costs). Muon (`--optimizer muon`: torch's Muon on
the blocks' matrices, AdamW on embedding, head and norms; the spec's `optimizer`) tolerates it (as Zmushko et
al. 2026 report for a one-step delay). Tiny, 600 steps, ad-hoc script over the same functions: sync Muon 1.8719
/ 1.5875 / 1.5322 / 1.5617 at lr 1e-3 / 3e-3 / 1e-2 / 2e-2 (AdamW 1.8080 / 1.6802 / 1.8067 at 1e-3 / 3e-3 /
1e-2); async Muon lr 1e-2, staleness 1, look-ahead 0 / 0.5 / 1 / 1.5 / 2 / 2.5 / 3: 1.6320 / 1.6185 / 1.5522 /
1.5464 / 1.5384 / 1.5062 / 1.5364; staleness 2, look-ahead 1 / 1.5 / 2: 1.6129 / 1.5949 / 1.6184, so (S+1)/S
(the copy where the weights will be after the update its gradient makes); momentum 0.98 worse in both arms.
Bench model, `--optimizer muon --grid 1e-2:10 --horizons 3000 --staleness 1 --lookahead 2`: sync 1.2011, async
1.1904, **0.9911** (AdamW's best sync run is 1.2042, so within 2 % of the best sync of either optimiser);
`--staleness 2,3 --lookahead 1.5,1.3333`: 1.2176 (1.0138), 1.2366 (1.0296). One run each (2 workers, about
30 min a pair). The calibration's `async_loss` now holds these Muon ratios. At 1000 steps, look-ahead 1: sync
1.2941, async 1.3308 (1.0284).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from wan import BENCH_MODEL, VAL_SEED, VAL_WINDOWS  # noqa: E402  (the model and validation of benchmarks/wan.py)

from sharding import PRESETS, ModelConfig, OptimConfig  # noqa: E402
from sharding.optimconfig import OPTIMIZERS  # noqa: E402


def run(model: ModelConfig, arm: str, lr: float, warmup: int, steps: int, staleness: int, lookahead: float,
        microbatches: int, mb_size: int, corpus_name: str, grad_clip: float = 0.0,
        schedule: str = "constant", optimizer: str = "adamw") -> dict[str, Any]:
    """One training run; arm "sync" or "async". Returns its validation loss and a 25-step train-loss curve.

    schedule "cosine" decays the learning rate to `OptimConfig.min_lr_ratio` x lr over this run's `steps`."""
    import torch

    from sharding import OptimConfig, build_model, load_corpus, train_reference, validation_loss
    from sharding.delayed import train_delayed

    torch.set_num_threads(1)
    corpus = load_corpus(corpus_name)
    optim = OptimConfig(lr=lr, warmup_steps=warmup, grad_clip=grad_clip, schedule=schedule,
                        decay_steps=steps if schedule != "constant" else None, optimizer=optimizer)
    net = build_model(model)
    if arm == "sync":
        losses = train_reference(model, optim, steps, microbatches, mb_size, corpus, model=net)
    else:
        losses = train_delayed(model, optim, steps, microbatches, mb_size, corpus, staleness, model=net,
                               lookahead=lookahead)
    val = validation_loss(net, corpus, model.seq_len, VAL_WINDOWS, seed=VAL_SEED)
    curve = [sum(losses[i:i + 25]) / len(losses[i:i + 25]) for i in range(0, len(losses), 25)]
    return {"val_loss": val, "curve": curve}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model, 30 steps, one recipe")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (default 300, quick 30)")
    p.add_argument("--grid", default=None, help="recipes as lr:warmup,... (default 1e-3:10,1e-3:100,5e-4:10)")
    p.add_argument("--staleness", default="1",
                   help="async: steps a gradient is late; comma-separated for one async arm per bound (the first "
                        "is the headline's)")
    p.add_argument("--lookahead", default=None,
                   help="async look-ahead (training.async_lookahead; default: the runner's): one value, or one per "
                        "--staleness bound, comma-separated")
    p.add_argument("--grad-clip", type=float, default=0.0,
                   help="global-norm clipping in both arms (what recipe.grad_clip runs); 0 = off")
    p.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                   help="learning rate after the warm-up: constant, or cosine decay to "
                        f"{OptimConfig.min_lr_ratio:g} x lr (OptimConfig.min_lr_ratio) over each run's horizon (both arms)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw",
                   help="both arms: adamw, or muon (Muon on the blocks' matrices, AdamW on the rest; recipe.optimizer)")
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--microbatch-size", type=int, default=4)
    p.add_argument("--corpus", default="stdlib")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--model", choices=("bench", "tiny"), default=None,
                   help="bench: benchmarks/wan.py's model (default); tiny: the tests' model (default with --quick)")
    p.add_argument("--horizons", default="",
                   help="comma-separated step counts: train every recipe at each (adds loss_ratio_by_steps)")
    a = p.parse_args()
    from sharding.delayed import ASYNC_LOOKAHEAD

    model = PRESETS["tiny"] if (a.model or ("tiny" if a.quick else "bench")) == "tiny" else BENCH_MODEL
    horizons = sorted({int(h) for h in a.horizons.split(",") if h.strip()})
    if any(h <= 0 for h in horizons):
        p.error(f"--horizons {a.horizons!r}: every horizon must be a positive step count")
    bounds = list(dict.fromkeys(int(s) for s in a.staleness.split(",") if s.strip()))
    if not bounds or any(b < 1 for b in bounds):
        p.error(f"--staleness {a.staleness!r}: every bound must be an integer >= 1")
    staleness = bounds[0]
    arms = [0] + bounds  # the staleness of each arm: 0 is the sync run
    steps = horizons[-1] if horizons else (a.steps or (30 if a.quick else 300))
    grid_text = a.grid or ("1e-3:10" if a.quick else "1e-3:10,1e-3:100,5e-4:10")
    grid = [(float(lr), int(wu)) for lr, wu in (item.split(":") for item in grid_text.split(","))]
    try:
        given = [float(x) for x in a.lookahead.split(",")] if a.lookahead is not None else [ASYNC_LOOKAHEAD]
    except ValueError:
        p.error(f"--lookahead {a.lookahead!r}: give numbers, comma-separated")
    if len(given) not in (1, len(bounds)) or not all(0 <= x <= 8 for x in given):
        p.error(f"--lookahead {a.lookahead!r}: one value from 0 to 8, or one per --staleness bound ({len(bounds)})")
    lookaheads = {b: given[i] if len(given) > 1 else given[0] for i, b in enumerate(bounds)}
    lookahead = lookaheads[staleness]  # the headline's
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=a.workers, mp_context=ctx) as pool:
        # longest runs first, so that the workers finish together
        jobs = sorted(((arm, lr, wu, n) for n in horizons or [steps] for lr, wu in grid for arm in arms),
                      key=lambda job: -job[3])
        futures = {(b, lr, wu, n): pool.submit(run, model, "async" if b else "sync", lr, wu, n, b, lookaheads.get(b, 0.0),
                                               a.microbatches, a.microbatch_size, a.corpus, a.grad_clip,
                                               a.schedule, a.optimizer)
                   for b, lr, wu, n in jobs}
        by_run = {key: f.result() for key, f in futures.items()}
    results = {("async" if b else "sync", lr, wu): r for (b, lr, wu, n), r in by_run.items()
               if n == steps and b in (0, staleness)}  # the headline runs
    print(f"model d{model.d_model} x{model.n_layers}, {steps} steps of {a.microbatches} x {a.microbatch_size} "
          f"windows of {model.seq_len}, staleness {staleness}, look-ahead "
          f"{', '.join(f'{x:g} (bound {b})' for b, x in lookaheads.items())}, grad clip {a.grad_clip:g}, "
          f"lr schedule {a.schedule}, optimizer {a.optimizer}, "
          f"corpus {a.corpus}")
    print(f"{'lr':>8} {'warmup':>6} {'sync val':>9} {'async val':>9} {'ratio':>7}")
    same: dict[str, float] = {}
    for lr, wu in grid:
        s, d = results[("sync", lr, wu)]["val_loss"], results[("async", lr, wu)]["val_loss"]
        same[f"{lr:g}:{wu}"] = d / s
        print(f"{lr:>8g} {wu:>6} {s:>9.4f} {d:>9.4f} {d / s:>7.4f}")
    best_sync = min(results[("sync", lr, wu)]["val_loss"] for lr, wu in grid)
    best_async = min(results[("async", lr, wu)]["val_loss"] for lr, wu in grid)
    print(f"each arm at its best recipe: sync {best_sync:.4f}, async {best_async:.4f}, "
          f"ratio {best_async / best_sync:.4f}")
    by_steps: dict[str, dict[str, float]] = {}
    if horizons:
        print(f"by horizon (same recipe, equal tokens within each horizon):\n{'steps':>6} {'lr':>8} {'warmup':>6} "
              f"{'sync val':>9} {'async val':>9} {'ratio':>7}")
        for n in horizons:
            for lr, wu in grid:
                s, d = by_run[(0, lr, wu, n)]["val_loss"], by_run[(staleness, lr, wu, n)]["val_loss"]
                by_steps.setdefault(str(n), {})[f"{lr:g}:{wu}"] = d / s
                print(f"{n:>6} {lr:>8g} {wu:>6} {s:>9.4f} {d:>9.4f} {d / s:>7.4f}")
    by_bound: dict[str, dict[str, dict[str, float]]] = {}
    if len(bounds) > 1:
        print(f"by staleness bound (same recipe, equal tokens within each horizon):\n{'bound':>5} {'steps':>6} "
              f"{'lr':>8} {'warmup':>6} {'sync val':>9} {'async val':>9} {'ratio':>7}")
        for b in bounds:
            for n in horizons or [steps]:
                for lr, wu in grid:
                    s, d = by_run[(0, lr, wu, n)]["val_loss"], by_run[(b, lr, wu, n)]["val_loss"]
                    by_bound.setdefault(str(b), {}).setdefault(str(n), {})[f"{lr:g}:{wu}"] = d / s
                    print(f"{b:>5} {n:>6} {lr:>8g} {wu:>6} {s:>9.4f} {d:>9.4f} {d / s:>7.4f}")
    print(json.dumps({"loss_ratio_same_recipe": same, "loss_ratio_tuned": best_async / best_sync,
                      "loss_ratio_by_steps": by_steps, "loss_ratio_by_staleness": by_bound,
                      "val_loss_best_sync": best_sync, "val_loss_best_async": best_async,
                      "curves": {f"{arm}:{lr:g}:{wu}": [round(x, 3) for x in r["curve"]]
                                 for (arm, lr, wu), r in results.items()},
                      "steps": steps, "staleness": staleness, "lookahead": lookahead,
                      "lookahead_by_staleness": {str(b): x for b, x in lookaheads.items()}, "grad_clip": a.grad_clip,
                      "schedule": a.schedule, "optimizer": a.optimizer, "model": model.to_dict(),
                      "grid": grid_text}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
