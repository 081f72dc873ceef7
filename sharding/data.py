"""Byte-level corpora present on every machine, split deterministically, served as token windows."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DataError
from .seeding import generator

# percentage of files (by hash of their relative path) that go to the validation split
VAL_PERCENT = 5
# directories never read from the interpreter's stdlib tree
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
# separator between concatenated files
_SEP = b"\n\x00\n"


@dataclass(frozen=True)
class Corpus:
    """Token streams (uint8 bytes as torch.uint8) for the train and val splits."""

    name: str  # where the text came from ("stdlib", a directory path, "hf:<name>", "synthetic:<seed>")
    train: torch.Tensor  # 1-D uint8 tensor of training bytes
    val: torch.Tensor  # 1-D uint8 tensor of validation bytes
    manifest_hash: bytes  # sha256 over the sorted (relative path, sha256 of file) list
    num_files: int  # number of source documents read
    vocab_size: int = 256  # byte-level

    def split(self, split: str) -> torch.Tensor:
        """The token stream of `split` ("train" or "val")."""
        if split == "train":
            return self.train
        if split == "val":
            return self.val
        raise ValueError(f"split={split!r}: use 'train' or 'val'")

    def batch(
        self, split: str, step: int, microbatch: int, batch_size: int, seq_len: int, seed: int
    ) -> torch.Tensor:
        """Token windows (batch_size, seq_len + 1) int64, a pure function of the arguments."""
        data = self.split(split)
        for name, value, low in (
            ("step", step, 0),
            ("microbatch", microbatch, 0),
            ("batch_size", batch_size, 1),
            ("seq_len", seq_len, 1),
            ("seed", seed, 0),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"Corpus.batch: {name}={value!r} must be an integer >= {low}")
        n = int(data.numel()) - (seq_len + 1)
        if n < 1:
            raise DataError(
                f"corpus {self.name!r} {split} split has {data.numel()} tokens, too few for seq_len={seq_len}"
            )
        g = generator(seed, "batch", split, step, microbatch)
        starts = torch.randint(0, n + 1, (batch_size,), generator=g)
        idx = starts.unsqueeze(1) + torch.arange(seq_len + 1).unsqueeze(0)
        return data[idx].long()


def hash_documents(entries: list[tuple[str, bytes]]) -> bytes:
    """sha256 over the (name, sha256 of content) list, in the given order (the manifest hash)."""
    h = hashlib.sha256()
    for rel, content in entries:
        h.update(rel.encode() + b"\x00" + hashlib.sha256(content).digest())
    return h.digest()


def corpus_from_documents(name: str, entries: list[tuple[str, bytes]]) -> Corpus:
    """Build a corpus from (relative path, content) pairs; the split is by hash of the path."""
    if not entries:
        raise DataError(f"corpus {name!r}: no documents found")
    entries = sorted(entries)
    train_parts: list[bytes] = []
    val_parts: list[bytes] = []
    for rel, content in entries:
        bucket = hashlib.sha256(rel.encode()).digest()[0] * 100 // 256
        (val_parts if bucket < VAL_PERCENT else train_parts).append(content)
    if not train_parts or not val_parts:
        # too few files for a file-level split: split the concatenation 90/10 instead
        whole = _SEP.join(c for _, c in entries)
        cut = len(whole) * 9 // 10
        train_bytes, val_bytes = whole[:cut], whole[cut:]
    else:
        train_bytes, val_bytes = _SEP.join(train_parts), _SEP.join(val_parts)
    return Corpus(
        name=name,
        train=torch.frombuffer(bytearray(train_bytes), dtype=torch.uint8),
        val=torch.frombuffer(bytearray(val_bytes), dtype=torch.uint8),
        manifest_hash=hash_documents(entries),
        num_files=len(entries),
    )


def _read_tree(root: Path, suffixes: tuple[str, ...] | None, skip: set[str]) -> list[tuple[str, bytes]]:
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("."))
        for fn in sorted(filenames):
            if suffixes is not None and not fn.endswith(suffixes):
                continue
            path = Path(dirpath) / fn
            try:
                content = path.read_bytes()
            except OSError:
                continue
            if b"\x00" in content:  # binary file
                continue
            entries.append((path.relative_to(root).as_posix(), content))
    return entries


def stdlib_documents() -> list[tuple[str, bytes]]:
    """The running interpreter's standard-library .py sources (no site-packages) as (path, content) pairs."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return _read_tree(root, (".py",), _SKIP_DIRS)


