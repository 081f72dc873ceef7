"""Measure per-stage step times by running the real `sharding` stage code, and store them as JSON.

A calibration holds, per stage of a partitioned model: forward seconds per microbatch (stage
forward plus encoding its output and decoding its input with the real codec), backward seconds
(stage backward plus the gradient codec), optimizer-step seconds, and FLOPs per token from
`sharding.flops`. `effective_flops_per_s` (FLOPs done / seconds spent) lets the WAN presets scale
these measurements to other widths and devices.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import CalibrationError

CALIBRATION_VERSION = 1
DEFAULT_PATH = Path(__file__).with_name("calibration.json")


@dataclass(frozen=True)
class CalibrationConfig:
    """What to measure and how often."""

    model: str = "tiny"  # sharding.config.PRESETS name, or a ModelConfig as inline JSON or a JSON file path
    num_stages: int = 2  # stages to partition it into
    microbatch_size: int = 4  # sequences per microbatch (tokens = microbatch_size x seq_len)
    codec: str = "dense"  # boundary codec whose encode/decode time is included
    warmup: int = 2  # untimed repetitions per stage before measuring
    repeats: int = 7  # timed repetitions per stage; the median is stored
    threads: int = 1  # torch intra-op threads while measuring (restored afterwards)
    seed: int = 0  # seed of the random inputs

    def validate(self) -> CalibrationConfig:
        """Raise ValueError naming the bad field; return self."""
        for name in ("num_stages", "microbatch_size", "repeats", "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CalibrationConfig.{name}={value!r}: must be an integer >= 1")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"CalibrationConfig.warmup={self.warmup!r}: must be an integer >= 0")
        model_config(self.model)
        return self


def model_config(model: str) -> Any:
    """The ModelConfig named by a preset, an inline JSON object or a JSON file (ValueError names the choices)."""
    from sharding.config import PRESETS, ModelConfig

    if model in PRESETS:
        return PRESETS[model]
    text = model.strip()
    if not text.startswith("{") and Path(text).expanduser().is_file():
        text = Path(text).expanduser().read_text()
    if text.startswith("{"):
        try:
            return ModelConfig.from_dict(json.loads(text)).validate()
        except (ValueError, TypeError) as exc:
            raise ValueError(f"CalibrationConfig.model: bad ModelConfig JSON: {exc}") from exc
    raise ValueError(
        f"CalibrationConfig.model={model!r}: use one of {sorted(PRESETS)}, a ModelConfig JSON object or a JSON file"
    )


def _fwd_bwd_times(forward: Any, backward: Any, cal: CalibrationConfig) -> dict[str, float]:
    """Median forward and backward seconds (each timed on its own), wall and this thread's CPU, and
    the first repetition's forward + backward wall seconds (the cold start: allocator, kernels, caches)."""
    rows: dict[str, list[float]] = {"fwd_s": [], "bwd_s": [], "fwd_cpu_s": [], "bwd_cpu_s": []}
    first = 0.0
    for i in range(cal.warmup + cal.repeats):
        c0, t0 = time.thread_time(), time.perf_counter()
        forward()
        c1, t1 = time.thread_time(), time.perf_counter()
        backward()
        c2, t2 = time.thread_time(), time.perf_counter()
        if i == 0:
            first = t2 - t0
        if i >= cal.warmup:
            rows["fwd_s"].append(t1 - t0)
            rows["bwd_s"].append(t2 - t1)
            rows["fwd_cpu_s"].append(c1 - c0)
            rows["bwd_cpu_s"].append(c2 - c1)
    out = {k: float(statistics.median(v)) for k, v in rows.items()}
    out["first_fwd_bwd_s"] = first
    return out


def _opt_time(stage: torch.nn.Module, step: Any, cal: CalibrationConfig) -> tuple[float, float]:
    """Median optimizer-step wall and CPU seconds, with fresh gradients on every parameter before each step."""
    wall, cpu = [], []
    for i in range(cal.warmup + cal.repeats):
        for p in stage.parameters():
            if p.requires_grad:
                p.grad = torch.full_like(p, 1e-4)
        c0, t0 = time.thread_time(), time.perf_counter()
        step()
        if i >= cal.warmup:
            wall.append(time.perf_counter() - t0)
            cpu.append(time.thread_time() - c0)
    return float(statistics.median(wall)), float(statistics.median(cpu))


