"""Run a real local swarm (node processes over libp2p on 127.0.0.1), optionally traced, and read it back.

Uses `node.testing.swarm.run_local_swarm` as it is; with `trace=True` every node process is started through
`simulations.node_trace` (same daemon, same arguments) so that its compute and frame events land in
`<data-dir>/trace.jsonl`.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ValidationDataError
from .node_trace import TRACE_NAME


@dataclass(frozen=True)
class SwarmSpec:
    """One real swarm run (the same knobs as `benchmarks/pipeline.py`)."""

    stages: int  # pipeline stages (one node process each)
    microbatches: int  # microbatches per step
    microbatch_size: int  # sequences per microbatch
    steps: int  # global steps (the first `warmup` are excluded from throughput)
    model: str = "tiny"  # preset name or path to a JSON ModelConfig
    codec: str = "dense"  # boundary codec
    threads: int = 1  # torch threads per node process
    warmup: int = 1  # leading steps excluded from the measured throughput
    corpus: str | None = "synthetic"  # sharding.load_corpus source
    checkpoint_every: int = 0  # node --checkpoint-every (0 = only at shutdown)

    def validate(self) -> SwarmSpec:
        """Raise ValueError naming the bad field; return self."""
        for name in ("stages", "microbatches", "microbatch_size", "threads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"SwarmSpec.{name}={v!r}: must be an integer >= 1")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"SwarmSpec.warmup={self.warmup!r}: must be an integer >= 0")
        if not isinstance(self.steps, int) or self.steps < self.warmup + 2:
            raise ValueError(f"SwarmSpec.steps={self.steps!r}: must be >= warmup + 2 = {self.warmup + 2}")
        return self


@dataclass
class SwarmRun:
    """What one real run produced."""

    spec: SwarmSpec  # what was run
    progress: dict[int, list[dict[str, Any]]]  # stage -> per-step progress records
    traces: dict[int, list[dict[str, Any]]] = field(default_factory=dict)  # stage -> trace events (traced runs)
    wall_s: float = 0.0  # launcher wall seconds (start-up included)
    load: dict[str, Any] = field(default_factory=dict)  # LoadSampler.result() over the measured window

    def tokens_per_s(self) -> float:
        """Tail tokens per second between the end of step warmup-1 and the last step (benchmarks/pipeline.py)."""
        recs = sorted(self.progress[self.spec.stages - 1], key=lambda r: int(r["step"]))
        w = self.spec.warmup
        if len(recs) < w + 2:
            raise ValidationDataError(f"the swarm completed {len(recs)} steps; need at least {w + 2}")
        window = recs[w - 1:] if w > 0 else recs
        span = float(window[-1]["end_time"]) - float(window[0]["end_time"])
        if span <= 0:
            raise ValidationDataError("the swarm's step end times do not increase")
        return sum(int(r["tokens"]) for r in window[1:]) / span

    def measured_window(self) -> tuple[float, float]:
        """Wall-clock span over which tokens_per_s is measured (tail step end times)."""
        recs = sorted(self.progress[self.spec.stages - 1], key=lambda r: int(r["step"]))
        w = self.spec.warmup
        first = recs[w - 1] if w > 0 else recs[0]
        return float(first["end_time"]), float(recs[-1]["end_time"])

    def step_s(self) -> float:
        """Mean tail seconds per step over the measured window."""
        tokens = int(self.progress[self.spec.stages - 1][0]["tokens"])
        return tokens / self.tokens_per_s()


@contextlib.contextmanager
def _traced_commands() -> Iterator[None]:
    import node.testing.swarm as swarm

    original = swarm.node_command

    def command(stage: int | str, data_dir: Path, args: list[str]) -> list[str]:
        cmd = original(stage, data_dir, args)
        i = cmd.index("node.daemon")
        return [sys.executable, "-m", "simulations.node_trace", *cmd[i + 1:]]

    swarm.node_command = command
    try:
        yield
    finally:
        swarm.node_command = original


def waterfill(capacity: float, demands: list[float]) -> list[float]:
    """Max-min fair split of `capacity` among `demands` (each gets at most its demand)."""
    out = [0.0] * len(demands)
    left = capacity
    order = sorted(range(len(demands)), key=lambda i: demands[i])
    for k, i in enumerate(order):
        share = left / (len(order) - k)
        out[i] = min(demands[i], share)
        left -= out[i]
    return out


def granted_cores(cores: float, busy: int, others: list[list[int]]) -> float:
    """Mean cores a session group with `busy` runnable threads gets next to the sampled runnable-thread
    counts of the host's other groups (one list per sample), under group-fair (autogroup) scheduling."""
    if busy < 1:
        raise ValueError(f"busy={busy!r}: must be >= 1")
    if not others:
        return min(float(busy), cores)
    return statistics.mean(waterfill(cores, [float(busy), *map(float, sample)])[0] for sample in others)


