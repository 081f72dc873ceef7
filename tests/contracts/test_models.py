"""ModelRegistry through the client: propose, amend, start, retire, bad input."""

from __future__ import annotations

from typing import Any

import pytest

from contracts.client import ModelTerms
from contracts.errors import ContractRevertError, InvalidInputError

from .conftest import ACCT, SPEC, Env


def test_propose_start_retire_lifecycle(env: Env) -> None:
    pc = env.pc
    mid = env.propose(start=False)
    assert mid == 1 and pc.model_count() == 1
    m = pc.get_model(mid)
    assert m.status == "Proposed" and m.proposer == env.researcher.address
    assert m.terms.spec_hash == SPEC and m.terms.challenge_window == 3600 and m.terms.num_stages == 3
    assert pc.share_token(mid) == m.share_token
    assert pc.token(mid).functions.symbol().call() == "PMS1"
    new_terms = ModelTerms(b"\x44" * 32, "ipfs://v2", 4, ACCT, 50, 60, 100, 5)
    pc.amend_terms(env.researcher, mid, new_terms)
    assert pc.get_model(mid).terms == new_terms
    pc.start_training(env.researcher, mid)
    m = pc.get_model(mid)
    assert m.status == "Training" and m.training_started_at > 0
    with pytest.raises(ContractRevertError) as err:
        pc.amend_terms(env.researcher, mid, new_terms)
    assert err.value.error_name == "ModelRegistryWrongStatus"
    pc.retire_model(env.researcher, mid)
    assert pc.get_model(mid).status == "Retired"
    assert [x.model_id for x in pc.list_models()] == [1]


def test_only_proposer_controls_model(env: Env) -> None:
    mid = env.propose(start=False)
    with pytest.raises(ContractRevertError) as err:
        env.pc.start_training(env.payer, mid)
    assert err.value.error_name == "ModelRegistryNotProposer"
    assert err.value.error_args == {"modelId": mid, "caller": env.payer.address}
    assert env.pc.get_model(mid).status == "Proposed"


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("numStages", {"num_stages": 0}),
        ("epochLength", {"epoch_length": 0}),
        ("challengeWindow", {"challenge_window": 0}),
        ("auditRateBps", {"audit_rate_bps": 10_001}),
        ("specHash", {"spec_hash": b"\x00" * 32}),
        ("metadataURI", {"metadata_uri": ""}),
    ],
)
def test_invalid_terms_are_named_and_store_nothing(env: Env, field: str, kwargs: dict[str, Any]) -> None:
    args: dict[str, Any] = dict(spec_hash=SPEC, metadata_uri="ipfs://m", num_stages=2, accounting_hash=ACCT, epoch_length=10,
                challenge_window=10, audit_rate_bps=0, inference_fee_wei=0)
    args.update(kwargs)
    with pytest.raises(ContractRevertError) as err:
        env.pc.propose_model(env.researcher, **args)
    assert err.value.error_name == "ModelRegistryInvalidTerm" and err.value.error_args["term"] == field
    args_ = err.value.error_args
    assert not args_["min"] <= args_["value"] <= args_["max"]
    assert str(err.value).startswith(f"ModelRegistryInvalidTerm(term={field}, value=")
    assert env.pc.model_count() == 0


def test_client_rejects_unencodable_input(env: Env) -> None:
    with pytest.raises(InvalidInputError, match="spec_hash must be 32 bytes"):
        env.pc.propose_model(env.researcher, b"short", "u", 1, ACCT, 1, 1, 0, 0)
    with pytest.raises(InvalidInputError, match="num_stages"):
        env.pc.propose_model(env.researcher, SPEC, "u", 70_000, ACCT, 1, 1, 0, 0)
    with pytest.raises(ContractRevertError, match="ModelRegistryUnknownModel"):
        env.pc.get_model(99)
    assert env.pc.model_count() == 0