@dataclass
class StageOps:
    """The real work of one stage per microbatch, as closures over one built stage."""

    spec: Any  # sharding StageSpec
    stage: torch.nn.Module  # the built stage
    forward: Any  # () -> None: (decode input,) stage forward (tail: with loss), encode output
    backward: Any  # () -> None: stage backward (decode incoming gradient), encode the input gradient
    opt_step: Any  # () -> None: one optimizer step (needs gradients on the parameters)


def stage_ops(cal: CalibrationConfig, indices: list[int] | None = None) -> list[StageOps]:
    """Build the stages of `cal.model` (all, or `indices`) with their per-microbatch work as closures."""
    from sharding.codecs import get_codec
    from sharding.partition import partition
    from sharding.stage import build_stage
    from sharding.train import OptimConfig, make_optimizer, optimizer_step

    config = model_config(cal.model)
    specs = partition(config, cal.num_stages)
    codec = get_codec(cal.codec, config)
    optim = OptimConfig()
    gen = torch.Generator().manual_seed(cal.seed)
    b, t, d = cal.microbatch_size, config.seq_len, config.d_model
    window = torch.randint(0, config.vocab_size, (b, t + 1), generator=gen)
    ids, targets = window[:, :-1], window[:, 1:]
    h_in = torch.randn(b, t, d, generator=gen)
    if config.is_subspace:  # a realistic boundary state: decode(encode(h)) lies in E_fixed[ids] + span(U)
        h_in = codec.decode_activation(codec.encode_activation(h_in, ids), ids)
    grad_out = torch.randn(b, t, d, generator=gen) * 1e-3
    out = []
    for spec in specs:
        if indices is not None and spec.index not in indices:
            continue
        stage = build_stage(config, spec)
        opt = make_optimizer(stage, optim)
        state: dict[str, Any] = {}

        def forward(stage: Any = stage, spec: Any = spec, state: dict[str, Any] = state) -> None:
            h = None
            if not spec.has_embedding:
                h = codec.decode_activation(codec.encode_activation(h_in, ids), ids).requires_grad_(True)
            out = stage(ids, h, targets if spec.has_lm_head else None)
            if not spec.has_lm_head:
                codec.encode_activation(out.detach(), ids)
            state["out"], state["h"] = out, h

        def backward(spec: Any = spec, state: dict[str, Any] = state) -> None:
            out, h = state.pop("out"), state.pop("h")
            if spec.has_lm_head:
                out.backward()
            else:
                out.backward(codec.decode_gradient(codec.encode_gradient(grad_out, ids), ids))
            if h is not None and h.grad is not None:
                codec.encode_gradient(h.grad, ids)

        def opt_step(stage: Any = stage, opt: Any = opt) -> None:
            optimizer_step(stage, opt, 0, optim)

        out.append(StageOps(spec, stage, forward, backward, opt_step))
    return out


def measure_stages(cal: CalibrationConfig) -> list[dict[str, Any]]:
    """Time forward, backward and optimizer step of every stage of `cal.model` (real stage code)."""
    from sharding.flops import stage_flops_per_token

    config = model_config(cal.model)
    out_rows = []
    for ops in stage_ops(cal):
        spec = ops.spec
        times = _fwd_bwd_times(ops.forward, ops.backward, cal)
        opt_s, opt_cpu_s = _opt_time(ops.stage, ops.opt_step, cal)
        out_rows.append(
            {
                "index": spec.index,
                "block_start": spec.block_start,
                "block_end": spec.block_end,
                "fwd_s": times["fwd_s"],  # wall seconds (the host's other load included)
                "bwd_s": times["bwd_s"],
                "opt_s": opt_s,
                "fwd_cpu_s": times["fwd_cpu_s"],  # this thread's CPU seconds (the work itself)
                "bwd_cpu_s": times["bwd_cpu_s"],
                "opt_cpu_s": opt_cpu_s,
                "first_fwd_bwd_s": times["first_fwd_bwd_s"],  # cold first repetition, wall seconds
                "flops_per_token": stage_flops_per_token(config, spec),
            }
        )
    return out_rows


