"""`--device` and the execution settings: derived flags, one-line errors, the start-up line, the worker on a policy."""

from __future__ import annotations

import json

import pytest
import torch

from node.cli import describe_device, main, parse_config
from node.config import NodeConfig
from node.errors import DtypeMismatchError
from node.training.worker import StageWorker
from node.wire import frames
from sharding import OptimConfig, load_corpus, partition
from sharding.config import PRESETS
from sharding.device import ExecutionPolicy
from sharding.errors import StageMemoryError


def test_device_and_execution_flags_come_from_the_config() -> None:
    cfg = parse_config(["--device", "cpu", "--precision", "bf16", "--execution-adamw", "foreach",
                        "--activation-checkpointing"], env={})
    assert cfg.device == "cpu" and cfg.execution.precision == "bf16" and cfg.execution.adamw == "foreach"
    assert cfg.execution.activation_checkpointing and not cfg.execution.compile
    assert parse_config([], env={"PMN_DEVICE": "cuda:1"}).device == "cuda:1"
    policy = cfg.execution.policy(cfg.device)
    assert policy == ExecutionPolicy("cpu", precision="bf16", adamw="foreach", activation_checkpointing=True)
    assert NodeConfig().device == "auto"


def test_bad_execution_settings_are_value_errors() -> None:
    cfg = NodeConfig()
    cfg.execution.precision = "fp8"
    with pytest.raises(ValueError, match="execution.precision 'fp8'"):
        cfg.validate()


def test_start_line_names_device_and_free_memory() -> None:
    line = describe_device(NodeConfig(device="cpu"))
    assert line.startswith("device cpu (") and "GiB free of" in line and "compute fp32" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--device", "cuda", "--data-dir", "/nonexistent/never-created", "--steps", "0"]) == 1
    out, err = capsys.readouterr()
    event = json.loads(out.strip().splitlines()[-1])
    assert event["error"] == ("--device cuda: no CUDA device found (torch.cuda.is_available() is False; "
                              "found: cpu)")
    assert err.strip().count("\n") == 0 and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_pmn_swarm_and_demo_refuse_a_missing_device_before_starting(capsys: pytest.CaptureFixture[str]) -> None:
    from pmn.cli import main as pmn_main

    for argv in (["swarm", "--device", "cuda:0", "--stages", "2", "--steps", "1"], ["demo", "--device", "cuda"]):
        assert pmn_main(argv) != 0
        _, err = capsys.readouterr()
        assert "no CUDA device found" in err and err.strip().count("\n") == 0, err


def _worker(policy: ExecutionPolicy | None, stage: int = 0) -> StageWorker:
    cfg = PRESETS["tiny-subspace"]
    spec = partition(cfg, 2)[stage]
    return StageWorker(cfg, spec, codec="subspace", optim=OptimConfig(), num_microbatches=2, microbatch_size=2,
                       corpus=load_corpus("synthetic:0") if spec.is_first else None, policy=policy)


def test_worker_runs_bf16_autocast_and_sends_the_same_wire_format() -> None:
    ref, bf16 = _worker(None), _worker(ExecutionPolicy("cpu", precision="bf16"))
    window = ref.head_window(0, 0)
    a, b = ref.forward(0, 0, window, None), bf16.forward(0, 0, window, None)
    assert isinstance(a, bytes) and isinstance(b, bytes) and len(a) == len(b) and a != b
    assert all(p.dtype == torch.float32 for p in bf16.module.parameters())


def test_worker_refuses_a_stage_bigger_than_the_device() -> None:
    with pytest.raises(StageMemoryError, match="does not fit"):
        _worker(ExecutionPolicy("cpu", memory_headroom=1e-12))


def test_fp16_z_where_the_spec_says_bf16_is_refused_by_the_frame_checks() -> None:
    worker = _worker(None, stage=1)
    spec = worker.frame_spec(1 << 24)
    assert spec.dtype == frames.Dtype.BFLOAT16  # the subspace codec sends bf16 z
    good = frames.FrameHeader(kind=frames.Kind.ACTIVATION, spec_hash=spec.spec_hash, stage=0, step=0, microbatch=0,
                              codec=spec.codec, dtype=spec.dtype, shape=spec.shape, window_len=spec.window_len,
                              payload_len=spec.payload_len)
    frames.check_data_header(good, spec)
    fp16 = frames.FrameHeader(**{**good.__dict__, "dtype": frames.Dtype.FLOAT16})
    with pytest.raises(DtypeMismatchError, match="frame dtype float16, codec sends bfloat16"):
        frames.check_data_header(fp16, spec)
    raw = frames.encode_frame(frames.Kind.ACTIVATION, spec.spec_hash, 0, 0, 0, payload=b"\x00" * spec.payload_len,
                              window=b"\x00" * spec.window_len, codec=spec.codec, dtype=frames.Dtype.FLOAT16,
                              shape=spec.shape)
    with pytest.raises(DtypeMismatchError):
        frames.check_data_header(frames.decode_header(raw[:frames.HEADER_SIZE], 1 << 24), spec)
