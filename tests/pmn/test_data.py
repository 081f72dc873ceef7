"""`pmn data` and the [data] section: hashes in the spec, prepared token files, the node trains on them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from pmn.errors import ConfigError
from pmn.spec import ModelProposal, TrainingRecipe, load_proposal, proposal_from_dict
from protocol.modelspec import proposal_spec_hash
from sharding.config import PRESETS
from sharding.dataset import DataSpec
from tests.pmn.conftest import assert_clean_error, run_pmn

VOCAB = 300


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A BPE tokenizer trained by `pmn data tokenizer`, the manifest hash, and a spec pinning both."""
    root = tmp_path_factory.mktemp("data")
    proc = run_pmn("data", "tokenizer", "synthetic:0", "--vocab-size", str(VOCAB), "--out", str(root / "tok.json"))
    assert proc.returncode == 0, proc.stderr
    tok = json.loads(proc.stdout.splitlines()[-1])
    proc = run_pmn("data", "manifest", "synthetic:0")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads(proc.stdout.splitlines()[-1])
    assert manifest["manifest_hash"] == tok["manifest_hash"] and manifest["documents"] == 160
    spec = root / "spec.toml"
    spec.write_text(_spec_text(tok["tokenizer_hash"], manifest["manifest_hash"], root / "prepared"))
    return {"root": root, "tok": tok, "manifest": manifest["manifest_hash"], "spec": spec}


def _spec_text(tok_hash: str, manifest: str, prepared: Path, vocab: int = VOCAB, extra: str = "") -> str:
    return (f'[model]\npreset = "tiny"\nvocab_size = {vocab}\n[training]\nstages = 1\n'
            f'[data]\nsource = "synthetic:0"\nmanifest_hash = "{manifest}"\ntokenizer = "bpe"\n'
            f'tokenizer_path = "tok.json"\ntokenizer_hash = "{tok_hash}"\nprepared_dir = "{prepared}"\n{extra}')


def test_spec_hash_covers_data_and_old_specs_keep_theirs(made: dict) -> None:
    old = ModelProposal(PRESETS["tiny"], TrainingRecipe())
    assert old.content_hash() == proposal_spec_hash(old.model, dataclasses.asdict(old.training))  # no [data]: as before
    assert proposal_from_dict({"model": {"preset": "tiny"}}).content_hash() == old.content_hash()
    proposal = load_proposal(made["spec"])
    assert proposal.data is not None and proposal.data.tokenizer_path == str(made["root"] / "tok.json")
    h = proposal.content_hash()
    assert h == proposal_spec_hash(proposal.model, dataclasses.asdict(proposal.training), proposal.data.hashed())
    local = dataclasses.replace(proposal, data=dataclasses.replace(proposal.data, source="/elsewhere",
                                                                   tokenizer_path="/x.json", prepared_dir="/y"))
    assert local.content_hash() == h  # where this machine keeps the files is not part of the hash
    for field, value in (("tokenizer_hash", "00" * 32), ("manifest_hash", "00" * 32), ("val_percent", 6)):
        change: dict[str, Any] = {field: value}
        other = dataclasses.replace(proposal, data=dataclasses.replace(proposal.data, **change))
        assert other.content_hash() != h, field


