"""Chain-backed checks a node makes: is this node key registered, did this transaction pay for this request.

Both wrap the `contracts` client and cache positive answers, so a hot path (every hop of an inference
request, every receipt of a step) costs one RPC per new key or payment, not one per message.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from contracts.client import ProtocolContracts
from contracts.errors import ChainUnavailableError
from protocol.errors import ChainLookupError, ProtocolError


class PaymentError(ProtocolError):
    """A request's payment is missing, too small, for another request or another model."""


@dataclass
class ChainCheckConfig:
    """Caching of chain lookups."""

    registry_ttl_s: float = 60.0  # how long a positive "key is registered" answer is trusted
    negative_ttl_s: float = 2.0  # how long a negative answer is trusted (registrations can land any time)
    stale_ok_s: float = 900.0  # an expired positive answer keeps counting this long while it is re-read in the
    # background (a node's hot path never waits on the chain for a key it knows; an RPC outage does not stop it)


class ChainKeyRegistry:
    """`KeyRegistry` backed by the NodeRegistry contract: a key counts while its node is Active.

    A positive answer older than `registry_ttl_s` is re-read in a background thread while the old one keeps
    counting (up to `stale_ok_s`), so receipts of known neighbours are verified and stored through an RPC
    outage; a key never seen (or not re-confirmed within `stale_ok_s`) is read at once, and a dead chain then
    raises `ChainLookupError`.
    """

    def __init__(self, client: ProtocolContracts, config: ChainCheckConfig | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.config = config or ChainCheckConfig()
        self.clock = clock
        self._cache: dict[str, tuple[bool, float]] = {}
        self._lock = threading.Lock()
        self._refreshing: set[str] = set()  # keys being re-read in the background
        self.stale_served = 0  # answers given from an expired positive entry
        self.refresh_failures = 0  # background re-reads that failed (the chain did not answer)

    def is_registered(self, address: str) -> bool:
        key = address.lower()
        now = self.clock()
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None:
            ok, at = hit
            if now - at < (self.config.registry_ttl_s if ok else self.config.negative_ttl_s):
                return ok
            if ok and now - at < self.config.stale_ok_s:
                self._refresh_in_background(address)
                self.stale_served += 1
                return True
        return self._read(address)

    def refreshing(self) -> int:
        """Background re-reads in flight."""
        with self._lock:
            return len(self._refreshing)

    def _read(self, address: str) -> bool:
        try:
            ok = self.client.node_info(address).status == "Active"
        except ChainUnavailableError as exc:
            raise ChainLookupError(f"cannot tell whether {address} is a registered node key: {exc}") from exc
        with self._lock:
            self._cache[address.lower()] = (ok, self.clock())
        return ok

    def _refresh_in_background(self, address: str) -> None:
        key = address.lower()
        with self._lock:
            if key in self._refreshing:
                return
            self._refreshing.add(key)

        def refresh() -> None:
            try:
                self._read(address)
            except Exception:  # the chain is down: the stale answer stays until stale_ok_s
                self.refresh_failures += 1
            finally:
                with self._lock:
                    self._refreshing.discard(key)

        threading.Thread(target=refresh, name=f"key-refresh-{key[:10]}", daemon=True).start()


class ChainPaymentVerifier:
    """Checks `RevenueDeposited` events: the transaction paid this model at least its fee, for this request id."""

    def __init__(self, client: ProtocolContracts, model_id: int, min_fee_wei: int | None = None) -> None:
        self.client = client
        self.model_id = model_id
        self.min_fee_wei = client.get_model(model_id).terms.inference_fee_wei if min_fee_wei is None else min_fee_wei
        self._paid: dict[bytes, bytes] = {}  # tx hash -> request id, verified

    def verify(self, request_id: bytes, tx_hash: bytes) -> None:
        if self._paid.get(tx_hash) == request_id:
            return
        payment = self.client.payment(self.model_id, tx_hash)
        if payment is None:
            raise PaymentError(f"transaction 0x{tx_hash.hex()} is not a revenue deposit to model {self.model_id}")
        if payment.request_id != request_id:
            raise PaymentError(f"transaction 0x{tx_hash.hex()} paid for request 0x{payment.request_id.hex()}, "
                               f"not 0x{request_id.hex()}")
        if payment.amount_wei < self.min_fee_wei:
            raise PaymentError(f"transaction 0x{tx_hash.hex()} paid {payment.amount_wei} wei, below the fee of "
                               f"{self.min_fee_wei} wei")
        self._paid[tx_hash] = request_id


@dataclass
class ChainLink:
    """What a node reads from the chain for one model: the receipt domain, the terms and the checks above."""

    client: ProtocolContracts  # connected contracts client
    model_id: int  # the model this node trains
    chain_id: int  # EVM chain id (receipt domain)
    ledger: str  # ContributionLedger address (receipt domain)
    epoch_length: int  # training steps per accounting epoch (model terms)
    inference_fee_wei: int  # minimum fee per inference request (model terms)
    spec_hash: bytes  # content hash registered by the researcher
    keys: ChainKeyRegistry  # registered node keys
    payments: ChainPaymentVerifier  # inference payment checks

    def close(self) -> None:
        """Close the connection to the chain."""
        from contracts.chain import disconnect

        disconnect(self.client.w3)


def connect_chain(rpc_url: str, deployment_path: str, model_id: int) -> ChainLink:
    """Connect to a JSON-RPC chain with a deployment file and read one model's terms (errors name the cause)."""
    from contracts.chain import connect, disconnect
    from contracts.deploy import Deployment

    deployment = Deployment.load(deployment_path)
    w3 = connect(rpc_url)
    try:
        deployment.check_chain(w3)
        client = ProtocolContracts(w3, deployment)
        if not 1 <= model_id <= client.model_count():
            raise ProtocolError(f"unknown model id {model_id} on chain {deployment.chain_id}")
        terms = client.get_model(model_id).terms
    except BaseException:
        disconnect(w3)
        raise
    return ChainLink(client=client, model_id=model_id, chain_id=deployment.chain_id,
                     ledger=deployment.addresses["ContributionLedger"], epoch_length=terms.epoch_length,
                     inference_fee_wei=terms.inference_fee_wei, spec_hash=terms.spec_hash,
                     keys=ChainKeyRegistry(client), payments=ChainPaymentVerifier(client, model_id))
