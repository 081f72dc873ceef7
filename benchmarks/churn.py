"""Training throughput under churn: a replicated 3-stage swarm (2 replicas of the middle stage) on
127.0.0.1, once stable and once with middle replicas SIGKILLed and fresh ones joining at a given
period (the older replica is killed only once the newer one has caught up: killing the only holder of
a stage's newer state loses it). Prints a table; the last line is one JSON object.

    python benchmarks/churn.py [--quick] [--steps N] [--churn-period S] [--repeat N] [--load] [--keep-failed DIR]

--repeat N runs the churn run N times (the stable run once) and reports the worst one: most lost or duplicated
microbatches, then the lowest throughput. --load runs a CPU hog beside every run (stress-ng with one worker per
core, or one busy process per core without it), at this process's niceness.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.observability.status import read_progress  # noqa: E402
from node.testing.swarm import NodeProcess, await_ready, spawn_node, start_node, stop_nodes  # noqa: E402

M, B = 4, 2
READY_S = 180.0  # seconds a node may take to start (minutes on a loaded machine, with --load)


def _args(steps: int, delay: float) -> list[str]:
    return ["--stages", "3", "--steps", str(steps), "--replicated", "--microbatches", str(M), "--microbatch-size",
            str(B), "--corpus", "synthetic", "--threads", "1", "--replica-timeout", "3", "--ban-base", "1",
            "--ban-max", "4", "--avg-timeout", "5", "--commit-poll", "0.3", "--checkpoint-every", "0",
            "--debug-delay-s", str(delay), "--discovery-discovery-timeout-s", str(READY_S),
            # the head's first step waits for both middle replicas and the tail (a late one would get no work)
            "--replicas-start-quorum", "3"]


def _records(n: NodeProcess) -> dict[int, dict[str, Any]]:
    return {int(r["step"]): r for r in read_progress(n.data_dir)}


def _holds_state(recs: dict[int, dict[str, Any]], tail_newest: int) -> bool:
    """Whether a replica with these records holds every contribution its stage committed up to `tail_newest`."""
    newest = max(recs, default=-1)
    return newest >= tail_newest and any(recs[s]["mine"] for s in recs if s < newest)


def run(root: Path, steps: int, delay: float, churn_period: float, timeout_s: float) -> dict[str, Any]:
    """One run; churn_period 0 = stable. Returns tokens/s, final loss and the exactly-once counts."""
    args = _args(steps, delay)
    head = start_node(0, root / "head", args, READY_S)
    boot = ["--bootstrap", head.ready["addrs"][0]]
    rest = [spawn_node(s, root / name, args + boot) for s, name in ((1, "mid0"), (1, "mid1"), (2, "tail"))]
    nodes = [head, *rest]
    kills = joins = 0
    try:
        for n in rest:
            await_ready(n, READY_S)
        tail = rest[-1]
        mids = rest[:2]
        deadline = time.monotonic() + timeout_s
        next_churn = time.monotonic() + churn_period
        while tail.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
            if churn_period and time.monotonic() >= next_churn and len(_records(tail)) < steps - 2:
                live = [m for m in mids if m.proc.poll() is None]
                # kill the older one once the newer one holds the stage's state: its peers commit as sole holders
                # while it fetches the state (it pulls those contributions after), so it must have computed work of
                # its own in some step Y (a stage peer since before step Y+1: every later commit was pushed to it)
                # and applied every step after Y up to the tail's newest. Killing the only holder of a stage's newer
                # state loses it: the survivor drops what it cannot get (counted as lost), nothing rolls back
                if len(live) >= 2 and _holds_state(_records(live[-1]), max(_records(tail), default=0)):
                    live[0].proc.kill()
                    live[0].proc.wait()
                    kills += 1
                    fresh = spawn_node(1, root / f"mid{len(mids)}", args + boot)
                    nodes.append(fresh)
                    mids.append(fresh)
                    await_ready(fresh, READY_S)
                    joins += 1
                    next_churn = time.monotonic() + churn_period
        for n in nodes:
            if n.proc.poll() is None:
                try:
                    n.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
                except Exception:
                    break
    finally:
        stop_nodes(nodes)
    tail_recs = _records(tail)
    done = sorted(tail_recs)
    lost = dup = 0
    for group in ([head], mids, [tail]):
        recs = [_records(n) for n in group]
        for s in done:
            applied = [r[s]["applied"] for r in recs if s in r]
            if not applied:
                lost += M
                continue
            mbs = [mb for mb, _ in applied[0]]
            lost += len(set(range(M)) - set(mbs)) + len(recs_dropped(recs, s))
            dup += len(mbs) - len(set(mbs))
            mine = [tuple(x) for r in recs if s in r for x in r[s]["mine"]]
            dup += len(mine) - len(set(mine))
    span = tail_recs[done[-1]]["end_time"] - tail_recs[done[0]]["end_time"] if len(done) > 1 else 0.0
    tokens = sum(tail_recs[s]["tokens"] for s in done[1:])
    return {"steps_done": len(done), "tokens_per_s": tokens / span if span > 0 else 0.0,
            "final_loss": tail_recs[done[-1]]["loss"] if done else None, "kills": kills, "joins": joins,
            "lost_microbatches": lost, "duplicate_microbatches": dup,
            "losses": {s: tail_recs[s]["loss"] for s in done}}


@contextlib.contextmanager
def cpu_hog(on: bool) -> Iterator[None]:
    """While the block runs, one busy worker per core (stress-ng if installed, else busy Python processes)."""
    if not on:
        yield
        return
    if shutil.which("stress-ng"):
        procs = [subprocess.Popen(["stress-ng", "--cpu", "0", "--quiet"])]
    else:
        procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        yield
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def worst(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The worst run: most lost + duplicated microbatches, then fewest steps done (a run whose tail stopped early),
    then fewest tokens/s."""
    return max(runs, key=lambda r: (r["lost_microbatches"] + r["duplicate_microbatches"], -r["steps_done"],
                                    -r["tokens_per_s"]))


