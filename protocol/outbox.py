"""Durable chain outbox: every chain write is recorded before it is sent, and sent exactly once.

One sqlite file (WAL) beside the receipt store. A write (epoch root, leaf claim, revenue deposit = inference
fee payment, revenue claim) enters as an entry with an idempotency key; `flush` sends what is queued, in
order. While the RPC endpoint is down (`ChainUnavailableError`, a receipt that never came) the entry stays
queued and the next pass waits a growing backoff (`retry_interval_s` doubled up to `max_backoff_s`). Before
each send the chain is asked whether the write already happened (root on chain, leaf claimed, a
`RevenueDeposited` event for the request id, the holder's `claimedOf` grown past the baseline read before the
first send), so a send whose answer was lost is never repeated. A revert that is not "already done" is a real
refusal: the entry is marked refused with the contract error's name and never retried.

Signing keys are never written: the outbox is given the accounts (`signers`) whose entries it may send.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address
from web3 import Web3

from contracts.chain import CONNECTION_ERRORS, ClosableHTTPProvider, disconnect, endpoint_of
from contracts.client import ProtocolContracts
from contracts.config import ChainConfig
from contracts.deploy import Deployment
from contracts.errors import ChainUnavailableError, ContractRevertError, ContractsError, ReceiptTimeoutError
from protocol.errors import OutboxError, OutboxRefusedError, OutboxTimeoutError
from protocol.store import open_durable_db

log = logging.getLogger("protocol.outbox")

ROOT, CLAIM, DEPOSIT, CLAIM_REVENUE = "root", "claim", "deposit", "claim_revenue"
KINDS = (ROOT, CLAIM, DEPOSIT, CLAIM_REVENUE)
QUEUED, DONE, REFUSED = "queued", "done", "refused"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    sender TEXT NOT NULL,
    payload TEXT NOT NULL,
    state TEXT NOT NULL,
    baseline TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    uncertain INTEGER NOT NULL DEFAULT 0,
    sent INTEGER NOT NULL DEFAULT 0,
    result TEXT,
    error TEXT
)
"""
_UNCERTAIN: tuple[type[BaseException], ...] = (ChainUnavailableError, ReceiptTimeoutError, *CONNECTION_ERRORS)
_DEPOSIT_TOPIC = Web3.keccak(text="RevenueDeposited(bytes32,address,uint256,uint256)")


