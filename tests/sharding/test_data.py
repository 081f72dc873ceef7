import pytest
import torch

from sharding.data import Corpus, directory_corpus, hf_corpus, load_corpus, synthetic_corpus
from sharding.errors import DataError


def test_stdlib_corpus_is_deterministic_and_split():
    c = load_corpus()
    assert c.name == "stdlib" and c.num_files > 100
    assert c.train.dtype == torch.uint8 and c.train.numel() > 10 * c.val.numel() > 0
    assert len(c.manifest_hash) == 32
    b1 = c.batch("train", 3, 1, 4, 32, 0)
    b2 = c.batch("train", 3, 1, 4, 32, 0)
    assert b1.shape == (4, 33) and b1.dtype == torch.long
    assert torch.equal(b1, b2)
    assert not torch.equal(b1, c.batch("train", 3, 2, 4, 32, 0))
    assert not torch.equal(b1, c.batch("train", 4, 1, 4, 32, 0))
    assert not torch.equal(b1, c.batch("train", 3, 1, 4, 32, 1))
    assert int(c.batch("val", 0, 0, 8, 64, 0).max()) < 256


def test_directory_corpus(tmp_path):
    for i in range(30):
        (tmp_path / f"f{i:02d}.txt").write_text(f"document number {i} " * 20)
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01\x02")
    c = directory_corpus(tmp_path)
    assert c.num_files == 30
    assert c.val.numel() > 0 and c.train.numel() > 0
    again = load_corpus(str(tmp_path))
    assert again.manifest_hash == c.manifest_hash
    (tmp_path / "f00.txt").write_text("changed")
    assert directory_corpus(tmp_path).manifest_hash != c.manifest_hash


def test_single_file_directory_falls_back_to_byte_split(tmp_path):
    (tmp_path / "only.txt").write_text("abc " * 100)
    c = directory_corpus(tmp_path)
    assert c.train.numel() == 360 and c.val.numel() > 0


def test_bad_sources_and_requests(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        directory_corpus(tmp_path / "missing")
    with pytest.raises(DataError, match="no documents"):
        directory_corpus(tmp_path)
    with pytest.raises(DataError, match="dataset"):
        hf_corpus("wikitext")
    c = synthetic_corpus(0)
    with pytest.raises(ValueError, match="split"):
        c.batch("test", 0, 0, 1, 8, 0)
    with pytest.raises(ValueError, match="batch_size"):
        c.batch("train", 0, 0, 0, 8, 0)
    with pytest.raises(ValueError, match="step"):
        c.batch("train", -1, 0, 1, 8, 0)
    tiny = Corpus("t", torch.zeros(5, dtype=torch.uint8), torch.zeros(5, dtype=torch.uint8), b"\0" * 32, 1)
    with pytest.raises(DataError, match="too few"):
        tiny.batch("train", 0, 0, 1, 8, 0)


def test_synthetic_corpus_is_stable():
    a, b = synthetic_corpus(0), synthetic_corpus(0)
    assert torch.equal(a.train, b.train) and a.manifest_hash == b.manifest_hash
    assert a.manifest_hash != synthetic_corpus(1).manifest_hash
