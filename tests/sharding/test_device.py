"""Device choice, execution policy (precision, AdamW kernel, compile, checkpointing) on CPU and meta."""

from __future__ import annotations

import pytest
import torch

from sharding.config import PRESETS
from sharding.data import load_corpus
from sharding.device import DeviceProbe, ExecutionPolicy, device_info, policy_for, resolve_device
from sharding.errors import DeviceError
from sharding.pipeline import LocalPipeline
from sharding.regression import GOLDEN_OPTIM
from sharding.stage import build_stage
from sharding.stagespec import full_spec

NONE = DeviceProbe(cuda_count=0, mps=False)
TWO_GPUS = DeviceProbe(cuda_count=2, mps=False)
MAC = DeviceProbe(cuda_count=0, mps=True)


def test_auto_prefers_cuda_then_mps_then_cpu():
    assert resolve_device("auto", TWO_GPUS) == torch.device("cuda", 0)
    assert resolve_device("auto", MAC) == torch.device("mps")
    assert resolve_device("auto", NONE) == torch.device("cpu")
    assert resolve_device("cuda:1", TWO_GPUS) == torch.device("cuda", 1)
    assert resolve_device("cuda", TWO_GPUS) == torch.device("cuda", 0)
    assert resolve_device("CPU", TWO_GPUS) == torch.device("cpu")


def test_missing_devices_are_one_line_errors_naming_what_was_found():
    with pytest.raises(DeviceError) as err:
        resolve_device("cuda", NONE)
    msg = str(err.value)
    assert msg == "--device cuda: no CUDA device found (torch.cuda.is_available() is False; found: cpu)"
    with pytest.raises(DeviceError, match=r"only 2 CUDA device\(s\) \(found: cuda:0, cuda:1, cpu\)"):
        resolve_device("cuda:2", TWO_GPUS)
    with pytest.raises(DeviceError, match="no MPS device"):
        resolve_device("mps", NONE)
    for bad in ("gpu", "cpu:1", "cuda:x", ""):
        with pytest.raises(DeviceError, match="not a device"):
            resolve_device(bad, TWO_GPUS)
    for err_msg in (str(e) for e in [DeviceError("x")]):
        assert "\n" not in err_msg


def test_real_probe_on_this_machine():
    # the machine the tests run on has no GPU; auto must fall back to what torch reports
    probe = DeviceProbe.detect()
    dev = resolve_device("auto")
    assert dev.type == ("cuda" if probe.cuda_count else "mps" if probe.mps else "cpu")
    info = device_info(torch.device("cpu"))
    assert info.free_bytes is not None and info.total_bytes is not None and 0 < info.free_bytes <= info.total_bytes
    assert "free of" in info.line() and info.line().startswith("device cpu (")


def test_cpu_free_memory_falls_back_without_proc():
    info = device_info(torch.device("cpu"), meminfo=dict)
    assert info.free_bytes is None and "? free" in info.line()


def test_policy_defaults_per_device():
    cpu = ExecutionPolicy("cpu").validate()
    assert cpu.autocast_dtype is None and cpu.adamw_kwargs() == {"foreach": False}
    gpu = ExecutionPolicy("cuda:0").validate()
    assert gpu.autocast_dtype == torch.bfloat16 and gpu.adamw_kwargs() == {"fused": True}
    assert ExecutionPolicy("cpu", precision="bf16").autocast_dtype == torch.bfloat16
    assert ExecutionPolicy("cuda:0", precision="fp32").autocast_dtype is None
    assert ExecutionPolicy("cpu", adamw="foreach").adamw_kwargs() == {"foreach": True}
    for bad in ({"precision": "fp8"}, {"adamw": "apex"}, {"memory_headroom": 0.0}):
        with pytest.raises(DeviceError):
            ExecutionPolicy("cpu", **bad).validate()
    assert policy_for("auto", NONE).device == "cpu"


def _train(policy, steps=3):
    pipe = LocalPipeline(PRESETS["tiny-subspace"], 2, "subspace", GOLDEN_OPTIM, policy=policy)
    corpus = load_corpus("synthetic:0")
    return [pipe.train_step(s, corpus, 2, 4) for s in range(steps)], pipe


def test_cpu_policy_is_bit_identical_to_the_reference():
    ref, _ = _train(None)
    same, pipe = _train(ExecutionPolicy("cpu"))
    assert same == ref
    assert all(p.dtype == torch.float32 for st in pipe.stages for p in st.parameters())


def test_bf16_autocast_on_cpu_trains_close_to_fp32_with_fp32_master_weights():
    ref, _ = _train(None)
    bf16, pipe = _train(ExecutionPolicy("cpu", precision="bf16"))
    assert bf16 != ref  # autocast really ran
    assert max(abs(a - b) for a, b in zip(bf16, ref, strict=True)) < 0.05
    for st, opt in zip(pipe.stages, pipe.optimizers, strict=True):
        assert all(p.dtype == torch.float32 for p in st.parameters())
        assert all(v.dtype == torch.float32 for s in opt.state.values() for k, v in s.items() if k != "step")


@pytest.mark.parametrize("adamw", ["foreach", "fused"])
def test_other_adamw_kernels_match_the_loop(adamw):
    ref, _ = _train(None)
    other, _ = _train(ExecutionPolicy("cpu", adamw=adamw))
    assert max(abs(a - b) for a, b in zip(other, ref, strict=True)) < 1e-4


def test_activation_checkpointing_gives_the_same_losses_and_gradients():
    ref, _ = _train(None)
    ckpt, pipe = _train(ExecutionPolicy("cpu", activation_checkpointing=True))
    assert all(st.activation_checkpointing for st in pipe.stages)
    assert max(abs(a - b) for a, b in zip(ckpt, ref, strict=True)) < 1e-6


def test_stage_builds_on_meta_without_memory():
    cfg = PRESETS["bench-subspace"]
    module = build_stage(cfg, full_spec(cfg), "meta")
    assert all(p.device.type == "meta" for p in module.parameters())
    assert module.u is not None and module.u.device.type == "meta"
