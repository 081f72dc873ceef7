"""Researcher data commands: `pmn data manifest`, `pmn data tokenizer`, `pmn data prepare`.

The [data] section of a spec pins documents and tokenizer by content hash; these commands compute
those hashes (`manifest`, `tokenizer`) and tokenize a spec's documents once into memory-mapped token
files per split (`prepare`), which `pmn node start SPEC` then checks and trains on. Nothing downloads.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pmn.errors import CLIError
from pmn.spec import load_proposal
from sharding.dataset import (
    DataSpec,
    manifest_hash,
    prepare,
    read_documents,
    sample_documents,
    split_documents,
)
from sharding.errors import DataError
from sharding.tokenizer import train_bpe


def cmd_data_manifest(args: argparse.Namespace) -> int:
    """Print the manifest hash of a document source (what [data] manifest_hash pins)."""
    try:
        docs = read_documents(args.source, args.text_field)
    except DataError as exc:
        raise CLIError(str(exc)) from None
    print(json.dumps({"source": args.source, "manifest_hash": manifest_hash(docs), "documents": len(docs),
                      "bytes": sum(len(c) for _, c in docs)}))
    return 0


def cmd_data_tokenizer(args: argparse.Namespace) -> int:
    """Train a byte-level BPE on the training split of a source; write tokenizer.json; print its hash."""
    if args.out.exists() and not args.force:
        raise CLIError(f"{args.out} exists: pass --force to overwrite it, or another --out")
    start = time.perf_counter()
    try:
        docs = read_documents(args.source, args.text_field)
        # the training split of [data] with this max_mb and val_percent: validation documents never shape it
        train, _ = split_documents(sample_documents(docs, args.max_mb * 2**20), args.val_percent)
        tok = train_bpe([c for _, c in train], args.vocab_size, args.min_frequency)
    except DataError as exc:
        raise CLIError(str(exc).replace("vocab_size=", "--vocab-size=")) from None
    tok.save(args.out)
    print(json.dumps({"path": str(args.out), "tokenizer": "bpe", "tokenizer_hash": tok.content_hash,
                      "vocab_size": tok.vocab_size, "manifest_hash": manifest_hash(docs),
                      "train_documents": len(train), "seconds": round(time.perf_counter() - start, 2)}))
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    """Check a spec's documents and tokenizer against its hashes and write its token files once."""
    proposal = load_proposal(args.spec)
    if proposal.data is None:
        raise CLIError(f"{args.spec} has no [data] section: nodes train it on the byte-level corpus they are given; "
                       "add [data] (source, manifest_hash, tokenizer) to pin a dataset")
    data = proposal.data
    if args.prepared_dir is not None:
        from dataclasses import replace

        data = replace(data, prepared_dir=str(args.prepared_dir))
    start = time.perf_counter()
    try:
        prepared = prepare(data, proposal.model.vocab_size, force=args.force)
    except DataError as exc:
        raise CLIError(str(exc)) from None
    meta = prepared.meta
    print(json.dumps({"path": str(prepared.path), "data_hash": meta["data_hash"], "dtype": meta["dtype"],
                      "train_tokens": meta["train"]["tokens"], "val_tokens": meta["val"]["tokens"],
                      "train_documents": meta["train"]["documents"], "val_documents": meta["val"]["documents"],
                      "seconds": round(time.perf_counter() - start, 2)}))
    return 0



def local_bpe_data(root: Path, source: str, vocab_size: int, max_mb: int, val_percent: int = 5) -> DataSpec:
    """Train a BPE on the training split of `source` (an evenly strided sample of at most `max_mb` MiB, 0 = all),
    write root/tokenizer.json, tokenize that sample into root/data; return the [data] section pinning it all
    (what `pmn demo` proposes)."""
    docs = read_documents(source)
    train, _ = split_documents(sample_documents(docs, max_mb * 2**20), val_percent)
    tok = train_bpe([c for _, c in train], vocab_size)
    path = tok.save(root / "tokenizer.json")
    data = DataSpec(source=source, manifest_hash=manifest_hash(docs), tokenizer="bpe", tokenizer_path=str(path),
                    tokenizer_hash=tok.content_hash, val_percent=val_percent, max_mb=max_mb,
                    prepared_dir=str(root / "data"))
    prepare(data.validate(), vocab_size)
    return data
