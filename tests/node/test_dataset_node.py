"""Node processes train on the spec's prepared dataset: BPE ids, memory-mapped, every stage reading its token
windows from its own copy (none on the wire), same losses as one process."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from node.testing.swarm import run_local_swarm
from sharding import PRESETS, OptimConfig, train_reference
from sharding.dataset import DataSpec, load_prepared, manifest_hash, prepare, read_documents, split_documents
from sharding.tokenizer import train_bpe

pytestmark = [pytest.mark.network]

M, B, VOCAB = 2, 2, 320


@pytest.mark.timeout(240)
@pytest.mark.parametrize("runner", [[], ["--replicated"]], ids=["pipeline", "replicated"])
def test_two_stage_swarm_trains_on_the_prepared_bpe_dataset(tmp_path: Path, runner: list[str]) -> None:
    docs = read_documents("synthetic:3")
    train, _ = split_documents(docs, 5)
    tok = train_bpe([c for _, c in train], VOCAB)
    spec = DataSpec(source="synthetic:3", manifest_hash=manifest_hash(docs), tokenizer="bpe",
                    tokenizer_path=str(tok.save(tmp_path / "tok.json")), tokenizer_hash=tok.content_hash,
                    prepared_dir=str(tmp_path / "prepared")).validate()
    prepare(spec, VOCAB)
    model = dataclasses.replace(PRESETS["tiny"], vocab_size=VOCAB)
    (tmp_path / "model.json").write_text(json.dumps(model.to_dict()))
    (tmp_path / "data.json").write_text(json.dumps(spec.to_dict()))
    res = run_local_swarm(2, 2, tmp_path / "run", model=str(tmp_path / "model.json"), microbatches=M,
                          microbatch_size=B, threads=[1, 1], timeout_s=200,
                          extra_args=["--dataset", str(tmp_path / "data.json"), "--no-dht", *runner])
    assert all(p["data_hash"] == spec.data_hash() for p in res.peers)
    # every stage read its windows from the dataset: activation frames travelled without them (and the losses,
    # which need the right ids on the tail stage, equal the single-process run's)
    assert all(p["local_windows"] for p in res.peers)
    reference = train_reference(model, OptimConfig(), 2, M, B, load_prepared(spec, VOCAB))
    assert res.losses == pytest.approx(reference, abs=1e-4)