def recs_dropped(recs: list[dict[int, dict[str, Any]]], step: int) -> set[int]:
    """Committed microbatches some replica could not combine at `step`."""
    return {mb for r in recs if step in r for mb in r[step]["dropped"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short runs (< 60 s)")
    p.add_argument("--steps", type=int, default=None, help="global steps per run")
    p.add_argument("--churn-period", type=float, default=None, help="seconds between kill+join events")
    p.add_argument("--delay", type=float, default=0.02, help="per-microbatch debug delay (slows the tiny model)")
    p.add_argument("--repeat", type=int, default=1, help="churn runs; the worst one is reported")
    p.add_argument("--load", action="store_true", help="a CPU hog (one worker per core) beside every run")
    p.add_argument("--timeout", type=float, default=None, help="seconds allowed per run (default 25 quick, 600)")
    p.add_argument("--keep-failed", type=Path, default=None,
                   help="copy the node data dirs of every run that lost or doubled a microbatch here")
    a = p.parse_args(argv)
    if a.repeat < 1:
        p.error("--repeat must be >= 1")
    steps = a.steps or (30 if a.quick else 120)
    period = a.churn_period or (3.0 if a.quick else 6.0)
    limit = a.timeout or (25 if a.quick else 600)
    root = Path(tempfile.mkdtemp(prefix="pmn-churn-"))
    runs: list[dict[str, Any]] = []
    try:
        with cpu_hog(a.load):
            stable = run(root / "stable", steps, a.delay, 0.0, limit)
            for i in range(a.repeat):
                runs.append(run(root / f"churn{i}", steps, a.delay, period, limit))
                if a.keep_failed is not None and runs[-1]["lost_microbatches"] + runs[-1]["duplicate_microbatches"]:
                    shutil.copytree(root / f"churn{i}", a.keep_failed / f"churn{i}", dirs_exist_ok=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    churn = worst(runs)
    print(f"{'run':8} {'steps':>5} {'tok/s':>9} {'final loss':>10} {'kills':>5} {'joins':>5} {'lost':>4} {'dup':>4}")
    named = [("stable", stable)] + [(f"churn{i}" if len(runs) > 1 else "churn", r) for i, r in enumerate(runs)]
    for name, r in named:
        loss = f"{r['final_loss']:.4f}" if r["final_loss"] is not None else "-"
        print(f"{name:8} {r['steps_done']:>5} {r['tokens_per_s']:>9.0f} {loss:>10} {r['kills']:>5} {r['joins']:>5} "
              f"{r['lost_microbatches']:>4} {r['duplicate_microbatches']:>4}")
    ratio = churn["tokens_per_s"] / stable["tokens_per_s"] if stable["tokens_per_s"] else 0.0
    common = sorted(set(stable["losses"]) & set(churn["losses"]))
    at = common[-1] if common else -1
    if common:
        print(f"loss at step {at} (both runs): stable {stable['losses'][at]:.6f}, churn {churn['losses'][at]:.6f}")
    print(json.dumps({"tokens_per_s_churn": churn["tokens_per_s"], "tokens_per_s_stable": stable["tokens_per_s"],
                      "ratio": ratio, "lost_microbatches": churn["lost_microbatches"],
                      "duplicate_microbatches": churn["duplicate_microbatches"],
                      "final_loss_churn": churn["final_loss"], "final_loss_stable": stable["final_loss"],
                      "loss_step": at, "loss_at_step_stable": stable["losses"].get(at),
                      "loss_at_step_churn": churn["losses"].get(at),
                      "steps": steps, "churn_period_s": period, "kills": churn["kills"], "joins": churn["joins"],
                      "stable_lost_microbatches": stable["lost_microbatches"], "repeat": a.repeat, "load": a.load,
                      "runs": [{k: r[k] for k in ("steps_done", "tokens_per_s", "lost_microbatches",
                                                  "duplicate_microbatches", "kills", "joins")} for r in runs],
                      "lost_microbatches_total": sum(r["lost_microbatches"] for r in runs),
                      "duplicate_microbatches_total": sum(r["duplicate_microbatches"] for r in runs),
                      "short_runs": sum(r["steps_done"] < steps for r in runs)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
