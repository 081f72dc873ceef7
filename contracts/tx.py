"""Signing, sending and waiting for transactions: per-account nonces, idempotent retries, revert decoding."""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from typing import Any

from eth_account.signers.local import LocalAccount
from eth_tester.exceptions import ValidationError as TesterValidationError
from eth_typing import ChecksumAddress
from eth_utils import ValidationError as EthUtilsValidationError
from eth_utils import to_checksum_address
from hexbytes import HexBytes
from web3 import Web3
from web3.exceptions import TransactionNotFound, Web3RPCError
from web3.types import TxReceipt

from contracts.chain import CONNECTION_ERRORS, endpoint_of, with_retries
from contracts.config import ChainConfig
from contracts.errors import (
    ChainUnavailableError,
    ContractRevertError,
    ReceiptTimeoutError,
    TransactionFailedError,
)
from contracts.revert import REVERT_EXCEPTIONS, decode_revert, revert_data_of

_REVERTS = REVERT_EXCEPTIONS
_REJECTIONS: tuple[type[BaseException], ...] = (ValueError, Web3RPCError, EthUtilsValidationError, TesterValidationError)


class _NonceConflict(Exception):
    """Another sender used this account's nonce (refused at send, or our pending transaction was replaced)."""


class NonceManager:
    """Hands out consecutive nonces per account; safe for concurrent callers.

    Hold `lock(address)` across allocate-and-send so transactions reach the node in nonce order.
    """

    def __init__(self, w3: Web3) -> None:
        self._w3 = w3
        self._guard = threading.Lock()
        self._locks: dict[str, threading.RLock] = {}
        self._next: dict[str, int] = {}

    def lock(self, address: str) -> threading.RLock:
        """The per-account lock."""
        with self._guard:
            return self._locks.setdefault(address, threading.RLock())

    def allocate(self, address: str) -> int:
        """The next nonce (caller holds `lock(address)`)."""
        if address not in self._next:
            self._next[address] = self._w3.eth.get_transaction_count(address, "pending")  # type: ignore[arg-type]
        nonce = self._next[address]
        self._next[address] = nonce + 1
        return nonce

    def reset(self, address: str) -> None:
        """Forget the cached nonce; the next allocation re-reads the chain."""
        self._next.pop(address, None)


@dataclass
class SentTx:
    """A mined transaction."""

    tx_hash: bytes
    receipt: TxReceipt

    @property
    def gas_used(self) -> int:
        """Gas the transaction used."""
        return int(self.receipt["gasUsed"])


