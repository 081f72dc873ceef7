"""Timestamped trace of a real node process: `python -m simulations.node_trace <node.daemon args>`.

Wraps (at run time, without changing `node/`) the stage worker's forward/backward/decode/step, the
channel's data sends, frame accepts and acks, the runtime's step and the checkpoint save, then runs
`node.cli.main` (what `python -m node.daemon` runs). Every interval is written to `<data-dir>/trace.jsonl` as one JSON object:
`{"ev", "stage", "step", "mb", "t0", "t1", "cpu"}` with t0/t1 from the host-wide monotonic clock
(comparable across the swarm's processes) and cpu the calling thread's CPU seconds (for "step": the
whole process's CPU seconds during the step). The trace is
what `simulations.runtime_cal` turns into the runtime inputs of the simulation.
"""

from __future__ import annotations

import atexit
import functools
import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

_EVENTS: list[dict[str, Any]] = []
_LOCK = threading.Lock()
_STATE: dict[str, Any] = {"path": None, "stage": -1}
TRACE_NAME = "trace.jsonl"


def _record(ev: str, step: int, mb: int, t0: float, t1: float, cpu: float, **extra: Any) -> None:
    row = {"ev": ev, "stage": _STATE["stage"], "step": step, "mb": mb, "t0": t0, "t1": t1, "cpu": cpu, **extra}
    with _LOCK:
        _EVENTS.append(row)


def flush() -> None:
    """Append the buffered events to the trace file."""
    path = _STATE["path"]
    with _LOCK:
        rows, _EVENTS[:] = list(_EVENTS), []
    if path is None or not rows:
        return
    with open(path, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def _timed_sync(ev: str, key: Callable[..., tuple[int, int]]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            c0, t0 = time.thread_time(), time.monotonic()
            try:
                return fn(*args, **kwargs)
            finally:
                step, mb = key(*args, **kwargs)
                _record(ev, step, mb, t0, time.monotonic(), time.thread_time() - c0)
        return wrapper
    return deco


def _timed_async(ev: str, key: Callable[..., tuple[int, int]]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.monotonic()
            try:
                return await fn(*args, **kwargs)
            finally:
                step, mb = key(*args, **kwargs)
                _record(ev, step, mb, t0, time.monotonic(), 0.0)
        return wrapper
    return deco


def _frame_key(self: Any, fr: Any, *_: Any, **__: Any) -> tuple[int, int]:
    return int(fr.header.step), int(fr.header.microbatch)


def install(data_dir: str | Path) -> None:
    """Patch the node classes so that their work is traced into `<data_dir>/trace.jsonl`."""
    from node.pipeline import runner, runtime
    from node.training import worker
    from node.wire import channel

    path = Path(data_dir).expanduser() / TRACE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    _STATE["path"] = path
    _record("process_start", -1, -1, time.monotonic(), time.monotonic(), 0.0, wall=time.time())
    sw = worker.StageWorker
    orig_init = sw.__init__

    @functools.wraps(orig_init)
    def init(self: Any, config: Any, spec: Any, *args: Any, **kwargs: Any) -> None:
        orig_init(self, config, spec, *args, **kwargs)
        _STATE["stage"] = int(spec.index)
        _record("worker_built", -1, -1, time.monotonic(), time.monotonic(), 0.0)

    sw.__init__ = init  # type: ignore[method-assign]
    sw.forward = _timed_sync("fwd", lambda self, step, mb, *a, **k: (step, mb))(sw.forward)  # type: ignore[method-assign]
    sw.backward = _timed_sync("bwd", lambda self, step, mb, *a, **k: (step, mb))(sw.backward)  # type: ignore[method-assign]
    sw.step = _timed_sync("opt", lambda self, step, *a, **k: (step, -1))(sw.step)  # type: ignore[method-assign]
    sw.decode = _timed_sync("decode", _frame_key)(sw.decode)  # type: ignore[method-assign]
    sw.head_window = _timed_sync("window", lambda self, step, mb, *a, **k: (step, mb))(sw.head_window)  # type: ignore[method-assign]
    ch = channel.ActChannel
    ch.send_data = _timed_async("send", lambda self, kind, step, mb, *a, **k: (step, mb))(ch.send_data)  # type: ignore[method-assign]
    ch._accept_data = _timed_async("accept", _frame_key)(ch._accept_data)  # type: ignore[method-assign]
    ch._on_ack = _timed_async("ack", _frame_key)(ch._on_ack)  # type: ignore[method-assign]
    ch.handshake = _timed_async("handshake", lambda self, *a, **k: (-1, -1))(ch.handshake)  # type: ignore[method-assign]
    rt = runtime.PipelineRuntime
    orig_step = rt.run_step

    @functools.wraps(orig_step)
    async def run_step(self: Any, step: int) -> Any:
        t0, c0 = time.monotonic(), time.process_time()
        try:
            return await orig_step(self, step)
        finally:
            # cpu of a "step" event: the whole process's CPU seconds during the step (all threads)
            _record("step", step, -1, t0, time.monotonic(), time.process_time() - c0)
            flush()

    rt.run_step = run_step  # type: ignore[method-assign]
    runner.save_checkpoint = _timed_sync("checkpoint", lambda *a, **k: (-1, -1))(runner.save_checkpoint)
    atexit.register(flush)


def main(argv: list[str] | None = None) -> int:
    """Install the tracer for the `--data-dir` in argv, then run the node daemon with argv."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--data-dir" not in args:
        raise SystemExit("simulations.node_trace needs --data-dir DIR (the trace goes to DIR/trace.jsonl)")
    install(args[args.index("--data-dir") + 1])
    from node.cli import main as daemon_main

    try:
        return daemon_main(args)
    finally:
        flush()


if __name__ == "__main__":
    sys.exit(main())
