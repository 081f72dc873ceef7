"""The spec's training recipe: old spec files keep their hash, new fields are hashed, and `pmn node start`
hands the node the whole recipe so that the node's spec hash is the proposal's."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.model import optim_config, training_section
from pmn.cmd_node import node_config
from pmn.config import OperatorConfig
from pmn.errors import ConfigError
from pmn.spec import load_proposal, proposal_from_dict
from protocol.modelspec import proposal_spec_hash
from sharding.train import lr_at

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
RECIPE = """
[model]
preset = "tiny-llama"

[training]
stages = 2
codec = "dense"
lr = 0.001
warmup_steps = 5
data_seed = 3
schedule = "wsd"
total_steps = 40
cooldown_steps = 8
min_lr_ratio = 0
beta1 = 0.8
beta2 = 0.99
weight_decay = 0.05
grad_clip = 1
batch_tokens = 512
"""


def test_an_old_spec_file_keeps_its_hash_and_its_run() -> None:
    proposal = load_proposal(CONFIGS / "model-tiny.toml")
    # the content hash before the recipe fields existed
    assert proposal.content_hash().hex() == "30c7a35a0655a6cbaa7133504d5dc02a5aa427dbf3f2e45ca18937198ba6b047"
    o = proposal.training.optim_config()
    assert (o.schedule_name, o.grad_clip, o.betas, o.weight_decay, o.warmup_steps, o.data_seed) == (
        "constant", 0.0, (0.9, 0.95), 0.1, 10, 0)


@pytest.mark.parametrize("line", ['schedule = "cosine"\ntotal_steps = 50', "grad_clip = 1.0", "beta2 = 0.99",
                                  "weight_decay = 0.0", "total_steps = 20", "batch_tokens = 512"])
def test_every_recipe_field_is_in_the_hash(line: str) -> None:
    import tomllib

    base = tomllib.loads((CONFIGS / "model-tiny.toml").read_text())
    changed = tomllib.loads((CONFIGS / "model-tiny.toml").read_text())
    changed["training"].update(tomllib.loads(line))
    assert proposal_from_dict(changed).content_hash() != proposal_from_dict(base).content_hash()


def test_node_start_runs_the_spec_recipe_with_the_registered_hash(tmp_path: Path) -> None:
    spec = tmp_path / "spec.toml"
    spec.write_text(RECIPE)
    proposal = load_proposal(spec)
    op = OperatorConfig(model=str(spec), data_dir=str(tmp_path / "n"))
    cfg = node_config(op, {})
    section = training_section(cfg)
    assert proposal_spec_hash(proposal.model, section.to_dict()) == proposal.content_hash()
    assert cfg.runtime.steps == 40 and cfg.num_stages == 2
    o = optim_config(cfg, proposal.model)
    assert (o.lr, o.warmup_steps, o.data_seed, o.betas, o.weight_decay, o.grad_clip) == (
        0.001, 5, 3, (0.8, 0.99), 0.05, 1.0)
    assert lr_at(31, o) == 0.001 and lr_at(36, o) == pytest.approx(0.0005)


@pytest.mark.parametrize(("line", "field"), [('schedule = "cosine"', "total_steps"), ("batch_tokens = 100", "batch_tokens"),
                                             ('schedule = "wsd"\ntotal_steps = 10', "cooldown_steps"),
                                             ("grad_clip = -1", "grad_clip"), ("frobnicate = 1", "frobnicate")])
def test_bad_recipe_is_one_line_naming_the_field(tmp_path: Path, line: str, field: str) -> None:
    spec = tmp_path / "spec.toml"
    spec.write_text(f"[model]\npreset = \"tiny\"\n\n[training]\n{line}\n")
    with pytest.raises(ConfigError, match=field) as err:
        load_proposal(spec)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("model-*.toml")), ids=lambda p: p.name)
def test_example_specs_validate(path: Path) -> None:
    proposal = load_proposal(path)
    assert proposal.training.validate(proposal.model).optim_config().validate()
