"""Durable receipt store: one sqlite file (WAL) in the node's data dir.

Each insert is one transaction. A receipt is verified before it is written, so a rejected input
changes nothing; a second receipt with the same replay key raises `ReplayError`. The replay key carries no
rollback generation: a hop this node re-runs after a rollback is refused, and its first run's receipt (and credit) kept.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from protocol.errors import ReplayError, SignatureError, StoreError
from protocol.receipts import (
    Domain,
    KeyRegistry,
    Receipt,
    SignedReceipt,
    verify_signed_receipt,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS receipts (
    model_id TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    step INTEGER NOT NULL,
    microbatch INTEGER NOT NULL,
    stage INTEGER NOT NULL,
    direction INTEGER NOT NULL,
    sender TEXT NOT NULL,
    receiver TEXT NOT NULL,
    payload_digest BLOB NOT NULL,
    tokens INTEGER NOT NULL,
    chain_id TEXT NOT NULL,
    verifying_contract TEXT NOT NULL,
    sender_signature BLOB NOT NULL,
    receiver_signature BLOB,
    rollback_gen INTEGER NOT NULL,
    rollback_step INTEGER NOT NULL,
    PRIMARY KEY (model_id, epoch, step, microbatch, stage, direction)
)
"""


@dataclass
class StoreConfig:
    """Where and how the receipt store keeps its file."""

    data_dir: Path  # the node's data directory; the store lives at data_dir / filename
    filename: str = "receipts.sqlite"  # sqlite file name inside data_dir
    busy_timeout_s: float = 5.0  # how long sqlite waits for a concurrent writer's lock


def open_durable_db(path: Path, filename: str, busy_timeout_s: float, schema: str, what: str) -> sqlite3.Connection:
    """`path/filename` opened for durable writes (WAL, synchronous=FULL, autocommit) with `schema` (one statement) applied;
    StoreError naming `what` and the directory when it cannot be."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path / filename, timeout=busy_timeout_s, isolation_level=None)
    except (OSError, sqlite3.Error) as exc:
        raise StoreError(f"cannot open {what} in {path}: {exc}") from exc
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute(schema)
    except sqlite3.Error as exc:
        db.close()
        raise StoreError(f"cannot open {what} in {path}: {exc}") from exc
    return db


class ReceiptStore:
    """Verified, replay-free receipts of one node, keyed by (modelId, epoch, step, microbatch, stage, direction)."""

    def __init__(self, config: StoreConfig, domain: Domain, registry: KeyRegistry) -> None:
        if config.busy_timeout_s <= 0:
            raise ValueError("StoreConfig.busy_timeout_s must be > 0 (seconds to wait for a lock)")
        self.domain = domain
        self.registry = registry
        self._db = open_durable_db(Path(config.data_dir), config.filename, config.busy_timeout_s, _SCHEMA,
                                   "the receipt store")
        self.path = Path(config.data_dir) / config.filename

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    def __enter__(self) -> ReceiptStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, signed: SignedReceipt, require_cosigned: bool = False) -> None:
        """Verify and insert `signed`; a duplicate key raises `ReplayError` and leaves the row as it was."""
        verify_signed_receipt(signed, self.domain, self.registry, require_cosigned)
        r = signed.receipt
        try:
            self._db.execute(
                "INSERT INTO receipts VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    str(r.model_id), r.epoch, r.step, r.microbatch, r.stage, r.direction, r.sender, r.receiver,
                    r.payload_digest, r.tokens, str(signed.domain.chain_id), signed.domain.verifying_contract,
                    signed.sender_signature, signed.receiver_signature, r.rollback_gen, r.rollback_step,
                ),
            )
        except sqlite3.IntegrityError as exc:
            raise ReplayError(
                "receipt",
                f"a receipt for (modelId={r.model_id}, epoch={r.epoch}, step={r.step}, microbatch={r.microbatch}, "
                f"stage={r.stage}, direction={r.direction}) is already stored",
            ) from exc

    def add_countersignature(self, signed: SignedReceipt) -> None:
        """Record the receiver's signature on a stored receipt with identical content.

        Rejected (and nothing changed) if no such receipt is stored, its content differs, it is already
        countersigned, or the countersignature does not verify.
        """
        verify_signed_receipt(signed, self.domain, self.registry, require_cosigned=True)
        r = signed.receipt
        stored = self.get(r.key)
        if stored is None:
            raise SignatureError("receipt", "no stored receipt with this key to countersign")
        if stored.receipt != r or stored.sender_signature != signed.sender_signature:
            raise ReplayError("receipt", "the stored receipt with this key has different content")
        if stored.receiver_signature is not None:
            raise ReplayError("receiverSignature", "the stored receipt is already countersigned")
        self._db.execute(
            "UPDATE receipts SET receiver_signature=? WHERE model_id=? AND epoch=? AND step=? AND microbatch=? "
            "AND stage=? AND direction=? AND receiver_signature IS NULL",
            (signed.receiver_signature, str(r.model_id), r.epoch, r.step, r.microbatch, r.stage, r.direction),
        )

    def get(self, key: tuple[int, int, int, int, int, int]) -> SignedReceipt | None:
        """The stored receipt with replay key `key`, or None."""
        rows = self._select(
            "WHERE model_id=? AND epoch=? AND step=? AND microbatch=? AND stage=? AND direction=?",
            (str(key[0]), *key[1:]),
        )
        return rows[0] if rows else None

    def epoch_receipts(self, model_id: int, epoch: int, cosigned_only: bool = False) -> list[SignedReceipt]:
        """All stored receipts of one epoch, in key order."""
        where = "WHERE model_id=? AND epoch=?" + (" AND receiver_signature IS NOT NULL" if cosigned_only else "")
        return self._select(where + " ORDER BY step, microbatch, stage, direction", (str(model_id), epoch))

    def count(self) -> int:
        """Number of stored receipts."""
        return int(self._db.execute("SELECT COUNT(*) FROM receipts").fetchone()[0])

    def _select(self, where: str, args: tuple[object, ...]) -> list[SignedReceipt]:
        rows = self._db.execute(
            "SELECT model_id, epoch, step, microbatch, stage, direction, sender, receiver, payload_digest, tokens, "
            "chain_id, verifying_contract, sender_signature, receiver_signature, rollback_gen, rollback_step FROM receipts "
            + where,
            args,
        ).fetchall()
        out = []
        for row in rows:
            receipt = Receipt(int(row[0]), row[1], row[2], row[3], row[4], row[5], row[6], row[7], bytes(row[8]),
                              row[9], row[14], row[15])
            out.append(
                SignedReceipt(
                    receipt,
                    Domain(int(row[10]), row[11]),
                    bytes(row[12]),
                    None if row[13] is None else bytes(row[13]),
                )
            )
        return out