def calibrate(
    cal: CalibrationConfig | None = None, out_path: str | Path | None = DEFAULT_PATH
) -> dict[str, Any]:
    """Measure every stage of `cal.model` here and write the calibration JSON to `out_path` (None: don't)."""
    cal = (cal or CalibrationConfig()).validate()
    from sharding.codecs import get_codec, token_id_bytes

    config = model_config(cal.model)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(cal.threads)
    try:
        stages = measure_stages(cal)
    finally:
        torch.set_num_threads(old_threads)
    tokens = cal.microbatch_size * config.seq_len
    flops = sum(s["flops_per_token"] for s in stages) * tokens
    seconds = sum(s["fwd_s"] + s["bwd_s"] for s in stages)
    data = {
        "version": CALIBRATION_VERSION,
        "calibration": asdict(cal),
        "model_config": config.to_dict(),
        "tokens_per_microbatch": tokens,
        "codec_bytes_per_token": get_codec(cal.codec, config).bytes_per_token,
        "token_id_bytes": token_id_bytes(config),
        "stages": stages,
        "effective_flops_per_s": flops / seconds if seconds > 0 else 0.0,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "measured_at_unix": int(time.time()),
    }
    check_calibration(data)
    if out_path is not None:
        path = Path(out_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return data


def check_calibration(data: Any) -> dict[str, Any]:
    """Raise CalibrationError naming the first missing or bad field; return `data`."""
    if not isinstance(data, dict):
        raise CalibrationError(f"calibration must be a JSON object, got {type(data).__name__}")
    if data.get("version") != CALIBRATION_VERSION:
        raise CalibrationError(
            f"calibration version {data.get('version')!r} != {CALIBRATION_VERSION}: re-run simulations.calibrate"
        )
    for key in ("stages", "tokens_per_microbatch", "effective_flops_per_s", "model_config", "calibration"):
        if key not in data:
            raise CalibrationError(f"calibration lacks {key!r}: re-run simulations.calibrate")
    stages = data["stages"]
    if not isinstance(stages, list) or not stages:
        raise CalibrationError("calibration 'stages' must be a non-empty list")
    for i, row in enumerate(stages):
        for key in ("fwd_s", "bwd_s", "opt_s", "flops_per_token"):
            value = row.get(key) if isinstance(row, dict) else None
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise CalibrationError(f"calibration stages[{i}].{key}={value!r}: must be a finite number >= 0")
    eff = data["effective_flops_per_s"]
    if not isinstance(eff, (int, float)) or not math.isfinite(eff) or eff <= 0:
        raise CalibrationError(f"calibration effective_flops_per_s={eff!r}: must be a finite number > 0")
    if "runtime" in data:
        check_runtime(data["runtime"])
    return data


RUNTIME_KEYS = ("frame_cpu_s", "frame_rtt_s", "thread_dispatch_s", "connect_s", "process_start_s")


def check_runtime(runtime: Any) -> dict[str, Any]:
    """Raise CalibrationError naming the first missing or bad runtime input (see swarm_model); return it."""
    if not isinstance(runtime, dict):
        raise CalibrationError("calibration 'runtime' must be an object: run simulations.swarm_model.measure_runtime")
    for key in RUNTIME_KEYS:
        v = runtime.get(key)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise CalibrationError(f"calibration runtime.{key}={v!r}: must be a finite number >= 0")
    return runtime


def load_calibration(path: str | Path = DEFAULT_PATH) -> dict[str, Any]:
    """Read and check a calibration file."""
    p = Path(path)
    if not p.is_file():
        raise CalibrationError(f"no calibration file at {p}: run simulations.calibrate.calibrate() first")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise CalibrationError(f"calibration file {p} is not valid JSON: {exc}") from exc
    return check_calibration(data)
