"""`benchmarks/compression.py --quick --variants`: every compressed arm is measured against its own control.

The quick budget only checks the machinery (the losses mean nothing at 12 steps): the variants run side by side,
the frame bytes follow k, a changed free tail gets its own uncompressed control, and a malformed variant is
refused with a line naming it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from typing import Any

import pytest

from tests.benchmarks.scripts import ROOT, run_script

pytestmark = pytest.mark.timeout(300)
QUICK_SEQ = 32  # tokens per sequence of the --quick setting


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return run_script("compression.py", *args)


def test_quick_variants_each_against_its_own_control() -> None:
    proc = _run("--quick", "--variants", "k=1;free=0,param=coordinates", "--workers", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["mode"] == "quick" and out["k"] == 2 and out["subspace_param"] == "projected"
    assert out["post_norm"] == "scalar"
    k1, free0 = out["variants"]
    assert (k1["arm"], k1["k"], k1["free_tail_layers"]) == ("k=1,param=projected,free=1", 1, 1)
    assert (free0["arm"], free0["subspace_param"], free0["free_tail_layers"]) == ("k=2,param=coordinates,free=0",
                                                                                  "coordinates", 0)
    # bytes: half the z coordinates -> fewer frame bytes, a higher compression; same k -> the same bytes
    assert k1["frame_bytes_per_token"] < out["frame_bytes_per_token"] == free0["frame_bytes_per_token"]
    assert k1["compression_vs_bf16"] > out["compression_vs_bf16"] > 1
    for v in (out, k1, free0):
        assert v["compression_vs_bf16"] == pytest.approx(out["frame_bytes_per_token_bf16"] / v["frame_bytes_per_token"])
        assert v["loss_ratio_control_min"] <= v["loss_ratio_control"] <= v["loss_ratio_control_max"]
    # the headline frames carry no token window (a spec with a dataset); with it on the wire every frame of the arm
    # and of the bf16 baseline is larger by the window's bytes per token: ids plus one target per row, uint16
    assert out["local_windows"] is True
    window = 2 * (QUICK_SEQ + 1) / QUICK_SEQ
    for v in (out, k1, free0):
        assert v["frame_bytes_per_token_windows_on_wire"] == pytest.approx(v["frame_bytes_per_token"] + window)
        assert v["compression_vs_bf16_windows_on_wire"] < v["compression_vs_bf16"]
    assert out["frame_bytes_per_token_bf16_windows_on_wire"] == pytest.approx(out["frame_bytes_per_token_bf16"] + window)
    # the free=0 arm's ratio is against a free=0 control run (one seed: the ratio of the two losses)
    assert (out["variants"][0]["control"], free0["control"]) == ("control", "control free=0")
    assert k1["val_loss_control"] == pytest.approx(out["val_loss_control"])
    assert free0["val_loss_control"] != pytest.approx(out["val_loss_control"])
    assert free0["loss_ratio_control"] == pytest.approx(free0["val_loss"] / free0["val_loss_control"])


def test_a_malformed_variant_is_refused_naming_it() -> None:
    proc = _run("--quick", "--variants", "k=1;rank=3")
    assert proc.returncode != 0
    assert "rank=3" in proc.stderr and "use k=INT" in proc.stderr


def _bench_module() -> Any:
    spec = importlib.util.spec_from_file_location("compression_bench", ROOT / "benchmarks" / "compression.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


def test_tokens_to_reach_interpolates_and_extrapolates_from_a_fit_of_the_last_half() -> None:
    reach = _bench_module().tokens_to_reach
    # reached inside the run: linear interpolation between the two checkpoints around the target
    assert reach([(100, 3.0), (200, 2.0), (300, 1.5)], 1.75) == (250.0, False)
    # a curve exactly linear in log-tokens, never reaching the target: the fit finds the exact crossing
    exact = [(t, 5.0 - math.log(t)) for t in (100, 200, 400, 800, 1600, 3200)]
    tokens, extrapolated = reach(exact, 5.0 - math.log(6400))
    assert extrapolated and tokens == pytest.approx(6400)
    # the same curve with a last point that happens to sit level with the one before: the last pair alone
    # gives slope 0 (inf); the fit over the last half (3 points) stays finite and near 6400
    noisy = exact[:-1] + [(3200, exact[-2][1])]
    tokens, _ = reach(noisy, 5.0 - math.log(6400))
    assert 6400 < tokens < 1e5
    # a curve that is not falling never reaches a lower loss
    assert reach([(100, 2.0), (200, 2.0), (300, 2.1)], 1.0) == (math.inf, True)


def test_a_post_norm_variant_gets_a_control_of_the_same_norm() -> None:
    bench = _bench_module()
    assert bench.QUICK.post_norm == "scalar"  # the main arm's default
    arms = bench.arms_of(bench.QUICK, bench.parse_variants("norm=none;k=1,norm=weightless;k=1"))
    assert arms["k=2,param=projected,free=1,norm=none"].control == "control norm=none"
    assert arms["k=1,param=projected,free=1,norm=weightless"].control == "control norm=weightless"
    assert arms["k=1,param=projected,free=1"].control == "control"  # the main arm's norm: the main control
    for norm in ("none", "weightless"):
        control = arms[f"control norm={norm}"]
        assert (control.rank, control.post_norm, control.compressed) == (bench.QUICK.d_model, norm, False)
        assert bench.model_config(bench.QUICK, control, 0).post_norm == norm
    assert arms["subspace"].post_norm == arms["control"].post_norm == "scalar"
    assert arms["dense"].post_norm == "weightless"  # the plain GPT has no post-norm option
