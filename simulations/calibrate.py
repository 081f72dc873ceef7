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

    model: str = "tiny"  # sharding.config.PRESETS name of the model to split
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
        from sharding.config import PRESETS

        if self.model not in PRESETS:
            raise ValueError(f"CalibrationConfig.model={self.model!r}: use one of {sorted(PRESETS)}")
        return self


def _fwd_bwd_times(forward: Any, backward: Any, cal: CalibrationConfig) -> tuple[float, float]:
    """Median forward and median backward seconds, each timed on its own in every repetition."""
    fwd, bwd = [], []
    for i in range(cal.warmup + cal.repeats):
        t0 = time.perf_counter()
        forward()
        t1 = time.perf_counter()
        backward()
        t2 = time.perf_counter()
        if i >= cal.warmup:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
    return float(statistics.median(fwd)), float(statistics.median(bwd))


def _opt_time(stage: torch.nn.Module, step: Any, cal: CalibrationConfig) -> float:
    """Median optimizer-step seconds, with fresh gradients on every parameter before each step."""
    samples = []
    for i in range(cal.warmup + cal.repeats):
        for p in stage.parameters():
            if p.requires_grad:
                p.grad = torch.full_like(p, 1e-4)
        t0 = time.perf_counter()
        step()
        if i >= cal.warmup:
            samples.append(time.perf_counter() - t0)
    return float(statistics.median(samples))


def measure_stages(cal: CalibrationConfig) -> list[dict[str, Any]]:
    """Time forward, backward and optimizer step of every stage of `cal.model` (real stage code)."""
    from sharding.codecs import get_codec
    from sharding.config import PRESETS
    from sharding.flops import stage_flops_per_token
    from sharding.partition import partition
    from sharding.stage import build_stage
    from sharding.train import OptimConfig, make_optimizer, optimizer_step

    config = PRESETS[cal.model]
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
    out_rows = []
    for spec in specs:
        stage = build_stage(config, spec)
        opt = make_optimizer(stage, optim)
        state: dict[str, Any] = {}

        def forward(stage: Any = stage, spec: Any = spec, state: dict[str, Any] = state) -> None:
            h = None
            if not spec.has_embedding:
                h = codec.decode_activation(codec.encode_activation(h_in, ids), ids).requires_grad_(True)
            out = stage(ids, h, targets if spec.has_head else None)
            if not spec.has_head:
                codec.encode_activation(out.detach(), ids)
            state["out"], state["h"] = out, h

        def backward(spec: Any = spec, state: dict[str, Any] = state) -> None:
            out, h = state["out"], state["h"]
            if spec.has_head:
                out.backward()
            else:
                out.backward(codec.decode_gradient(codec.encode_gradient(grad_out, ids), ids))
            if h is not None and h.grad is not None:
                codec.encode_gradient(h.grad, ids)

        fwd_s, bwd_s = _fwd_bwd_times(forward, backward, cal)
        opt_s = _opt_time(stage, lambda stage=stage, opt=opt: optimizer_step(stage, opt, 0, optim), cal)
        state.clear()
        out_rows.append(
            {
                "index": spec.index,
                "block_start": spec.block_start,
                "block_end": spec.block_end,
                "fwd_s": fwd_s,
                "bwd_s": bwd_s,
                "opt_s": opt_s,
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
    from sharding.config import PRESETS

    config = PRESETS[cal.model]
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
    return data


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
