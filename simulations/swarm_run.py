"""Run a real local swarm (node processes over libp2p on 127.0.0.1), optionally traced, and read it back.

Uses `node.swarm.run_local_swarm` as it is; with `trace=True` every node process is started through
`simulations.node_trace` (same daemon, same arguments) so that its compute and frame events land in
`<data-dir>/trace.jsonl`.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
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

    def step_s(self) -> float:
        """Mean tail seconds per step over the measured window."""
        tokens = int(self.progress[self.spec.stages - 1][0]["tokens"])
        return tokens / self.tokens_per_s()


@contextlib.contextmanager
def _traced_commands() -> Iterator[None]:
    import node.swarm as swarm

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


def read_trace(path: Path) -> list[dict[str, Any]]:
    """Events of one node's trace file (empty when it has none)."""
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def run_swarm(spec: SwarmSpec, trace: bool = False, timeout_s: float = 600.0) -> SwarmRun:
    """Run the swarm once in a temporary directory; return its progress (and traces)."""
    import time

    from node.swarm import run_local_swarm

    spec = spec.validate()
    with tempfile.TemporaryDirectory(prefix="pmn-sim-swarm-") as tmp:
        root = Path(tmp)
        model = spec.model
        if model.strip().startswith("{"):  # an inline JSON ModelConfig
            (root / "model.json").write_text(model)
            model = str(root / "model.json")
        t0 = time.monotonic()
        ctx = _traced_commands() if trace else contextlib.nullcontext()
        with ctx:
            res = run_local_swarm(
                spec.stages, spec.steps, root / "swarm", model=model, codec=spec.codec,
                microbatches=spec.microbatches, microbatch_size=spec.microbatch_size, corpus=spec.corpus,
                threads=[spec.threads] * spec.stages, timeout_s=timeout_s,
                extra_args=["--checkpoint-every", str(spec.checkpoint_every)],
            )
        wall = time.monotonic() - t0
        traces = {s: read_trace(root / "swarm" / f"node{s}" / TRACE_NAME) for s in range(spec.stages)} if trace else {}
    return SwarmRun(spec=spec, progress=res.steps, traces=traces, wall_s=wall)
