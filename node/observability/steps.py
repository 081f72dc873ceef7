"""What a node records about itself: the status file, one progress record per step, Prometheus metrics
and the live progress line, all fed from one `StepReport` whatever runner produced the step."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.observability.metrics import NodeMetrics
from node.observability.progress import ProgressLine
from node.observability.status import append_progress, write_status


@dataclass
class StepReport:
    """One completed global step of this node, as every runner reports it."""

    step: int  # global step index
    stage: int  # stage served during the step
    loss: float | None  # mean microbatch loss (tail stage only)
    tokens: int  # tokens processed in the step
    seconds: float  # wall time of the step
    comm_wait_s: float  # time spent waiting on the network
    bytes_in: int = 0  # activation-protocol bytes received during the step
    bytes_out: int = 0  # activation-protocol bytes sent during the step
    peers: int | None = None  # connected libp2p peers after the step (None = not reported)
    record: dict[str, Any] = field(default_factory=dict)  # runner-specific fields of the progress record
    status: dict[str, Any] = field(default_factory=dict)  # runner-specific fields of the status file

    @property
    def tokens_per_s(self) -> float:
        """Throughput of the step (0 for a step that took no time)."""
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


class NodeLog:
    """The status file (rewritten on every change), the progress file (one line per step), the metrics
    (once `serve_metrics` ran) and the progress line (inside `progress_line`)."""

    def __init__(self, data_dir: Path, extra_status: Callable[[], dict[str, Any]] | None = None) -> None:
        self.data_dir = data_dir
        self.state = "starting"  # starting, running, serving, finished, stopped, failed
        self.reports: list[StepReport] = []  # every step completed in this process, in order
        self.metrics: NodeMetrics | None = None
        self._extra_status = extra_status  # fields recomputed at every write (DHT counters)
        self._status: dict[str, Any] = {}
        self._line: ProgressLine | None = None

    def status(self, **changes: Any) -> None:
        """Merge `changes` into the status file, with the current state and time."""
        if self._extra_status is not None:
            changes.update(self._extra_status())
        self._status.update(changes, state=self.state, time=time.time())
        write_status(self.data_dir, self._status)

    def serve_metrics(self, stage: int, port: int) -> None:
        """Export Prometheus metrics of this node on `port` (127.0.0.1)."""
        self.metrics = NodeMetrics(stage)
        self.metrics.serve(port)

    @contextmanager
    def progress_line(self, show: bool, total: int, done: int, stage: int) -> Iterator[None]:
        """Within the block, each step redraws a live progress line on stderr (when `show`)."""
        self._line = ProgressLine(total, done, stage) if show else None
        try:
            yield
        finally:
            if self._line is not None:
                self._line.close()
            self._line = None

    def step(self, report: StepReport) -> None:
        """Record a completed step everywhere: progress file, status file, metrics, progress line."""
        self.reports.append(report)
        r, tok_s = report, report.tokens_per_s
        append_progress(self.data_dir, {
            "step": r.step, "stage": r.stage, "loss": r.loss, "tokens": r.tokens, "seconds": r.seconds,
            "tokens_per_s": tok_s, "comm_wait_s": r.comm_wait_s, "bytes_in": r.bytes_in, "bytes_out": r.bytes_out,
            "end_time": time.time(), **r.record})
        peers = {} if r.peers is None else {"peers": r.peers}
        self.status(step=r.step, next_step=r.step + 1, loss=r.loss, tokens_per_s=tok_s, **peers, **r.status)
        if self.metrics is not None:
            m = self.metrics
            m.tokens_per_s.set(tok_s)
            m.step.set(r.step)
            if r.loss is not None:
                m.loss.set(r.loss)
            m.bytes_in.inc(r.bytes_in)
            m.bytes_out.inc(r.bytes_out)
            if r.peers is not None:
                m.peers.set(r.peers)
            m.comm_fraction.set(r.comm_wait_s / r.seconds if r.seconds > 0 else 0.0)
        if self._line is not None:
            self._line.update(r.step, r.loss, r.tokens, r.seconds)
