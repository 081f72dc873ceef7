"""Tokenizers and the content-addressed dataset: hashes pinned, splits disjoint, sampling deterministic."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sharding import PRESETS, LocalPipeline
from sharding.data import Corpus
from sharding.dataset import (
    DataSpec,
    load_data_spec,
    load_prepared,
    manifest_hash,
    prepare,
    read_documents,
    split_documents,
)
from sharding.errors import DataError
from sharding.tokenizer import BYTE_TOKENIZER_HASH, BpeTokenizer, ByteTokenizer, canonical_hash, train_bpe


def _docs(n: int = 60) -> list[tuple[str, bytes]]:
    return [(f"d{i:03d}.txt", f"document {i}: the quick brown fox {i * 7} jumps over the lazy dog.\n".encode() * 3)
            for i in range(n)]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory) -> tuple[BpeTokenizer, Path]:
    tok = train_bpe([c for _, c in read_documents("synthetic:0")], 384)
    path = tok.save(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    return tok, path


def _write_dir(root: Path, docs: list[tuple[str, bytes]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, content in docs:
        (root / name).write_bytes(content)
    return root


def _spec(tmp_path: Path, source: str, **kw: object) -> DataSpec:
    docs = read_documents(source)
    fields = {"source": source, "manifest_hash": manifest_hash(docs), "prepared_dir": str(tmp_path / "prep"), **kw}
    return DataSpec(**fields).validate()  # type: ignore[arg-type]


def test_bpe_training_is_deterministic_and_hash_ignores_formatting(bpe: tuple[BpeTokenizer, Path]) -> None:
    tok, path = bpe
    again = train_bpe([c for _, c in read_documents("synthetic:0")], 384)
    assert tok.vocab_size == 384 and again.content_hash == tok.content_hash
    assert BpeTokenizer.from_file(path).content_hash == tok.content_hash  # saved pretty, hashed canonical
    compact = json.dumps(json.loads(path.read_text()))
    assert canonical_hash(compact) == tok.content_hash
    assert train_bpe([c for _, c in read_documents("synthetic:1")], 384).content_hash != tok.content_hash
    text = "lo te mi ka. def f(x): return x\n"
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("lo te mi ka")) < len("lo te mi ka")  # merges learned
    ids = tok.encode_documents([b"lo", b"te"])
    assert tok.eot_id in ids and max(ids) < tok.vocab_size


def test_byte_tokenizer() -> None:
    tok = ByteTokenizer()
    assert tok.content_hash == BYTE_TOKENIZER_HASH and tok.vocab_size == 256
    assert tok.decode(tok.encode("héllo")) == "héllo"
    with pytest.raises(DataError, match="vocab_size=100: a byte-level BPE needs at least 257"):
        train_bpe([b"abc"], 100)


def test_bpe_prepared_dataset_memmapped_and_sampled_deterministically(tmp_path: Path,
                                                                       bpe: tuple[BpeTokenizer, Path]) -> None:
    tok, path = bpe
    spec = _spec(tmp_path, "synthetic:0", tokenizer="bpe", tokenizer_path=str(path), tokenizer_hash=tok.content_hash)
    prepared = prepare(spec, 384)
    assert prepared.meta["dtype"] == "<u2" and prepared.meta["train"]["tokens"] > 10 * prepared.meta["val"]["tokens"]
    corpus = load_prepared(spec, 384)
    assert isinstance(corpus.train.numpy().base, np.memmap) or corpus.train.dtype == torch.uint16
    b = corpus.batch("train", 3, 1, 4, 16, 7)
    assert b.shape == (4, 17) and b.dtype == torch.long and int(b.max()) < 384
    assert torch.equal(b, load_prepared(spec, 384).batch("train", 3, 1, 4, 16, 7))
    for other in (("train", 3, 2, 4, 16, 7), ("train", 4, 1, 4, 16, 7), ("train", 3, 1, 4, 16, 8)):
        assert not torch.equal(b, corpus.batch(*other))
    assert prepare(spec, 384).meta == prepared.meta  # prepared once, reused


def test_validation_split_cannot_overlap_training(tmp_path: Path) -> None:
    docs = _docs(80)
    docs += [(f"copy-of-{name}", content) for name, content in docs[:40]]  # duplicates under other names
    train, val = split_documents(sorted(docs), 10)
    train_content, val_content = {c for _, c in train}, {c for _, c in val}
    assert val_content and not train_content & val_content
    root = _write_dir(tmp_path / "docs", docs)
    spec = _spec(tmp_path, str(root), val_percent=10)
    meta = prepare(spec, 256).meta
    corpus = load_prepared(spec, 256)
    val_stream = bytes(corpus.val.numpy().astype(np.uint8))
    assert val_stream == bytes(ByteTokenizer().encode_documents([c for _, c in sorted(val)])) and val_stream
    for content in val_content:
        assert content not in bytes(corpus.train.numpy().astype(np.uint8))
    assert meta["train"]["documents"] + meta["val"]["documents"] == len(docs)


class _NoTrain(Corpus):
    """A corpus whose train split raises: evaluation must never touch it."""

    def split(self, split: str) -> torch.Tensor:
        if split != "val":
            raise AssertionError(f"evaluation read the {split!r} split")
        return super().split(split)


def test_evaluation_never_reads_the_train_split() -> None:
    src = Corpus("t", torch.randint(0, 256, (5000,), dtype=torch.uint8), torch.randint(0, 256, (5000,), dtype=torch.uint8),
                 b"\x00" * 32, 2)
    guarded = _NoTrain(**{f.name: getattr(src, f.name) for f in dataclasses.fields(src)})
    with pytest.raises(AssertionError, match="read the 'train' split"):
        guarded.batch("train", 0, 0, 1, 8, 0)  # the guard works
    pipe = LocalPipeline(PRESETS["tiny"], 2, "dense")
    loss = pipe.evaluate(guarded, 2, 2)
    assert loss == pytest.approx(pipe.evaluate(src, 2, 2))


def test_large_vocabulary_stores_uint32_ids(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "synthetic:0")
    assert prepare(spec, 70_000).meta["dtype"] == "<u4"
    assert load_prepared(spec, 70_000).train.dtype == torch.uint32
    with pytest.raises(DataError, match="needs <u2"):
        load_prepared(spec, 256)  # prepared for another id dtype


# -- bad input: one line naming the field and the fix ---------------------------------------------------------


def test_manifest_mismatch_names_both_hashes(tmp_path: Path) -> None:
    spec = dataclasses.replace(_spec(tmp_path, "synthetic:0"), manifest_hash="ab" * 32)
    with pytest.raises(DataError) as ei:
        prepare(spec, 256)
    msg = str(ei.value)
    assert "[data] manifest_hash" in msg and "ab" * 32 in msg and manifest_hash(read_documents("synthetic:0")) in msg
    assert "\n" not in msg


def test_tokenizer_hash_mismatch_names_both(tmp_path: Path, bpe: tuple[BpeTokenizer, Path]) -> None:
    tok, path = bpe
    spec = _spec(tmp_path, "synthetic:0", tokenizer="bpe", tokenizer_path=str(path), tokenizer_hash="cd" * 32)
    with pytest.raises(DataError, match=f"tokenizer_hash: the spec pins 0x{'cd' * 32} but .* hashes to 0x{tok.content_hash}"):
        prepare(spec, 384)
    assert not (tmp_path / "prep").exists()  # nothing written


def test_vocabulary_larger_than_the_model(tmp_path: Path, bpe: tuple[BpeTokenizer, Path]) -> None:
    tok, path = bpe
    spec = _spec(tmp_path, "synthetic:0", tokenizer="bpe", tokenizer_path=str(path), tokenizer_hash=tok.content_hash)
    with pytest.raises(DataError, match=r"\[model\] vocab_size=256 is smaller than the bpe tokenizer's 384 ids"):
        prepare(spec, 256)
    with pytest.raises(DataError, match="does not fit uint32"):
        prepare(_spec(tmp_path, "synthetic:0"), 2**32 + 1)


@pytest.mark.parametrize(("changes", "match"), [
    ({"tokenizer": "wordpiece"}, r"\[data\] tokenizer='wordpiece' is unknown: use one of byte, bpe"),
    ({"manifest_hash": "xyz"}, r"\[data\] manifest_hash='xyz' must be 64 lower-case hex digits: run `pmn data manifest"),
    ({"tokenizer": "bpe"}, r"\[data\] tokenizer_hash='' must be 64"),
    ({"val_percent": 0}, r"\[data\] val_percent=0 must be an integer in 1..50"),
])
def test_bad_data_fields(changes: dict, match: str) -> None:
    with pytest.raises(DataError, match=match):
        DataSpec(**{"manifest_hash": "00" * 32, **changes}).validate()
    with pytest.raises(DataError, match=r"unknown field\(s\) colour"):
        DataSpec.from_dict({"colour": 1})


def test_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"\[data\] source '/nonexistent/x' does not exist: fix the path"):
        read_documents("/nonexistent/x")
    with pytest.raises(DataError, match=r"tokenizer file '/nonexistent/t.json' does not exist"):
        BpeTokenizer.from_file("/nonexistent/t.json")
    spec = _spec(tmp_path, "synthetic:0")
    with pytest.raises(DataError, match="run `pmn data prepare SPEC` first"):
        load_prepared(spec, 256)
    with pytest.raises(DataError, match="does not exist"):
        load_data_spec(tmp_path / "none.json")


def test_tampered_token_file_is_refused(tmp_path: Path) -> None:
    spec = _spec(tmp_path, "synthetic:0")
    prepare(spec, 256)
    path = spec.prepared_path() / "train.bin"
    raw = bytearray(path.read_bytes())
    raw[10] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="train.bin hashes to 0x"):
        load_prepared(spec, 256)


def test_jsonl_source(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": f"row {i} " * 30}) + "\n" for i in range(50)))
    spec = _spec(tmp_path, str(path))
    assert prepare(spec, 256).meta["num_documents"] == 50
    path.write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match="has no string field 'text': set \\[data\\] text_field"):
        read_documents(str(path))
