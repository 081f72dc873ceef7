"""`benchmarks/wan.py`: its CPU sampler (the host's busy fraction and each process's cores in use over a window,
which say whether a WAN run's stages had a core each; real processes, one busy and one asleep) and its refusal
of a PowerSGD comparison without a power iteration."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from types import ModuleType

import pytest

from tests.benchmarks.scripts import ROOT, run_script

pytestmark = pytest.mark.timeout(60)


def _wan() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_wan", ROOT / "benchmarks" / "wan.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


def test_sampler_tells_a_busy_process_from_a_sleeping_one() -> None:
    wan = _wan()
    # the busy one spins until killed; the idle one blocks reading its stdin (nothing is ever written) until killed
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    idle = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        with wan.CpuSampler({"busy": busy.pid, "idle": idle.pid}, interval_s=0.05) as cpu:
            t0 = time.time()
            while len(cpu.samples) < 3 or cpu.samples[-1][0] - t0 < 1.5:  # ~1.5 s of samples after t0
                time.sleep(0.05)
            t1 = time.time()
        out = cpu.window(t0, t1)
    finally:
        for p in (busy, idle):
            p.kill()
            p.wait()
        assert idle.stdin is not None
        idle.stdin.close()
    assert out["cores"] >= 1 and 1.0 <= out["seconds"] <= t1 - t0
    assert out["cpu_per_wall"]["busy"] > 0.3  # a core most of the time (less if the host is loaded)
    assert out["cpu_per_wall"]["idle"] < 0.05
    assert out["cpu_per_wall"]["busy"] / out["cores"] <= out["host_busy_fraction"] + 0.05 <= 1.05
    assert cpu.window(t1 + 10, t1 + 20) == {}  # no samples span it
    with wan.CpuSampler({"gone": busy.pid}, interval_s=0.05) as gone:  # a process that has exited: not counted
        while len(gone.samples) < 2:
            time.sleep(0.05)
    assert gone.window(0, time.time() + 1)["cpu_per_wall"] == {}


def test_a_replica_comparison_without_a_power_iteration_is_refused_before_anything_starts() -> None:
    proc = run_script("wan.py", "--averaging-iterations", "0")
    assert proc.returncode == 2 and "--averaging-iterations 0" in proc.stderr and "at least 1" in proc.stderr


def test_an_in_flight_cap_without_replicas_is_refused_before_anything_starts() -> None:
    for args in (["--max-inflight", "4"], ["--replicas", "2", "--max-inflight", "0"]):
        proc = run_script("wan.py", *args)
        assert proc.returncode == 2 and "--max-inflight" in proc.stderr and "replicated mode's cap" in proc.stderr