def stdlib_corpus() -> Corpus:
    """The running interpreter's standard-library .py sources (no site-packages)."""
    return corpus_from_documents("stdlib", stdlib_documents())


def directory_documents(path: str | os.PathLike[str]) -> list[tuple[str, bytes]]:
    """Every text file (no NUL byte) under a user-given directory, as (relative path, content) pairs."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"corpus directory {str(root)!r} does not exist or is not a directory")
    return _read_tree(root, None, {"__pycache__"})


def directory_corpus(path: str | os.PathLike[str]) -> Corpus:
    """Every text file (no NUL byte) under a user-given directory."""
    return corpus_from_documents(str(Path(path)), directory_documents(path))


def hf_corpus(name: str, text_field: str = "text") -> Corpus:
    """A Hugging Face dataset saved locally (load_from_disk path or cached name); needs `datasets`."""
    if importlib.util.find_spec("datasets") is None:
        raise DataError("hf corpus requested but the `datasets` package is not installed")
    import datasets  # type: ignore[import-not-found]

    try:
        ds = datasets.load_from_disk(name) if Path(name).exists() else datasets.load_dataset(name)
    except Exception as exc:  # noqa: BLE001 - report any loader failure as a DataError
        raise DataError(f"could not load Hugging Face dataset {name!r} locally: {exc}") from exc
    entries: list[tuple[str, bytes]] = []
    splits = ds.items() if hasattr(ds, "items") else [("data", ds)]
    for split_name, part in splits:
        for i, row in enumerate(part):
            entries.append((f"{split_name}/{i:09d}", str(row[text_field]).encode()))
    return corpus_from_documents(f"hf:{name}", entries)


def synthetic_corpus(seed: int = 0, num_docs: int = 160, words_per_doc: int = 250) -> Corpus:
    """Deterministic pseudo-English text from Python's `random.Random` (stable across platforms)."""
    return corpus_from_documents(f"synthetic:{seed}", synthetic_documents(seed, num_docs, words_per_doc))


def synthetic_documents(seed: int = 0, num_docs: int = 160, words_per_doc: int = 250) -> list[tuple[str, bytes]]:
    """The documents of `synthetic_corpus` as (name, content) pairs."""
    rng = random.Random(seed)
    syll = ["ka", "lo", "mi", "te", "ru", "sa", "no", "vi", "de", "po", "an", "el", "is", "or", "ut"]
    vocab = ["".join(rng.choice(syll) for _ in range(rng.randint(1, 3))) for _ in range(300)]
    entries = []
    for d in range(num_docs):
        words = []
        prev = rng.randrange(len(vocab))
        for w in range(words_per_doc):
            # a first-order chain: each word prefers a few successors, so the text is learnable
            prev = (prev * 7 + rng.choice((1, 2, 3, 5, rng.randrange(len(vocab))))) % len(vocab)
            words.append(vocab[prev] + ("." if w % 11 == 10 else ""))
        entries.append((f"doc{d:04d}.txt", (" ".join(words) + "\n").encode()))
    return entries


_CACHE: dict[str, Corpus] = {}


def load_corpus(source: str | os.PathLike[str] | None = None) -> Corpus:
    """None or "stdlib": the interpreter's stdlib; "synthetic[:seed]"; "hf:<name>"; else a directory."""
    key = "stdlib" if source is None else str(source)
    if key in _CACHE:
        return _CACHE[key]
    if key == "stdlib":
        corpus = stdlib_corpus()
    elif key.startswith("synthetic"):
        _, _, s = key.partition(":")
        corpus = synthetic_corpus(int(s) if s else 0)
    elif key.startswith("hf:"):
        corpus = hf_corpus(key[3:])
    else:
        corpus = directory_corpus(key)
    _CACHE[key] = corpus
    return corpus