def test_prepare_then_node_trains_on_the_spec_data(made: dict, tmp_path: Path) -> None:
    proc = run_pmn("data", "prepare", str(made["spec"]))
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["dtype"] == "<u2" and out["train_tokens"] > 0 and out["val_tokens"] > 0
    again = json.loads(run_pmn("data", "prepare", str(made["spec"])).stdout.splitlines()[-1])
    assert again["data_hash"] == out["data_hash"]
    proc = run_pmn("node", "start", "--model", str(made["spec"]), "--data-dir", str(tmp_path / "n"), "--steps", "2",
                   "--no-progress", "--no-dht", "--checkpoint-every", "0", "--threads", "1", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ready = json.loads(proc.stdout.splitlines()[0])
    assert ready["event"] == "ready" and ready["data_hash"] == out["data_hash"]
    data = json.loads((tmp_path / "n" / "data.json").read_text())
    assert data["tokenizer_hash"] == made["tok"]["tokenizer_hash"]


def test_node_refuses_data_that_differs_from_the_spec(made: dict, tmp_path: Path) -> None:
    root: Path = made["root"]
    # prepared for another manifest: the node names both values and the fix, before building a model
    other = root / "other.toml"
    other.write_text(_spec_text(made["tok"]["tokenizer_hash"], "ab" * 32, tmp_path / "empty"))
    proc = run_pmn("node", "start", "--model", str(other), "--data-dir", str(tmp_path / "n"), "--steps", "1",
                   "--no-progress", "--no-dht")
    assert_clean_error(proc, "run `pmn data prepare SPEC` first")
    proc = run_pmn("data", "prepare", str(other))
    assert_clean_error(proc, "[data] manifest_hash", "ab" * 32, made["manifest"])
    # a tokenizer whose hash differs: refused by `pmn node start` itself
    bad_tok = root / "bad-tok.toml"
    bad_tok.write_text(_spec_text("cd" * 32, made["manifest"], tmp_path / "p"))
    for args in (("data", "prepare", str(bad_tok)),
                 ("node", "start", "--model", str(bad_tok), "--data-dir", str(tmp_path / "n2"), "--steps", "1")):
        assert_clean_error(run_pmn(*args), "tokenizer_hash", "cd" * 32, made["tok"]["tokenizer_hash"])
    # --corpus would train on something else than the spec pins
    assert_clean_error(run_pmn("node", "start", "--model", str(made["spec"]), "--corpus", "synthetic", "--data-dir",
                               str(tmp_path / "n3")), "--corpus conflicts with the spec's [data]")
    # a vocabulary larger than the model's
    small = root / "small.toml"
    small.write_text(_spec_text(made["tok"]["tokenizer_hash"], made["manifest"], tmp_path / "p", vocab=256))
    assert_clean_error(run_pmn("data", "prepare", str(small)), "[model] vocab_size=256", "set vocab_size >= 300")
    # a model vocabulary larger than uint32 ids
    huge = root / "huge.toml"
    huge.write_text(_spec_text(made["tok"]["tokenizer_hash"], made["manifest"], tmp_path / "p", vocab=2**32 + 1))
    assert_clean_error(run_pmn("data", "prepare", str(huge)), "vocab_size=4294967297", "uint32")


def test_bad_data_sections(made: dict, tmp_path: Path) -> None:
    root: Path = made["root"]
    spec = root / "bad.toml"
    spec.write_text(_spec_text(made["tok"]["tokenizer_hash"], made["manifest"], tmp_path, extra="colour = 1\n"))
    assert_clean_error(run_pmn("data", "prepare", str(spec)), "[data]: unknown field(s) colour")
    spec.write_text(_spec_text(made["tok"]["tokenizer_hash"], made["manifest"], tmp_path).replace(
        'source = "synthetic:0"', 'source = "no/such/dir"'))
    assert_clean_error(run_pmn("data", "prepare", str(spec)), "[data] source", "no/such/dir", "does not exist")
    spec.write_text(_spec_text(made["tok"]["tokenizer_hash"], made["manifest"], tmp_path).replace(
        'tokenizer = "bpe"', 'tokenizer = "sentencepiece"'))
    assert_clean_error(run_pmn("data", "prepare", str(spec)), "[data] tokenizer='sentencepiece' is unknown")
    assert_clean_error(run_pmn("data", "manifest", "/no/such/path"), "does not exist")
    assert_clean_error(run_pmn("data", "tokenizer", "synthetic:0", "--vocab-size", "100", "--out", str(tmp_path / "t")),
                       "--vocab-size=100", "at least 257")
    with pytest.raises(ConfigError, match=r"\[data\] val_percent=0"):
        proposal_from_dict({"model": {"preset": "tiny"},
                            "data": {**DataSpec(manifest_hash="00" * 32).hashed(), "val_percent": 0}})
