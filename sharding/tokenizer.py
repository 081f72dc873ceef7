"""Tokenizers a model can be proposed with: raw bytes, or a byte-level BPE (Hugging Face `tokenizers`).

A tokenizer is named in the spec by its kind and, for BPE, by the content hash of its `tokenizer.json`
(sha256 of the file's canonical JSON: sorted keys, no spaces), so two files that differ only in
formatting hash the same and any change to the vocabulary, merges or normalisation does not.
BPE training is local and deterministic (same documents, same vocabulary size -> same hash); nothing
is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .errors import DataError

TOKENIZER_KINDS = ("byte", "bpe")
# content hash of the byte-level tokenizer (it has no file): sha256 of its name and version
BYTE_TOKENIZER_HASH = hashlib.sha256(b"pmn byte-level tokenizer v1: id = byte value, vocab 256").hexdigest()
# end-of-document token of every BPE tokenizer trained here (separates documents in the token stream)
EOT = "<|endoftext|>"
# byte sequence separating documents in the byte-level stream
BYTE_SEP = b"\n\x00\n"
# smallest BPE vocabulary: the 256 byte symbols plus the end-of-document token
MIN_BPE_VOCAB = 257


class Tokenizer(Protocol):
    """What the data pipeline and inference need from a tokenizer."""

    @property
    def kind(self) -> str:
        """"byte" or "bpe"."""
        ...

    @property
    def vocab_size(self) -> int:
        """Number of ids it produces (ids lie in [0, vocab_size))."""
        ...

    @property
    def content_hash(self) -> str:
        """sha256 hex pinned in the spec's [data] tokenizer_hash."""
        ...

    def encode_documents(self, documents: Sequence[bytes]) -> list[int]:
        """One token stream of `documents`, separated by the tokenizer's document separator."""
        ...

    def encode(self, text: str) -> list[int]:
        """Ids of `text` (a prompt)."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` (ids it does not know are skipped)."""
        ...


@dataclass(frozen=True)
class ByteTokenizer:
    """Raw bytes: id = byte value, vocabulary 256, documents joined by BYTE_SEP."""

    kind: str = "byte"  # tokenizer kind
    vocab_size: int = 256  # one id per byte value
    content_hash: str = BYTE_TOKENIZER_HASH  # fixed: the byte-level tokenizer has no file

    def encode_documents(self, documents: Sequence[bytes]) -> list[int]:
        return list(BYTE_SEP.join(documents))

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


def canonical_hash(tokenizer_json: str) -> str:
    """sha256 hex of a tokenizer.json's canonical JSON (sorted keys, no spaces)."""
    try:
        data = json.loads(tokenizer_json)
    except json.JSONDecodeError as exc:
        raise DataError(f"tokenizer file is not JSON: {exc}") from None
    canon = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return hashlib.sha256(canon).hexdigest()


class BpeTokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` (any byte sequence encodes: no unknown token)."""

    kind = "bpe"

    def __init__(self, inner: Any, source: str = "") -> None:
        self.inner = inner  # tokenizers.Tokenizer
        self.source = source  # where it came from (a path, or "trained")
        self.vocab_size: int = int(inner.get_vocab_size(with_added_tokens=True))
        self.content_hash: str = canonical_hash(inner.to_str())
        self.eot_id: int | None = inner.token_to_id(EOT)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> BpeTokenizer:
        """Load a tokenizer.json; DataError names the file when it is missing or not a tokenizer."""
        p = Path(path).expanduser()
        if not p.is_file():
            raise DataError(f"tokenizer file {str(p)!r} does not exist: train one with `pmn data tokenizer` "
                            "or fix [data] tokenizer_path")
        from tokenizers import Tokenizer as HfTokenizer

        try:
            inner = HfTokenizer.from_str(p.read_text())
        except Exception as exc:  # noqa: BLE001 - the library raises plain Exception subclasses
            raise DataError(f"{p} is not a Hugging Face tokenizer.json: {exc}") from None
        return cls(inner, str(p))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write tokenizer.json (pretty-printed; the content hash does not depend on formatting)."""
        p = Path(path).expanduser()
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(self.inner.to_str(pretty=True))
        return p

    def encode_documents(self, documents: Sequence[bytes]) -> list[int]:
        texts = [d.decode("utf-8", errors="replace") for d in documents]
        out: list[int] = []
        for i, enc in enumerate(self.inner.encode_batch(texts, add_special_tokens=False)):
            if i and self.eot_id is not None:
                out.append(self.eot_id)
            out.extend(enc.ids)
        return out

    def encode(self, text: str) -> list[int]:
        return list(self.inner.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.inner.decode([i for i in ids if 0 <= i < self.vocab_size], skip_special_tokens=True))


def train_bpe(documents: Iterable[bytes], vocab_size: int, min_frequency: int = 2) -> BpeTokenizer:
    """Train a byte-level BPE of `vocab_size` ids (256 byte symbols + EOT + merges) on `documents`.

    Deterministic: the same documents in the same order and the same arguments give the same content hash.
    """
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < MIN_BPE_VOCAB:
        raise DataError(f"vocab_size={vocab_size!r}: a byte-level BPE needs at least {MIN_BPE_VOCAB} ids "
                        "(256 bytes + end-of-document)")
    from tokenizers import Tokenizer as HfTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    inner = HfTokenizer(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    inner.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[EOT])
    texts = (d.decode("utf-8", errors="replace") for d in documents)
    inner.train_from_iterator(texts, trainer=trainer)
    return BpeTokenizer(inner, "trained")


def load_tokenizer(kind: str, path: str = "") -> Tokenizer:
    """The tokenizer of a [data] section: "byte", or "bpe" read from `path` (a tokenizer.json)."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        if not path:
            raise DataError("[data] tokenizer = 'bpe' needs tokenizer_path: a tokenizer.json "
                            "(train one with `pmn data tokenizer`)")
        return BpeTokenizer.from_file(path)
    raise DataError(f"[data] tokenizer={kind!r} is unknown: use one of {', '.join(TOKENIZER_KINDS)}")