class Transactor:
    """Builds, signs, sends and confirms transactions from LocalAccounts."""

    def __init__(self, w3: Web3, config: ChainConfig, error_table: dict[bytes, Any]) -> None:
        self.w3 = w3
        self.config = config
        self.errors = error_table
        self.nonces = NonceManager(w3)
        self._url = endpoint_of(w3)
        self._chain_id: int | None = None

    def retry(self, fn: Any) -> Any:
        """Run a read with connection retries."""
        return with_retries(fn, self.config, self._url)

    def call(self, fn: Any, sender: str | None = None, block: Any = "latest") -> Any:
        """eth_call a bound contract function; reverts become ContractRevertError."""
        params = {"from": sender} if sender else {}
        try:
            return self.retry(lambda: fn.call(params, block_identifier=block))
        except _REVERTS as exc:
            raise self._decoded(exc) from None

    def transact(self, account: LocalAccount, fn: Any = None, *, to: str | None = None, value: int = 0,
                 data: bytes = b"", gas: int | None = None, estimate: bool = False) -> SentTx:
        """Send a contract call (`fn`) or a plain transaction (`to`, `data`); wait for success.

        Gas: `gas` if given, else `config.fixed_gas` unless `estimate`, else an estimate plus margin.
        """
        tx: dict[str, Any] = {"from": account.address, "value": value, "chainId": self._chain()}
        if fn is not None:
            tx["to"] = fn.address
            tx["data"] = fn._encode_transaction_data()
        else:
            tx["to"] = to
            tx["data"] = data
        if to is None and fn is None:
            tx.pop("to")
        gas_limit = gas or (None if estimate else self.config.fixed_gas)
        if gas_limit is None:
            gas_limit = self._estimate(tx)
        tx["gas"] = gas_limit
        base_fee = int(self.retry(lambda: self.w3.eth.get_block("latest")).get("baseFeePerGas", 0))
        tx["maxPriorityFeePerGas"] = self.config.priority_fee_wei
        tx["maxFeePerGas"] = 2 * base_fee + self.config.priority_fee_wei
        receipt = self._send_until_mined(account, tx)
        if receipt["status"] != 1:
            raise self._replay_failure(tx, receipt)
        return SentTx(bytes(receipt["transactionHash"]), receipt)

    def deploy(self, account: LocalAccount, abi: list[Any], bytecode: str, *args: Any,
               gas: int | None = None) -> ChecksumAddress:
        """Deploy a contract; return its address."""
        factory = self.w3.eth.contract(abi=abi, bytecode=bytecode)
        data = HexBytes(factory.constructor(*args).data_in_transaction)
        sent = self.transact(account, to=None, data=bytes(data), gas=gas, estimate=True)
        address = sent.receipt["contractAddress"]
        if not address:
            raise TransactionFailedError("deployment receipt has no contract address")
        return to_checksum_address(address)

    # -- internals -------------------------------------------------------------------------------

    def _chain(self) -> int:
        if self._chain_id is None:
            self._chain_id = int(self.retry(lambda: self.w3.eth.chain_id))
        return self._chain_id

    def _decoded(self, exc: BaseException) -> ContractRevertError:
        data = revert_data_of(exc)
        if data is None:
            return ContractRevertError("UnknownRevert", {"message": str(exc)})
        return decode_revert(data, self.errors)

    def _estimate(self, tx: dict[str, Any]) -> int:
        try:
            estimate = int(self.retry(lambda: self.w3.eth.estimate_gas(tx)))  # type: ignore[arg-type]
        except _REVERTS as exc:
            raise self._decoded(exc) from None
        return estimate * (100 + self.config.gas_margin_pct) // 100 + 10_000

    def _send_until_mined(self, account: LocalAccount, tx: dict[str, Any]) -> TxReceipt:
        """Sign with the next nonce, send, and wait for the receipt.

        Another client sharing this account can take our nonce: the node refuses ours at send time, or
        (with a pool) our pending transaction is dropped once the other one is mined with that nonce. Both
        are nonce conflicts: re-sign with a fresh nonce after a jittered backoff, up to
        `config.nonce_conflict_retries` times.
        """
        for conflict in range(self.config.nonce_conflict_retries + 1):
            try:
                tx_hash, nonce = self._sign_and_send(account, tx)
                return self._wait(tx_hash, account.address, nonce)
            except _NonceConflict as exc:
                if conflict == self.config.nonce_conflict_retries:
                    raise TransactionFailedError(
                        f"nonce conflicts for {account.address} persisted after {conflict + 1} attempts: {exc}"
                    ) from exc
                time.sleep(random.uniform(0, self.config.nonce_conflict_backoff_s * 2**conflict))
        raise AssertionError("unreachable")  # pragma: no cover

    def _sign_and_send(self, account: LocalAccount, tx: dict[str, Any]) -> tuple[bytes, int]:
        """Allocate a nonce, sign and send (nonce order kept per account); return (hash, nonce)."""
        with self.nonces.lock(account.address):
            try:
                tx["nonce"] = self.retry(lambda: self.nonces.allocate(account.address))
            except ChainUnavailableError:
                self.nonces.reset(account.address)
                raise
            signed = account.sign_transaction(tx)
            return self._send_signed(account, bytes(signed.raw_transaction), bytes(signed.hash)), int(tx["nonce"])

    def _send_signed(self, account: LocalAccount, raw: bytes, tx_hash: bytes) -> bytes:
        last: BaseException | None = None
        for attempt in range(1, self.config.connect_attempts + 1):
            try:
                if attempt > 1 and self._known(tx_hash):
                    return tx_hash
                self.w3.eth.send_raw_transaction(raw)
                return tx_hash
            except CONNECTION_ERRORS as exc:
                last = exc
            except _REVERTS as exc:  # eth-tester executes on send and raises on revert
                self.nonces.reset(account.address)
                raise self._decoded(exc) from None
            except _REJECTIONS as exc:  # e.g. "already known" after a lost response, or a nonce conflict
                if self._known(tx_hash):
                    return tx_hash
                self.nonces.reset(account.address)
                if _is_nonce_conflict(str(exc)):
                    raise _NonceConflict(str(exc)) from exc
                raise TransactionFailedError(f"node rejected transaction 0x{tx_hash.hex()}: {exc}") from exc
            if attempt < self.config.connect_attempts:
                time.sleep(self.config.backoff_s(attempt))
        # Unknown whether it reached the node: re-read the nonce next time so nothing is skipped.
        self.nonces.reset(account.address)
        raise ChainUnavailableError(self._url, self.config.connect_attempts, last)

    def _known(self, tx_hash: bytes) -> bool:
        try:
            self.w3.eth.get_transaction(tx_hash)  # type: ignore[arg-type]
            return True
        except TransactionNotFound:
            return False
        except CONNECTION_ERRORS:
            return False

    def _wait(self, tx_hash: bytes, address: str, nonce: int) -> TxReceipt:
        """Poll for the receipt; _NonceConflict when the account's nonce moved past ours without it."""
        deadline = time.monotonic() + self.config.receipt_timeout_s
        while True:
            receipt = self._receipt(tx_hash)
            if receipt is not None:
                return receipt
            if self._nonce_consumed(address, nonce):
                receipt = self._receipt(tx_hash)  # mined between the two reads
                if receipt is not None:
                    return receipt
                self.nonces.reset(address)
                raise _NonceConflict(f"transaction 0x{tx_hash.hex()} with nonce {nonce} was replaced by another "
                                     "transaction from the same account")
            if time.monotonic() >= deadline:
                raise ReceiptTimeoutError(
                    f"transaction 0x{tx_hash.hex()} not mined within {self.config.receipt_timeout_s} s"
                )
            time.sleep(self.config.receipt_poll_s)

    def _receipt(self, tx_hash: bytes) -> TxReceipt | None:
        try:
            return self.w3.eth.get_transaction_receipt(tx_hash)  # type: ignore[arg-type]
        except TransactionNotFound:
            return None
        except CONNECTION_ERRORS:
            return None

    def _nonce_consumed(self, address: str, nonce: int) -> bool:
        try:
            return int(self.w3.eth.get_transaction_count(address, "latest")) > nonce  # type: ignore[arg-type]
        except CONNECTION_ERRORS:
            return False

    def _replay_failure(self, tx: dict[str, Any], receipt: TxReceipt) -> ContractsErrorT:
        call = {k: tx[k] for k in ("from", "to", "value", "data") if k in tx}
        block = max(0, int(receipt["blockNumber"]) - 1)
        try:
            self.retry(lambda: self.w3.eth.call(call, block_identifier=block))  # type: ignore[arg-type]
        except _REVERTS as exc:
            return self._decoded(exc)
        return TransactionFailedError(
            f"transaction 0x{bytes(receipt['transactionHash']).hex()} failed (status 0) without revert data; "
            f"gas used {receipt['gasUsed']} of limit {tx['gas']} (out of gas if equal)"
        )


ContractsErrorT = ContractRevertError | TransactionFailedError


def _is_nonce_conflict(message: str) -> bool:
    """Whether a node's rejection means another transaction holds our nonce.

    "nonce too low" when it was mined; "replacement transaction underpriced" (geth, anvil) when it is
    still pending in the pool with a fee ours does not beat by the replacement margin."""
    m = message.lower()
    return "nonce" in m or "replacement transaction" in m