class LoadSampler:
    """Samples, while a swarm runs, the host's runnable threads per scheduling group (Linux autogroup,
    /proc/<pid>/autogroup; all of our node processes share our session's group) and keeps the other
    groups' counts: the host's other load as the scheduler sees it. A measurement of the environment,
    not of the run's progress; about 1-3 ms of CPU per sample."""

    def __init__(self, interval_s: float = 0.1) -> None:
        self.interval_s = interval_s  # seconds between samples
        self.others: list[list[int]] = []  # per sample: runnable threads of every other active group
        self.own: list[int] = []  # per sample: runnable threads in our group (the sampler excluded)
        self.times: list[float] = []  # per sample: wall-clock time (time.time(), as progress end_time)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._group = self._autogroup(os.getpid())

    @staticmethod
    def _autogroup(pid: int | str) -> str:
        try:
            with open(f"/proc/{pid}/autogroup") as f:
                return f.read().split()[0]
        except (OSError, IndexError):  # gone, or no autogroup support: its own group
            return f"pid-{pid}"

    def sample(self) -> tuple[int, list[int]]:
        """(runnable threads in our group, runnable threads of each other active group) right now."""
        groups: dict[str, int] = {}
        me = threading.get_native_id()
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                tids = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            n = 0
            for tid in tids:
                try:
                    with open(f"/proc/{pid}/task/{tid}/stat") as f:
                        state = f.read().rsplit(")", 1)[1].split()[0]
                except (OSError, IndexError):
                    continue
                n += state == "R" and int(tid) != me
            if n:
                g = self._autogroup(pid)
                if not g.startswith("pid-") or os.path.exists(f"/proc/{pid}"):
                    groups[g] = groups.get(g, 0) + n
        own = groups.pop(self._group, 0)
        return own, list(groups.values())

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            own, others = self.sample()
            self.own.append(own)
            self.others.append(others)
            self.times.append(time.time())

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def result(self, window: tuple[float, float] | None = None) -> dict[str, Any]:
        """Means over the samples (those inside the wall-clock `window` when given), and the raw
        per-sample counts of the other groups."""
        keep = [i for i, t in enumerate(self.times) if window is None or window[0] <= t <= window[1]]
        own = [self.own[i] for i in keep]
        others = [self.others[i] for i in keep]
        n = len(keep)
        return {
            "samples": n,
            "window": list(window) if window else None,
            "own_running": statistics.mean(own) if n else 0.0,
            "other_running": statistics.mean(sum(o) for o in others) if n else 0.0,
            "other_groups": statistics.mean(len(o) for o in others) if n else 0.0,
            "others": [list(o) for o in others],
        }


def read_trace(path: Path) -> list[dict[str, Any]]:
    """Events of one node's trace file (empty when it has none)."""
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def run_swarm(spec: SwarmSpec, trace: bool = False, timeout_s: float = 600.0) -> SwarmRun:
    """Run the swarm once in a temporary directory, sampling the host's load; return its progress (and traces)."""
    from node.testing.swarm import run_local_swarm

    spec = spec.validate()
    with tempfile.TemporaryDirectory(prefix="pmn-sim-swarm-") as tmp:
        root = Path(tmp)
        model = spec.model
        if model.strip().startswith("{"):  # an inline JSON ModelConfig
            (root / "model.json").write_text(model)
            model = str(root / "model.json")
        t0 = time.monotonic()
        ctx = _traced_commands() if trace else contextlib.nullcontext()
        with ctx, LoadSampler() as sampler:
            res = run_local_swarm(
                spec.stages, spec.steps, root / "swarm", model=model, codec=spec.codec,
                microbatches=spec.microbatches, microbatch_size=spec.microbatch_size, corpus=spec.corpus,
                threads=[spec.threads] * spec.stages, timeout_s=timeout_s,
                extra_args=["--checkpoint-every", str(spec.checkpoint_every)],
            )
        wall = time.monotonic() - t0
        traces = {s: read_trace(root / "swarm" / f"node{s}" / TRACE_NAME) for s in range(spec.stages)} if trace else {}
    out = SwarmRun(spec=spec, progress=res.steps, traces=traces, wall_s=wall)
    # the host's other load while throughput is measured (start-up and warm-up steps left out)
    out.load = sampler.result(out.measured_window())
    out.load["whole_run"] = {k: v for k, v in sampler.result().items() if k != "others"}
    return out
