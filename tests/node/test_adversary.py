"""node.testing.adversary: the cheats' choices and argument errors (the processes are exercised in test_audit)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from node.testing.adversary import Cheat, make_lazy
from node.testing.swarm import REPO_ROOT
from node.training.worker import StageWorker
from sharding.config import PRESETS
from sharding.partition import partition
from sharding.train import OptimConfig


def test_lazy_fraction_is_deterministic_and_close_to_asked() -> None:
    cheat = Cheat("lazy", fraction=0.25, seed=4).validate()
    picks = [cheat.fakes(step, mb) for step in range(400) for mb in range(4)]
    assert picks == [cheat.fakes(step, mb) for step in range(400) for mb in range(4)]
    assert 0.2 < sum(picks) / len(picks) < 0.3
    assert all(Cheat("lazy", fraction=1.0).fakes(s, 0) for s in range(50))


@pytest.mark.parametrize(("kwargs", "field"), [({"behaviour": "sloppy"}, "--behaviour"),
                                               ({"behaviour": "lazy", "fraction": 0.0}, "--fraction"),
                                               ({"behaviour": "lazy", "fraction": 1.5}, "--fraction"),
                                               ({"behaviour": "inflate", "inflate": 1}, "inflate")])
def test_bad_cheat_rejected_naming_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        Cheat(**kwargs).validate()


def test_lazy_stage_sends_noise_on_chosen_microbatches_and_keeps_training() -> None:
    model = PRESETS["tiny"]
    spec = partition(model, 3)[0]
    from sharding.data import load_corpus

    worker = StageWorker(model, spec, codec="dense", optim=OptimConfig(), num_microbatches=2, microbatch_size=2,
                         corpus=load_corpus("synthetic"))
    honest = StageWorker(model, spec, codec="dense", optim=OptimConfig(), num_microbatches=2, microbatch_size=2,
                         corpus=load_corpus("synthetic"))
    cheat = Cheat("lazy", fraction=0.5, seed=1)
    make_lazy(worker, cheat)
    for mb in range(2):
        window = worker.head_window(0, mb)
        sent = worker.forward(0, mb, window, None)
        assert (sent != honest.forward(0, mb, window, None)) == cheat.fakes(0, mb)
        grad = torch.zeros(2, model.seq_len, model.d_model)
        assert worker.backward(0, mb, grad) is None and honest.backward(0, mb, grad) is None
    worker.step(0)  # the real graph was kept: the optimizer step still runs


def test_inflate_without_a_chain_is_refused_with_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "node.testing.adversary", "--behaviour", "inflate", "--stage", "0",
                           "--data-dir", str(tmp_path), "--no-progress"], capture_output=True, timeout=120,
                          cwd=str(REPO_ROOT))
    assert proc.returncode == 1
    msg = json.loads(proc.stdout.decode().strip().splitlines()[0])
    assert msg["event"] == "error" and "--rpc-url" in msg["error"]