@dataclass
class OutboxConfig:
    """Where the outbox keeps its file and how it retries a chain that does not answer."""

    data_dir: Path  # directory of the outbox file (a node's data dir: beside receipts.sqlite)
    filename: str = "chain-outbox.sqlite"  # sqlite file name inside data_dir
    busy_timeout_s: float = 5.0  # how long sqlite waits for a concurrent writer's lock
    retry_interval_s: float = 0.5  # wait after the first pass the chain did not answer
    backoff_factor: float = 2.0  # each further consecutive failure multiplies the wait by this
    max_backoff_s: float = 10.0  # cap on the wait between two passes while the chain is down
    call_timeout_s: float = 5.0  # HTTP timeout of one JSON-RPC request of the outbox's own client
    connect_attempts: int = 2  # attempts per JSON-RPC request inside one pass (the passes retry the rest)
    receipt_timeout_s: float = 30.0  # wait for a sent transaction to be mined before counting it uncertain
    drain_timeout_s: float = 300.0  # longest `drain` waits for the queue to empty (OutboxTimeoutError after)

    def validate(self) -> OutboxConfig:
        """Raise ValueError naming the first bad field."""
        for name in ("busy_timeout_s", "retry_interval_s", "max_backoff_s", "call_timeout_s", "receipt_timeout_s",
                     "drain_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"OutboxConfig.{name} must be > 0")
        if self.backoff_factor < 1:
            raise ValueError("OutboxConfig.backoff_factor must be >= 1")
        if self.connect_attempts < 1:
            raise ValueError("OutboxConfig.connect_attempts must be >= 1")
        return self

    def backoff_s(self, failures: int) -> float:
        """Wait after `failures` consecutive passes the chain did not answer (>= 1)."""
        return min(self.max_backoff_s, self.retry_interval_s * self.backoff_factor ** max(0, failures - 1))


@dataclass
class Entry:
    """One recorded chain write."""

    seq: int  # insertion order (the send order)
    key: str  # idempotency key, e.g. "31337:0xLedger…/root:1:0", ".../claim:1:0:0xNode…", ".../deposit:1:0xRequest…"
    kind: str  # one of KINDS
    sender: str  # address of the account that signs it
    payload: dict[str, Any]  # the call's arguments (JSON)
    state: str  # QUEUED, DONE or REFUSED
    baseline: dict[str, Any] | None  # chain facts read before the first send (deposit: block; claim: claimedOf)
    attempts: int  # sends tried
    uncertain: int  # sends whose outcome was not known (the RPC went away)
    sent: int  # sends that returned a mined receipt (0 when the chain already had it; never above 1)
    result: dict[str, Any] | None  # what the write returned (tx hash, amount) or how it was found on chain
    error: str | None  # last failure: the contract error of a refusal, or the outage while queued


@dataclass
class FlushReport:
    """What one pass did."""

    done: list[str] = field(default_factory=list)  # keys written (sent now, or found on chain)
    refused: list[str] = field(default_factory=list)  # keys the chain refused (contract error, not retried)
    queued: int = 0  # entries still waiting (the chain went away during the pass)
    chain_down: str | None = None  # the outage that stopped the pass, if any


def outbox_client(rpc_url: str, deployment: Deployment, config: OutboxConfig) -> ProtocolContracts:
    """A contracts client of its own for the outbox: `call_timeout_s` per request, no probe at start (it must
    open while the chain is down). Close it with `contracts.chain.disconnect(client.w3)`."""
    w3 = Web3(ClosableHTTPProvider(rpc_url, request_kwargs={"timeout": config.call_timeout_s}))
    chain = ChainConfig(connect_attempts=config.connect_attempts, request_timeout_s=config.call_timeout_s,
                        receipt_timeout_s=config.receipt_timeout_s, backoff_max_s=config.max_backoff_s)
    return ProtocolContracts(w3, deployment, chain)


class ChainOutbox:
    """The durable, exactly-once queue of one process's chain writes (see the module doc); one thread at a time.

    Exactly once holds while the outbox is the only sender of its entries' writes for those accounts (another
    client claiming the same holder's revenue, say, would move the baseline it compares with)."""

    def __init__(self, config: OutboxConfig, client: ProtocolContracts, signers: Iterable[LocalAccount] = (),
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        self.config = config.validate()
        self.client = client
        self.signers: dict[str, LocalAccount] = {str(to_checksum_address(a.address)): a for a in signers}
        self.clock, self.sleep = clock, sleep
        self.failures = 0  # consecutive passes stopped by an outage
        self.retry_at = -float("inf")  # clock time before which `flush` does not try the chain again
        self.owns_client = False  # `open` made the client: `close` disconnects it
        # keys name the chain and the ledger, so one file never mixes up two deployments' writes
        self.scope = f"{client.chain_id}:{client.ledger.address}"
        path = Path(config.data_dir).expanduser()
        self._db = open_durable_db(path, config.filename, config.busy_timeout_s, _SCHEMA, "the chain outbox")
        self.path = path / config.filename

    @classmethod
    def open(cls, config: OutboxConfig, rpc_url: str, deployment: Deployment,
             signers: Iterable[LocalAccount] = ()) -> ChainOutbox:
        """An outbox with its own client (`outbox_client`), closed with the outbox."""
        client = outbox_client(rpc_url, deployment, config)
        try:
            box = cls(config, client, signers)
        except BaseException:
            disconnect(client.w3)
            raise
        box.owns_client = True
        return box

    def close(self) -> None:
        """Close the database (and the client `open` made)."""
        self._db.close()
        if self.owns_client:
            disconnect(self.client.w3)

    def __enter__(self) -> ChainOutbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_signer(self, account: LocalAccount) -> None:
        """Allow the outbox to send entries signed by `account`."""
        self.signers[str(to_checksum_address(account.address))] = account

    # -- recording ---------------------------------------------------------------------------------

    def enqueue(self, kind: str, key: str, sender: str, payload: dict[str, Any]) -> Entry:
        """Record a write (nothing is sent); the same key again returns the recorded entry, unchanged.

        OutboxError when the key was recorded with another kind, sender or payload."""
        if kind not in KINDS:
            raise OutboxError(f"unknown outbox entry kind {kind!r} (one of {', '.join(KINDS)})")
        sender = str(to_checksum_address(sender))
        text = json.dumps(payload, sort_keys=True)
        self._db.execute("INSERT OR IGNORE INTO outbox (key, kind, sender, payload, state) VALUES (?,?,?,?,?)",
                         (key, kind, sender, text, QUEUED))
        entry = self.get(key)
        assert entry is not None
        if (entry.kind, entry.sender, json.dumps(entry.payload, sort_keys=True)) != (kind, sender, text):
            raise OutboxError(f"outbox key {key} is already recorded with another {kind} write")
        return entry

    def submit_root(self, sender: str, model_id: int, epoch: int, root: bytes, total_units: int,
                    receipts_hash: bytes, signatures: list[bytes]) -> str:
        """Queue `submitEpochRoot`; its key."""
        key = f"{self.scope}/{ROOT}:{model_id}:{epoch}"
        self.enqueue(ROOT, key, sender, {"model_id": model_id, "epoch": epoch, "root": root.hex(),
                                         "total_units": total_units, "receipts_hash": receipts_hash.hex(),
                                         "signatures": [s.hex() for s in signatures]})
        return key

    def claim_leaf(self, sender: str, model_id: int, epoch: int, node: str, units: int, proof: list[bytes]) -> str:
        """Queue `claimLeaf`; its key."""
        node = to_checksum_address(node)
        key = f"{self.scope}/{CLAIM}:{model_id}:{epoch}:{node}"
        self.enqueue(CLAIM, key, sender, {"model_id": model_id, "epoch": epoch, "node": node, "units": units,
                                          "proof": [p.hex() for p in proof]})
        return key

    def deposit(self, sender: str, model_id: int, value_wei: int, request_id: bytes) -> str:
        """Queue a revenue deposit (an inference fee payment) for `request_id`; its key."""
        key = f"{self.scope}/{DEPOSIT}:{model_id}:0x{request_id.hex()}"
        self.enqueue(DEPOSIT, key, sender, {"model_id": model_id, "value_wei": value_wei,
                                            "request_id": request_id.hex()})
        return key

    def claim_revenue(self, sender: str, model_id: int, label: str) -> str:
        """Queue the holder's revenue claim; `label` names this claim among the holder's claims (e.g. "final")."""
        holder = to_checksum_address(sender)
        key = f"{self.scope}/{CLAIM_REVENUE}:{model_id}:{holder}:{label}"
        self.enqueue(CLAIM_REVENUE, key, holder, {"model_id": model_id})
        return key

    # -- reading -----------------------------------------------------------------------------------

    def get(self, key: str) -> Entry | None:
        """The entry recorded under `key`, or None."""
        rows = self._select("WHERE key=?", (key,))
        return rows[0] if rows else None

    def entries(self, state: str | None = None) -> list[Entry]:
        """Every entry (of one state), in send order."""
        return self._select("WHERE state=? ORDER BY seq", (state,)) if state else self._select("ORDER BY seq", ())

    def pending(self) -> int:
        """Entries still queued."""
        return int(self._db.execute("SELECT COUNT(*) FROM outbox WHERE state=?", (QUEUED,)).fetchone()[0])

    def result(self, key: str) -> dict[str, Any]:
        """The result of a written entry; OutboxError if it is not (yet) written."""
        entry = self.get(key)
        if entry is None or entry.state != DONE or entry.result is None:
            raise OutboxError(f"outbox entry {key} is {'unknown' if entry is None else entry.state}, not done")
        return entry.result

    # -- sending -----------------------------------------------------------------------------------

    def flush(self) -> FlushReport:
        """One pass over the queue, in order; stops at the first outage (the rest waits for the next pass).

        Within the backoff after an outage it does nothing and reports the queue as it is."""
        report = FlushReport()
        if self.clock() < self.retry_at:
            report.queued = self.pending()
            report.chain_down = "backing off after an outage"
            return report
        for entry in self.entries(QUEUED):
            try:
                self._write(entry)
            except _UNCERTAIN as exc:
                self.failures += 1
                self.retry_at = self.clock() + self.config.backoff_s(self.failures)
                report.chain_down = _one_line(exc)
                self._db.execute("UPDATE outbox SET error=? WHERE key=?", (report.chain_down, entry.key))
                log.warning("chain outbox: %s stays queued (%s); next pass in %.1f s", entry.key,
                            report.chain_down, self.config.backoff_s(self.failures))
                break
            except _Refused as exc:
                report.refused.append(entry.key)
                log.error("chain outbox: %s refused: %s", entry.key, exc)
                continue
            report.done.append(entry.key)
        else:
            self.failures = 0
        report.queued = self.pending()
        return report

    def drain(self, timeout_s: float | None = None) -> list[str]:
        """Flush until nothing is queued; the keys written. OutboxRefusedError when the chain refused any of
        the entries this call started with, OutboxTimeoutError (naming the outage) after `timeout_s`."""
        limit = self.config.drain_timeout_s if timeout_s is None else timeout_s
        deadline = self.clock() + limit
        started = {e.key for e in self.entries(QUEUED)}
        done: list[str] = []
        last_outage = ""
        while True:
            report = self.flush()
            done += report.done
            last_outage = report.chain_down or last_outage
            if report.queued == 0:
                break
            left = deadline - self.clock()
            if left <= 0:
                raise OutboxTimeoutError(f"{report.queued} chain write(s) still queued after {limit} s; last outage: "
                                         f"{last_outage}")
            self.sleep(max(0.0, min(left, self.retry_at - self.clock(), self.config.max_backoff_s)))
        refused = [e for e in self.entries(REFUSED) if e.key in started]
        if refused:
            raise OutboxRefusedError(refused[0].key, refused[0].error or "refused", len(refused))
        return done

    # -- one entry ---------------------------------------------------------------------------------

    def _write(self, entry: Entry) -> None:
        """Write one entry: read its baseline, look for it on chain, else send it once."""
        account = self.signers.get(entry.sender)
        if account is None:  # a setup error, not the chain's answer: the entry stays queued for an outbox that can
            raise OutboxError(f"chain write {entry.key} needs the signing account {entry.sender}, which was not "
                              "given to this outbox (signers / add_signer); it stays queued")
        if entry.baseline is None:
            entry.baseline = self._baseline(entry)
            self._db.execute("UPDATE outbox SET baseline=? WHERE key=?", (json.dumps(entry.baseline), entry.key))
        if entry.attempts and self._has_pending(entry.sender):
            # sent before (answer lost, or the process died before recording it) and a transaction of ours is
            # still in the pool: it may yet be this write; look again next pass
            raise ChainUnavailableError(endpoint_of(self.client.w3), 1, RuntimeError("own transaction still pending"))
        found = self._on_chain(entry)
        if found is not None:
            self._finish(entry, found, sent=False)
            return
        self._db.execute("UPDATE outbox SET attempts=attempts+1 WHERE key=?", (entry.key,))
        try:
            result = self._send(entry, account)
        except _UNCERTAIN as exc:
            self._db.execute("UPDATE outbox SET uncertain=uncertain+1, error=? WHERE key=?",
                             (_one_line(exc), entry.key))
            raise
        except ContractRevertError as exc:
            found = self._on_chain(entry)  # our own earlier, lost send, or another submitter's: done, not refused
            if found is not None:
                self._finish(entry, found, sent=False)
                return
            raise self._refuse(entry, f"{exc.error_name}: {exc}") from exc
        except ContractsError as exc:  # failed without revert data, bad input, nonce conflicts
            raise self._refuse(entry, f"{type(exc).__name__}: {exc}") from exc
        self._finish(entry, result, sent=True)

    def _finish(self, entry: Entry, result: dict[str, Any], sent: bool) -> None:
        self._db.execute("UPDATE outbox SET state=?, result=?, sent=sent+?, error=NULL WHERE key=?",
                         (DONE, json.dumps(result, sort_keys=True), int(sent), entry.key))

    def _refuse(self, entry: Entry, message: str) -> _Refused:
        self._db.execute("UPDATE outbox SET state=?, error=? WHERE key=?", (REFUSED, message, entry.key))
        return _Refused(message)

    def _has_pending(self, address: str) -> bool:
        w3, tx = self.client.w3, self.client.tx
        pending = tx.retry(lambda: w3.eth.get_transaction_count(address, "pending"))  # type: ignore[arg-type]
        latest = tx.retry(lambda: w3.eth.get_transaction_count(address, "latest"))  # type: ignore[arg-type]
        return int(pending) > int(latest)

    def _baseline(self, entry: Entry) -> dict[str, Any]:
        """Chain facts the 'already done?' check compares with, read before the first send."""
        c, p = self.client, entry.payload
        if entry.kind == DEPOSIT:
            return {"from_block": int(c.tx.retry(lambda: c.w3.eth.block_number))}
        if entry.kind == CLAIM_REVENUE:
            return {"claimed_wei": c.claimed(p["model_id"], entry.sender)}
        return {}

    def _on_chain(self, entry: Entry) -> dict[str, Any] | None:
        """The write as the chain already has it, or None when it has not happened."""
        c, p = self.client, entry.payload
        if entry.kind == ROOT:
            root = bytes.fromhex(p["root"])
            info = c.epoch_info(p["model_id"], p["epoch"])
            if info.submitted_at and info.root == root:
                return {"found": "root on chain", "submitted_at": info.submitted_at}
            if c.is_root_voided(p["model_id"], p["epoch"], root):
                return {"found": "root on chain, voided since"}
            if info.submitted_at:
                raise self._refuse(entry, f"ContributionLedgerEpochAlreadySubmitted: epoch {p['epoch']} of model "
                                          f"{p['model_id']} has another root 0x{info.root.hex()} on chain")
            return None
        if entry.kind == CLAIM:
            if c.is_leaf_claimed(p["model_id"], p["epoch"], p["node"]):
                return {"found": "leaf claimed"}
            return None
        if entry.kind == DEPOSIT:
            tx_hash = self._deposit_tx(entry)
            return None if tx_hash is None else {"tx_hash": tx_hash, "found": "RevenueDeposited event"}
        assert entry.baseline is not None
        claimed = c.claimed(p["model_id"], entry.sender)
        if claimed > int(entry.baseline["claimed_wei"]):
            return {"amount_wei": claimed - int(entry.baseline["claimed_wei"]), "found": "claimedOf grew"}
        return None

    def _deposit_tx(self, entry: Entry) -> str | None:
        """Hash of the sender's RevenueDeposited for the entry's request id since the baseline block."""
        c, p = self.client, entry.payload
        assert entry.baseline is not None
        token = c.token(p["model_id"])
        logs = c.tx.retry(lambda: c.w3.eth.get_logs({
            "address": token.address, "fromBlock": int(entry.baseline["from_block"]), "toBlock": "latest",
            "topics": [_DEPOSIT_TOPIC, "0x" + p["request_id"],
                       "0x" + bytes.fromhex(entry.sender[2:]).rjust(32, b"\0").hex()]}))
        return None if not logs else "0x" + bytes(logs[0]["transactionHash"]).hex()

    def _send(self, entry: Entry, account: LocalAccount) -> dict[str, Any]:
        c, p = self.client, entry.payload
        if entry.kind == ROOT:
            c.submit_epoch_root(account, p["model_id"], p["epoch"], bytes.fromhex(p["root"]), p["total_units"],
                                bytes.fromhex(p["receipts_hash"]), [bytes.fromhex(s) for s in p["signatures"]])
        elif entry.kind == CLAIM:
            c.claim_leaf(account, p["model_id"], p["epoch"], p["node"], p["units"],
                         [bytes.fromhex(x) for x in p["proof"]])
        elif entry.kind == DEPOSIT:
            tx_hash = c.deposit_revenue(account, p["model_id"], p["value_wei"], bytes.fromhex(p["request_id"]))
            return {"tx_hash": "0x" + tx_hash.hex()}
        else:
            return {"amount_wei": c.claim_revenue(p["model_id"], account)}
        assert c.last_tx is not None
        return {"tx_hash": "0x" + c.last_tx.tx_hash.hex()}

    def _select(self, where: str, args: tuple[object, ...]) -> list[Entry]:
        rows = self._db.execute(
            "SELECT seq, key, kind, sender, payload, state, baseline, attempts, uncertain, sent, result, error "
            "FROM outbox " + where, args).fetchall()
        return [Entry(r[0], r[1], r[2], r[3], json.loads(r[4]), r[5], None if r[6] is None else json.loads(r[6]),
                      r[7], r[8], r[9], None if r[10] is None else json.loads(r[10]), r[11]) for r in rows]


class _Refused(Exception):
    """An entry the chain refused (recorded as REFUSED); internal to a pass."""


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__
