"""The dataset a model trains on, pinned by content: a document manifest, a tokenizer, token files per split.

A proposal's `[data]` section (`DataSpec`) names where the documents are locally (`source`, not hashed:
paths differ between machines) and pins what they must be: the manifest hash (sha256 over the sorted
(document name, sha256 of its content) list), the tokenizer (kind and content hash) and the validation
share. `prepare` reads the documents once, checks both hashes, splits them by the hash of each
document's *content* (so a document and its copies all land on one side: the validation split cannot
overlap training), tokenizes each split into one flat little-endian uint16/uint32 file (uint32 when the
vocabulary exceeds 65,536) and writes `meta.json` with the hashes and the files' sha256. `load_prepared`
memory-maps those files (numpy memmap) as a `Corpus` after checking every hash, so a node refuses data
that differs from the spec before any weight is allocated. Sampling is `Corpus.batch`: a pure function of
(seed, split, step, microbatch).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import Corpus, directory_documents, hash_documents, stdlib_documents, synthetic_documents
from .errors import DataError
from .tokenizer import TOKENIZER_KINDS, ByteTokenizer, Tokenizer, load_tokenizer

# fields of DataSpec the spec hash covers (the rest are local: where this machine keeps the files)
HASHED_FIELDS = ("manifest_hash", "tokenizer", "tokenizer_hash", "val_percent", "text_field", "max_mb")
# default directory of prepared token files (one sub-directory per data hash)
DEFAULT_PREPARED_DIR = "~/.pmn/data"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
META_FILE = "meta.json"
SPLITS = ("train", "val")


@dataclass(frozen=True)
class DataSpec:
    """A proposal's [data] section: which documents, which tokenizer, which validation share."""

    source: str = "stdlib"  # local, not hashed: "stdlib", "synthetic[:SEED]", a directory, a .jsonl or .parquet file
    manifest_hash: str = ""  # sha256 hex of the document manifest (`pmn data manifest SOURCE` prints it)
    tokenizer: str = "byte"  # "byte" (ids = bytes, vocab 256) or "bpe" (a tokenizer.json)
    tokenizer_path: str = ""  # local, not hashed: the tokenizer.json of a bpe tokenizer
    tokenizer_hash: str = ""  # sha256 hex of the tokenizer's canonical JSON (bpe; `pmn data tokenizer` prints it)
    val_percent: int = 5  # share of documents (by hash of their content) in the validation split, 1..50
    text_field: str = "text"  # jsonl / parquet column holding each document's text
    max_mb: int = 0  # train on an evenly strided sample of the manifest's documents of at most this many MiB (0 = all)
    prepared_dir: str = ""  # local, not hashed: where token files live ("" = ~/.pmn/data)

    def validate(self) -> DataSpec:
        """Check the fields alone (no file is read); DataError names the field and the fix."""
        if self.tokenizer not in TOKENIZER_KINDS:
            raise DataError(f"[data] tokenizer={self.tokenizer!r} is unknown: use one of {', '.join(TOKENIZER_KINDS)}")
        if not _HEX64.match(self.manifest_hash):
            raise DataError(f"[data] manifest_hash={self.manifest_hash!r} must be 64 lower-case hex digits: run "
                            f"`pmn data manifest {self.source}` and copy its manifest_hash")
        if self.tokenizer == "bpe" and not _HEX64.match(self.tokenizer_hash):
            raise DataError(f"[data] tokenizer_hash={self.tokenizer_hash!r} must be 64 lower-case hex digits: "
                            "`pmn data tokenizer` prints the hash of the file it trains")
        if self.tokenizer == "byte" and self.tokenizer_hash:
            raise DataError("[data] tokenizer_hash is for tokenizer = 'bpe': remove it for the byte-level tokenizer")
        if not isinstance(self.val_percent, int) or isinstance(self.val_percent, bool) \
                or not 1 <= self.val_percent <= 50:
            raise DataError(f"[data] val_percent={self.val_percent!r} must be an integer in 1..50")
        if not isinstance(self.max_mb, int) or isinstance(self.max_mb, bool) or self.max_mb < 0:
            raise DataError(f"[data] max_mb={self.max_mb!r} must be an integer >= 0 (0 = every document)")
        if not self.source:
            raise DataError("[data] source is empty: name 'stdlib', 'synthetic', a directory or a .jsonl file")
        return self

    def hashed(self) -> dict[str, Any]:
        """The fields the spec hash covers."""
        return {name: getattr(self, name) for name in HASHED_FIELDS}

    def data_hash(self) -> str:
        """sha256 hex of the hashed fields (names the prepared directory; equal specs share their files)."""
        return hashlib.sha256(json.dumps(self.hashed(), sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def prepared_path(self) -> Path:
        """Directory of this spec's token files."""
        return Path(self.prepared_dir or DEFAULT_PREPARED_DIR).expanduser() / self.data_hash()[:32]

    def to_dict(self) -> dict[str, Any]:
        """Every field (JSON for the node)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "[data]") -> DataSpec:
        """Build from a table; unknown fields raise DataError naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise DataError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise DataError(f"{where}: {exc}") from None


def jsonl_documents(path: Path, text_field: str) -> list[tuple[str, bytes]]:
    """One document per line of a JSON-lines file: (line number, UTF-8 of row[text_field])."""
    out = []
    with path.open("rb") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{i + 1} is not JSON: {exc}") from None
            if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                raise DataError(f"{path}:{i + 1} has no string field {text_field!r}: set [data] text_field")
            out.append((f"{i:09d}", row[text_field].encode()))
    return out


def parquet_documents(path: Path, text_field: str) -> list[tuple[str, bytes]]:
    """One document per row of a parquet file's `text_field` column (needs pyarrow, not a dependency)."""
    try:
        import pyarrow.parquet as pq  # type: ignore[import-not-found]
    except ImportError:
        raise DataError(f"[data] source {str(path)!r} is parquet, which needs pyarrow: pip install pyarrow") from None
    try:
        column = pq.read_table(path, columns=[text_field]).column(text_field).to_pylist()
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several unrelated types
        raise DataError(f"{path}: cannot read column {text_field!r}: {exc}") from None
    return [(f"{i:09d}", str(text).encode()) for i, text in enumerate(column)]


def read_documents(source: str, text_field: str = "text") -> list[tuple[str, bytes]]:
    """The documents of `source`, sorted by name; DataError names the source when it does not exist."""
    if source == "stdlib":
        docs = stdlib_documents()
    elif source == "synthetic" or source.startswith("synthetic:"):
        _, _, seed = source.partition(":")
        if seed and not seed.isdigit():
            raise DataError(f"[data] source={source!r}: the synthetic seed must be an integer, e.g. synthetic:0")
        docs = synthetic_documents(int(seed) if seed else 0)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise DataError(f"[data] source {source!r} does not exist: fix the path, or use 'stdlib' or 'synthetic'")
        if path.is_dir():
            docs = directory_documents(path)
        elif path.suffix == ".jsonl":
            docs = jsonl_documents(path, text_field)
        elif path.suffix == ".parquet":
            docs = parquet_documents(path, text_field)
        else:
            raise DataError(f"[data] source {source!r} is a file but neither .jsonl nor .parquet: "
                            "give a directory, a .jsonl or a .parquet file")
    if not docs:
        raise DataError(f"[data] source {source!r} holds no documents")
    return sorted(docs)


def manifest_hash(documents: Sequence[tuple[str, bytes]]) -> str:
    """sha256 hex over the sorted (name, sha256 of content) list (the corpus's `manifest_hash`)."""
    return hash_documents(sorted(documents)).hex()


def split_documents(documents: Sequence[tuple[str, bytes]], val_percent: int
                    ) -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]]]:
    """(train, val) by the sha256 of each document's content: equal documents share a split."""
    train: list[tuple[str, bytes]] = []
    val: list[tuple[str, bytes]] = []
    for name, content in documents:
        bucket = int.from_bytes(hashlib.sha256(content).digest()[:8], "big") % 100
        (val if bucket < val_percent else train).append((name, content))
    if not train or not val:
        raise DataError(f"{len(documents)} document(s) give an empty {'validation' if not val else 'training'} "
                        f"split at val_percent={val_percent}: add documents or change [data] val_percent")
    return train, val


