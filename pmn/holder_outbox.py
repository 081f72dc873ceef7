"""The holder's durable chain outbox: `pmn infer`'s fee payments and `pmn claim`'s revenue claims.

One sqlite file per holder account in `HolderConfig.outbox_dir` holds a `protocol.outbox.ChainOutbox`: a
payment or a claim is recorded (with its request id, or a fresh claim label) before anything is sent, sent
exactly once, and looked for on chain before a send whose answer was lost is repeated. A command waits for
the chain at most `outbox_wait_s`; then it stops with one line saying what stays queued, and the next run
of the same command (or any command that drains the outbox) resumes it.

Which payment a `pmn infer` run uses, for one holder and model (and this deployment):
- an *open* payment first: a recorded deposit still queued (sent, answer lost, or not sent yet), or one on
  chain that no generation has used yet; the oldest one;
- else a new one: a fresh random request id, recorded, then sent.
A payment counts as *used* (and a later run pays anew) once the head stage has streamed the first token for
it (the head serves a request id once, and records it before the first token), or refused it as already
served, or when its recorded transaction is not on this chain (a chain reset). Used request ids are kept in
the `used_requests` table of the same file.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address

from contracts.chain import CONNECTION_ERRORS
from contracts.deploy import Deployment
from contracts.errors import ChainUnavailableError, ReceiptTimeoutError
from pmn.config import HolderConfig
from pmn.errors import CLIError
from protocol.errors import OutboxRefusedError, OutboxTimeoutError
from protocol.outbox import CLAIM_REVENUE, DEPOSIT, DONE, QUEUED, REFUSED, ChainOutbox, Entry, OutboxConfig
from protocol.store import open_durable_db

_USED_SCHEMA = "CREATE TABLE IF NOT EXISTS used_requests (key TEXT PRIMARY KEY, why TEXT NOT NULL)"


class OutboxQueuedError(CLIError):
    """A payment or claim is recorded but the chain did not take it within `outbox_wait_s`; a re-run resumes it."""


class OutboxRefusal(CLIError):
    """The chain refused a recorded payment or claim (a contract error); it is not retried."""


def outbox_config(cfg: HolderConfig, holder: str) -> OutboxConfig:
    """The ChainOutbox settings of `holder`'s outbox file, from the holder's config."""
    return OutboxConfig(data_dir=Path(cfg.outbox_dir).expanduser(), filename=f"{holder.lower()}.sqlite",
                        retry_interval_s=cfg.outbox_retry_interval_s, max_backoff_s=cfg.outbox_max_backoff_s,
                        call_timeout_s=cfg.outbox_call_timeout_s, connect_attempts=max(1, cfg.rpc_retries),
                        drain_timeout_s=cfg.outbox_wait_s)


@dataclass
class Paid:
    """A fee payment on chain, ready to be used for one request."""

    request_id: bytes
    tx_hash: bytes
    fee_wei: int
    resumed: bool  # recorded by an earlier run (resumed or reused), not paid by this one


class HolderOutbox:
    """One holder's outbox (one thread: open and close it where it is used)."""

    def __init__(self, cfg: HolderConfig, deployment: Deployment, account: LocalAccount) -> None:
        self.cfg = cfg
        self.holder = str(to_checksum_address(account.address))
        out = outbox_config(cfg, self.holder)
        try:
            out.validate()
        except ValueError as exc:
            raise CLIError(f"holder config: {exc}".replace("OutboxConfig.", "outbox field ")) from None
        self.box = ChainOutbox.open(out, cfg.rpc_url, deployment, [account])
        try:
            self._used = open_durable_db(out.data_dir, out.filename, out.busy_timeout_s, _USED_SCHEMA,
                                         "the holder's used request ids")
        except BaseException:
            self.box.close()
            raise

    def close(self) -> None:
        self._used.close()
        self.box.close()

    def __enter__(self) -> HolderOutbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def path(self) -> Path:
        return self.box.path

    # -- fee payments ------------------------------------------------------------------------------

    def _mine(self, kind: str, model_id: int) -> list[Entry]:
        prefix = f"{self.box.scope}/{kind}:{model_id}:"
        return [e for e in self.box.entries() if e.key.startswith(prefix) and e.sender == self.holder]

    def is_used(self, key: str) -> bool:
        return self._used.execute("SELECT 1 FROM used_requests WHERE key=?", (key,)).fetchone() is not None

    def mark_used(self, model_id: int, request_id: bytes, why: str) -> None:
        """Record that `request_id`'s payment has served (or can no longer serve) a request."""
        key = f"{self.box.scope}/{DEPOSIT}:{model_id}:0x{request_id.hex()}"
        self._used.execute("INSERT OR IGNORE INTO used_requests (key, why) VALUES (?, ?)", (key, why))

    def open_payment(self, model_id: int) -> Entry | None:
        """The oldest recorded payment for `model_id` that is queued, or on chain and not used yet."""
        for e in self._mine(DEPOSIT, model_id):
            if e.state == QUEUED or (e.state == DONE and not self.is_used(e.key)):
                return e
        return None

    def pay(self, model_id: int, fee_wei: int) -> Paid:
        """Resume or reuse an open payment for `model_id`, else record and send a new one; wait for it
        (bounded by `outbox_wait_s`). OutboxQueuedError when the chain did not take it in time."""
        while True:
            entry = self.open_payment(model_id)
            resumed = entry is not None
            if entry is None:
                key = self.box.deposit(self.holder, model_id, fee_wei, os.urandom(32))
                entry = self.box.get(key)
                assert entry is not None
            request_id = bytes.fromhex(entry.payload["request_id"])
            self._drain(entry.key, f"the payment of {entry.payload['value_wei']} wei for request 0x{request_id.hex()} "
                                   f"(model {model_id})", f"re-running `pmn infer --model {model_id}` resumes it")
            tx_hash = bytes.fromhex(self.box.result(entry.key)["tx_hash"].removeprefix("0x"))
            if resumed and self.box.client.payment(model_id, tx_hash) is None:
                # recorded as paid, but not on this chain (it was reset): never usable, look again
                self.mark_used(model_id, request_id, "payment not on this chain")
                continue
            return Paid(request_id, tx_hash, int(entry.payload["value_wei"]), resumed)

    # -- revenue claims ----------------------------------------------------------------------------

    def claim(self, model_id: int) -> dict[str, Any]:
        """Resume the queued claim of `model_id`'s revenue, else record a new one; send it (bounded wait).
        The result: {"amount_wei": ...}."""
        queued = [e for e in self._mine(CLAIM_REVENUE, model_id) if e.state == QUEUED]
        key = queued[0].key if queued else self.box.claim_revenue(self.holder, model_id, os.urandom(8).hex())
        self._drain(key, f"the revenue claim of model {model_id} for {self.holder}",
                    f"re-running `pmn claim --model {model_id}` (or any later `pmn claim` / `pmn infer`) sends it")
        return self.box.result(key)

    def queued_claim(self, model_id: int) -> bool:
        return any(e.state == QUEUED for e in self._mine(CLAIM_REVENUE, model_id))

    # -- sending -----------------------------------------------------------------------------------

    def _drain(self, key: str, what: str, resume: str) -> None:
        """Send everything queued (this holder's earlier writes too); errors name `key`'s write."""
        try:
            self.box.drain(self.cfg.outbox_wait_s)
        except OutboxTimeoutError as exc:
            entry = self.box.get(key)
            assert entry is not None
            if entry.state == QUEUED:
                state = "uncertain (sent, the answer was lost)" if entry.uncertain else "queued (not sent yet)"
                raise OutboxQueuedError(f"{what} is {state} in the outbox {self.path}: the chain did not take it "
                                        f"within outbox_wait_s={self.cfg.outbox_wait_s} s ({entry.error or exc}); "
                                        f"{resume}, exactly once") from None
            print(f"note: {exc}; re-run to send the rest", file=sys.stderr)
        except OutboxRefusedError as exc:
            entry = self.box.get(key)
            assert entry is not None
            if entry.state != DONE:
                raise OutboxRefusal(f"the chain refused {what}: {entry.error} (recorded in {self.path}; "
                                    "not retried)") from None
            print(f"note: {exc}", file=sys.stderr)
        entry = self.box.get(key)
        assert entry is not None
        if entry.state == REFUSED:  # refused by an earlier run (drain reports only this call's refusals)
            raise OutboxRefusal(f"the chain refused {what}: {entry.error} (recorded in {self.path}; not retried)")
        if entry.state != DONE:  # queued behind an earlier write the drain could not finish
            raise OutboxQueuedError(f"{what} is queued in the outbox {self.path}; {resume}, exactly once")


def quiet_outbox_log() -> None:
    """A command reports its queued or refused writes in its one-line error: the outbox's own log lines (one per
    pass while the chain is down) show only with PMN_DEBUG set."""
    if not os.environ.get("PMN_DEBUG"):
        logging.getLogger("protocol.outbox").setLevel(logging.CRITICAL)


def connection_lost(exc: BaseException) -> bool:
    """Whether `exc` says the chain did not answer (as opposed to the chain's or the user's refusal)."""
    return isinstance(exc, (ChainUnavailableError, ReceiptTimeoutError, *CONNECTION_ERRORS))
