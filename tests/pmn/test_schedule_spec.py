"""The schedule option of the training recipe: old specs keep their hash and run gpipe; bad values are refused."""

from __future__ import annotations

from dataclasses import asdict, replace

import pytest

from node.config import NodeConfig
from node.model import optim_config
from node.services.chain_link import training_section
from pmn.errors import ConfigError
from pmn.spec import ModelProposal, TrainingRecipe, proposal_from_dict
from protocol.modelspec import TrainingSection, proposal_spec_hash
from sharding.config import PRESETS

OLD_RECIPE = {"stages": 3, "codec": "dense", "microbatches": 2, "microbatch_size": 4, "lr": 3e-3,
              "warmup_steps": 10, "data_seed": 0}


def test_a_spec_without_schedule_runs_gpipe_and_keeps_its_hash() -> None:
    p = proposal_from_dict({"model": {"preset": "tiny"}, "training": OLD_RECIPE})
    assert p.training.pipeline_schedule == "gpipe" and p.training.max_staleness == 0
    assert p.content_hash() == proposal_spec_hash(PRESETS["tiny"], OLD_RECIPE)  # the hash before the option


def test_async_is_part_of_the_hash_and_the_node_recomputes_it() -> None:
    p = proposal_from_dict({"model": {"preset": "tiny"},
                            "training": {**OLD_RECIPE, "pipeline_schedule": "async", "max_staleness": 2}})
    assert p.content_hash() != proposal_spec_hash(PRESETS["tiny"], OLD_RECIPE)
    cfg = NodeConfig(num_stages=3)
    cfg.runtime.num_microbatches, cfg.runtime.microbatch_size = 2, 4
    cfg.runtime.schedule, cfg.runtime.max_staleness = "async", 2
    section = training_section(cfg, optim_config(cfg, PRESETS["tiny"]))
    assert proposal_spec_hash(p.model, section.to_dict()) == p.content_hash()
    corrected = proposal_from_dict({"model": {"preset": "tiny"}, "training": {
        **OLD_RECIPE, "pipeline_schedule": "async", "max_staleness": 2, "async_lookahead": 2.0, "optimizer": "muon"}})
    assert corrected.content_hash() != p.content_hash()  # the look-ahead and the optimiser are part of the hash
    cfg.runtime.async_lookahead, cfg.recipe.optimizer = 2.0, "muon"
    section = training_section(cfg, optim_config(cfg, PRESETS["tiny"]))
    assert proposal_spec_hash(p.model, section.to_dict()) == corrected.content_hash()
    assert TrainingSection(**asdict(replace(p.training, pipeline_schedule="1f1b", max_staleness=0))).to_dict()["pipeline_schedule"] \
        == "1f1b"


@pytest.mark.parametrize("training, match", [
    ({"pipeline_schedule": "zigzag"}, "schedule"),
    ({"pipeline_schedule": "gpipe", "max_staleness": 2}, "needs pipeline_schedule"),
    ({"pipeline_schedule": "async", "max_staleness": -1}, "max_staleness"),
    ({"pipeline_schedule": "gpipe", "async_lookahead": 2.0}, "needs pipeline_schedule"),
    ({"pipeline_schedule": "async", "max_staleness": 1, "async_lookahead": -1.0}, "async_lookahead"),
    ({"pipeline_schedule": "async", "max_staleness": 1, "async_lookahead": float("nan")}, "async_lookahead"),
])
def test_bad_schedules_are_refused(training: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        proposal_from_dict({"model": {"preset": "tiny"}, "training": {**OLD_RECIPE, **training}})
    cfg = NodeConfig()
    cfg.runtime.schedule = training["pipeline_schedule"]
    cfg.runtime.max_staleness = training.get("max_staleness", 0)
    cfg.runtime.async_lookahead = training.get("async_lookahead", 1.0)
    with pytest.raises(ValueError, match=match):
        cfg.validate()


def test_async_combines_with_replicas_only_with_the_step_exchange() -> None:
    cfg = NodeConfig()
    cfg.runtime.schedule, cfg.replicas.enabled, cfg.runtime.replica_exchange = "async", True, "microbatch"
    with pytest.raises(ValueError, match="replicas.enabled needs runtime.replica_exchange = step"):
        cfg.validate()
    cfg.runtime.replica_exchange = "step"
    cfg.validate()
    assert ModelProposal(PRESETS["tiny"], TrainingRecipe(pipeline_schedule="1f1b")).validate().training.pipeline_schedule == "1f1b"
