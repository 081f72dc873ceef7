"""The node-side spec hash equals the one `pmn` registers; a mismatch names both hashes."""

from __future__ import annotations

from dataclasses import asdict, replace

import pytest

from pmn.spec import ModelProposal, TrainingRecipe
from protocol.modelspec import SpecMismatchError, TrainingSection, proposal_spec_hash, require_spec_hash
from sharding.config import PRESETS


def _section(recipe: TrainingRecipe) -> TrainingSection:
    return TrainingSection(**asdict(recipe))


@pytest.mark.parametrize("preset", ["tiny", "tiny-subspace"])
def test_same_hash_as_the_registered_proposal(preset: str) -> None:
    recipe = TrainingRecipe(stages=3, codec="dense", lr=1e-3, warmup_steps=10)
    proposal = ModelProposal(PRESETS[preset], recipe).validate()
    assert proposal_spec_hash(proposal.model, asdict(recipe)) == proposal.content_hash()
    assert require_spec_hash(proposal.content_hash(), proposal.model, _section(recipe), 1) == proposal.content_hash()


@pytest.mark.parametrize("change", [{"lr": 2e-3}, {"warmup_steps": 7}, {"codec": "bf16"}, {"stages": 2}])
def test_other_training_settings_are_refused_naming_both_hashes(change: dict) -> None:
    proposal = ModelProposal(PRESETS["tiny"], TrainingRecipe()).validate()
    mine = replace(proposal.training, **change)
    with pytest.raises(SpecMismatchError) as err:
        require_spec_hash(proposal.content_hash(), proposal.model, _section(mine), 4)
    assert err.value.field == "specHash"
    assert "0x" + proposal.content_hash().hex() in str(err.value)
    assert "0x" + proposal_spec_hash(proposal.model, asdict(mine)).hex() in str(err.value)


def test_another_model_config_is_refused() -> None:
    proposal = ModelProposal(PRESETS["tiny"], TrainingRecipe()).validate()
    other = replace(PRESETS["tiny"], n_layers=3)
    with pytest.raises(SpecMismatchError, match="model 2 is registered with spec hash"):
        require_spec_hash(proposal.content_hash(), other, _section(proposal.training), 2)


def test_a_received_training_section_must_hold_the_first_fields_and_no_unknown_one() -> None:
    full = TrainingSection().to_dict()
    assert TrainingSection.from_dict(full) == TrainingSection()
    first = {k: full[k] for k in ("stages", "codec", "microbatches", "microbatch_size", "lr", "warmup_steps",
                                  "data_seed")}
    assert TrainingSection.from_dict(first) == TrainingSection()  # later fields: the run of older specs
    with pytest.raises(ValueError, match="missing field\\(s\\) lr"):
        TrainingSection.from_dict({k: v for k, v in first.items() if k != "lr"})
    with pytest.raises(ValueError, match="unknown field\\(s\\) momentum"):
        TrainingSection.from_dict({**full, "momentum": 0.9})


def test_every_factor_width_a_spec_may_name_has_a_codec() -> None:
    """The spec's powersgd_bits are bf16 (16) and the code widths sharding.gradcompress quantises to; a width
    added to one and not the other fails here."""
    from protocol.modelspec import POWERSGD_BITS
    from sharding.gradcompress import CODE_MAX

    assert set(POWERSGD_BITS) == {16, *CODE_MAX}
    for bits in POWERSGD_BITS:
        TrainingSection(replica_averaging="powersgd", powersgd_bits=bits).validate(PRESETS["tiny"])
    with pytest.raises(ValueError, match="powersgd_bits=2"):
        TrainingSection(replica_averaging="powersgd", powersgd_bits=2).validate(PRESETS["tiny"])