def sample_documents(documents: Sequence[tuple[str, bytes]], max_bytes: int) -> list[tuple[str, bytes]]:
    """Every k-th document (k the smallest stride that keeps the total under `max_bytes`): deterministic."""
    total = sum(len(c) for _, c in documents)
    if max_bytes <= 0 or total <= max_bytes:
        return list(documents)
    stride = -(-total // max_bytes)
    return list(documents[::stride])


def id_dtype(vocab_size: int) -> np.dtype[Any]:
    """Storage (and wire) type of token ids: uint16 up to 65,536 ids, uint32 beyond."""
    if vocab_size > 2**32:
        raise DataError(f"vocabulary of {vocab_size} ids does not fit uint32 token ids: use at most 2**32")
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


def check_tokenizer(spec: DataSpec, vocab_size: int) -> Tokenizer:
    """Load the spec's tokenizer, check its hash and that its ids fit the model's `vocab_size`."""
    tok = load_tokenizer(spec.tokenizer, spec.tokenizer_path)
    if spec.tokenizer == "bpe" and tok.content_hash != spec.tokenizer_hash:
        raise DataError(f"[data] tokenizer_hash: the spec pins 0x{spec.tokenizer_hash} but {spec.tokenizer_path} "
                        f"hashes to 0x{tok.content_hash}: use the proposal's tokenizer.json")
    if tok.vocab_size > vocab_size:
        raise DataError(f"[model] vocab_size={vocab_size} is smaller than the {spec.tokenizer} tokenizer's "
                        f"{tok.vocab_size} ids: set vocab_size >= {tok.vocab_size}")
    id_dtype(vocab_size)
    return tok


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class PreparedData:
    """What `prepare` wrote."""

    path: Path  # directory of meta.json and the <split>.bin files
    meta: dict[str, Any]  # contents of meta.json


def prepare(spec: DataSpec, vocab_size: int, force: bool = False) -> PreparedData:
    """Tokenize the spec's documents once into `spec.prepared_path()`; reuses files whose meta matches.

    DataError (naming the field and both hashes) when the documents or the tokenizer differ from the spec.
    """
    spec.validate()
    tok = check_tokenizer(spec, vocab_size)
    out = spec.prepared_path()
    if not force and (out / META_FILE).exists():
        try:
            load_prepared(spec, vocab_size)
            return PreparedData(out, json.loads((out / META_FILE).read_text()))
        except DataError:
            pass  # stale or damaged: prepare again
    docs = read_documents(spec.source, spec.text_field)
    found = manifest_hash(docs)
    if found != spec.manifest_hash:
        raise DataError(f"[data] manifest_hash: the spec pins 0x{spec.manifest_hash} but source {spec.source!r} "
                        f"hashes to 0x{found} ({len(docs)} documents): point [data] source at the proposal's documents")
    used = sample_documents(docs, spec.max_mb * 2**20)
    train, val = split_documents(used, spec.val_percent)
    dt = id_dtype(vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {**spec.hashed(), "data_hash": spec.data_hash(), "vocab_size": vocab_size,
                            "tokenizer_vocab": tok.vocab_size, "dtype": dt.str, "num_documents": len(used)}
    for split, part in zip(SPLITS, (train, val), strict=True):
        ids = np.asarray(tok.encode_documents([c for _, c in part]), dtype=dt)
        tmp = out / f"{split}.bin.tmp"
        ids.tofile(tmp)
        os.replace(tmp, out / f"{split}.bin")
        meta[split] = {"documents": len(part), "tokens": int(ids.size), "sha256": _sha256_file(out / f"{split}.bin"),
                       "manifest_hash": manifest_hash(part)}
    tmp_meta = out / f"{META_FILE}.tmp"
    tmp_meta.write_text(json.dumps(meta, indent=1, sort_keys=True))
    os.replace(tmp_meta, out / META_FILE)
    return PreparedData(out, meta)


def load_prepared(spec: DataSpec, vocab_size: int, verify: bool = True) -> Corpus:
    """The prepared token files of `spec` as a memory-mapped Corpus, after checking every hash.

    DataError, naming both hashes and the fix, when the files are missing or were prepared from other
    documents, another tokenizer or another split; `verify` also re-hashes the token files.
    """
    spec.validate()
    out = spec.prepared_path()
    meta_path = out / META_FILE
    if not meta_path.exists():
        raise DataError(f"no prepared data for [data] (data hash 0x{spec.data_hash()}) in {out}: "
                        "run `pmn data prepare SPEC` first")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{meta_path} is damaged ({exc}): run `pmn data prepare SPEC --force`") from None
    for name in HASHED_FIELDS:
        if meta.get(name) != getattr(spec, name):
            raise DataError(f"[data] {name}: the spec pins {getattr(spec, name)!r} but the prepared data in {out} "
                            f"has {meta.get(name)!r}: run `pmn data prepare SPEC --force`")
    dt = id_dtype(vocab_size)
    if meta.get("dtype") != dt.str or int(meta.get("tokenizer_vocab", 0)) > vocab_size:
        raise DataError(f"prepared data in {out} holds {meta.get('dtype')} ids of a {meta.get('tokenizer_vocab')}-id "
                        f"tokenizer, the model's vocab_size={vocab_size} needs {dt.str}: run `pmn data prepare SPEC --force`")
    tensors: dict[str, torch.Tensor] = {}
    for split in SPLITS:
        path = out / f"{split}.bin"
        want = meta[split]
        if not path.exists() or path.stat().st_size != int(want["tokens"]) * dt.itemsize or not want["tokens"]:
            raise DataError(f"{path} is missing or not {want['tokens']} tokens long: run `pmn data prepare SPEC --force`")
        if verify:
            got = _sha256_file(path)
            if got != want["sha256"]:
                raise DataError(f"{path} hashes to 0x{got}, its meta.json says 0x{want['sha256']}: "
                                "run `pmn data prepare SPEC --force`")
        tensors[split] = torch.from_numpy(np.memmap(path, dtype=dt, mode="c"))
    return Corpus(name=f"{spec.source} ({spec.tokenizer})", train=tensors["train"], val=tensors["val"],
                  manifest_hash=bytes.fromhex(spec.manifest_hash), num_files=int(meta["num_documents"]),
                  vocab_size=int(meta["tokenizer_vocab"]))


def tokenizer_of(spec: DataSpec | None) -> Tokenizer:
    """The tokenizer a model with this [data] section speaks (byte-level without one); not hash-checked."""
    return ByteTokenizer() if spec is None else load_tokenizer(spec.tokenizer, spec.tokenizer_path)


def load_data_spec(path: str | os.PathLike[str]) -> DataSpec:
    """A DataSpec from a JSON file (what `pmn node start` hands the node)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"dataset file {str(p)!r} does not exist: pass the JSON `pmn node start` writes, or a spec")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{p} is not JSON: {exc}") from None
    return DataSpec.from_dict(data, str(p)).validate()
