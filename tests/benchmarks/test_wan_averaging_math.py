"""`benchmarks/wan_averaging.py --math`: the in-process averaging comparison, including DiLoCo with its outer
step a round late (diloco-delayed, the variant whose exchange overlaps compute)."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.benchmarks.scripts import run_script

pytestmark = pytest.mark.timeout(300)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return run_script("wan_averaging.py", "--math", *args)


def test_delayed_diloco_sends_what_diloco_sends_and_trains_differently() -> None:
    proc = _run("--steps", "8", "--inner", "2", "--methods", "dense,diloco,diloco-delayed")
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = {r["method"]: r for r in json.loads(proc.stdout.strip().splitlines()[-1])["runs"]}
    assert sorted(runs) == ["dense", "diloco", "diloco-delayed"]
    # per 2 steps, dense: 2 x 4 fp32 microbatch gradients (4 B each); DiLoCo: one bf16 delta (2 B) each way
    assert runs["diloco"]["compression"] == pytest.approx((2 * 4 * 4) / (2 * 2))
    assert runs["diloco-delayed"]["compression"] == runs["diloco"]["compression"]
    assert runs["diloco-delayed"]["val_loss"] != runs["diloco"]["val_loss"]  # the outer steps land a round later


def test_unknown_method_or_missing_baseline_is_refused() -> None:
    for methods in ("dense,diloco-late", "diloco"):
        proc = _run("--steps", "2", "--methods", methods)
        assert proc.returncode != 0
        assert f"--methods '{methods}'" in proc.stderr and "dense (required" in proc.stderr


def test_int8_and_int4_powersgd_send_about_half_and_a_quarter_of_bf16_at_the_same_rank() -> None:
    proc = _run("--steps", "3", "--methods", "dense,powersgd,powersgd-int8,powersgd-int4", "--ranks", "4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = {(r["method"], r.get("rank"), r.get("bits")): r for r in json.loads(proc.stdout.strip().splitlines()[-1])["runs"]}
    assert set(runs) == {("dense", None, None), ("powersgd", 4, 16), ("powersgd", 4, 8), ("powersgd", 4, 4)}
    bf16, int8, int4 = runs[("powersgd", 4, 16)], runs[("powersgd", 4, 8)], runs[("powersgd", 4, 4)]
    # 1 byte (half a byte) a factor value plus a 2-byte scale per column, against 2 bytes a value
    assert 1.8 * bf16["compression"] < int8["compression"] < 2 * bf16["compression"]
    assert 1.8 * int8["compression"] < int4["compression"] < 2 * int8["compression"]
    assert len({bf16["val_loss"], int8["val_loss"], int4["val_loss"]}) == 3  # the rounding changes what is applied
    assert "powersgd r4 int8" in proc.stdout and "powersgd r4 int4" in proc.stdout


def test_bf16_dense_arm_sends_half_and_ranks_choose_the_powersgd_arms() -> None:
    proc = _run("--steps", "3", "--methods", "dense,dense-bf16,powersgd-int8", "--ranks", "6")
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = {(r["method"], r.get("rank")): r for r in json.loads(proc.stdout.strip().splitlines()[-1])["runs"]}
    assert set(runs) == {("dense", None), ("dense-bf16", None), ("powersgd", 6)}
    assert runs[("dense", None)]["compression"] == 1 and runs[("dense", None)]["compression_vs_bf16"] == 0.5
    assert runs[("dense-bf16", None)]["compression"] == 2 and runs[("dense-bf16", None)]["compression_vs_bf16"] == 1
    # the rounding of the gradients changes what is applied, a little
    assert runs[("dense-bf16", None)]["val_loss"] != runs[("dense", None)]["val_loss"]
    assert runs[("dense-bf16", None)]["val_loss"] == pytest.approx(runs[("dense", None)]["val_loss"], rel=0.01)
    low = runs[("powersgd", 6)]
    assert low["compression"] == pytest.approx(2 * low["compression_vs_bf16"])
    bad = _run("--steps", "2", "--methods", "dense,powersgd", "--ranks", "0")
    assert bad.returncode != 0 and "--ranks '0'" in bad.stderr


def test_step_exchange_and_the_shared_code_send_the_same_bytes_as_the_nodes_powersgd() -> None:
    proc = _run("--steps", "3", "--exchange", "step", "--ranks", "6",
                "--methods", "dense,powersgd-int4,powersgd-shared-int4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["exchange"] == "step" and out["optimizer"] == "adamw"
    runs = {r["method"]: r for r in out["runs"]}
    assert sorted(runs) == ["dense", "powersgd", "powersgd-shared"]
    assert all(r["exchange"] == "step" for r in runs.values())
    node, shared = runs["powersgd"], runs["powersgd-shared"]
    assert (shared["rank"], shared["bits"]) == (node["rank"], node["bits"]) == (6, 4)
    assert shared["compression"] == node["compression"] > 50  # one wire vector per replica and step, in two rounds
    assert shared["val_loss"] != node["val_loss"]  # another code: a common Q, errors against the mean
    # per microbatch, the node's arm trains differently from its step exchange
    micro = _run("--steps", "3", "--ranks", "6", "--methods", "dense,powersgd-int4")
    assert micro.returncode == 0, micro.stderr[-2000:]
    per_mb = {r["method"]: r for r in json.loads(micro.stdout.strip().splitlines()[-1])["runs"]}
    assert per_mb["powersgd"]["exchange"] == "microbatch" and per_mb["powersgd"]["val_loss"] != node["val_loss"]


def test_the_shared_code_needs_the_step_exchange() -> None:
    proc = _run("--steps", "2", "--methods", "dense,powersgd-shared")
    assert proc.returncode != 0 and "add --exchange step" in proc.stderr
