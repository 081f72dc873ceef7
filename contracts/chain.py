"""Connecting to a chain: the embedded eth-tester/py-evm chain or a JSON-RPC URL with retries."""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any

import requests
from eth_account import Account
from eth_account.signers.local import LocalAccount
from web3 import EthereumTesterProvider, HTTPProvider, Web3
from web3.exceptions import ProviderConnectionError

from contracts.config import ChainConfig
from contracts.errors import ChainUnavailableError, ContractsError

CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    ProviderConnectionError,
    ConnectionError,
    TimeoutError,
)

ANVIL_MNEMONIC = "test test test test test test test test test test test junk"


class ClosableSession(requests.Session):
    """A `requests.Session` that stays closed: once `close()` ran, every request is refused.

    A plain Session re-opens connection pools on the next request after `close()`. A chain call left
    running in an abandoned worker thread (a node shutting down mid-request) would then open a socket that
    nothing closes (a ResourceWarning at exit). Here such a request is refused, and one that raced `close()`
    releases the pools again when it returns, so its connection is closed too.
    """

    def __init__(self) -> None:
        super().__init__()
        self.closed = False  # set by close(); requests are refused from then on

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
        if self.closed:
            raise requests.exceptions.ConnectionError(f"{method!r} {url!r}: the chain connection was closed")
        try:
            return super().request(method, url, *args, **kwargs)
        finally:
            if self.closed:  # close() ran during this request: release the pool it may have re-opened
                super().close()

    def close(self) -> None:
        self.closed = True
        super().close()


class ClosableHTTPProvider(HTTPProvider):
    """An HTTPProvider on one `ClosableSession` of its own, which `close()` releases.

    web3's HTTPProvider keeps its sessions in a process-wide cache and offers no way to close them: their
    keep-alive sockets stay open until garbage collection (a ResourceWarning each). Passing our own session
    through the provider's `session=` option makes every request use it, and lets us close it.
    """

    def __init__(self, endpoint_uri: str, request_kwargs: dict[str, Any] | None = None) -> None:
        self.session = ClosableSession()
        super().__init__(endpoint_uri, request_kwargs=request_kwargs, session=self.session,
                         exception_retry_configuration=None)

    def close(self) -> None:
        """Close the session and its pooled connections (idempotent); later requests are refused."""
        self.session.close()


def connect(url: str | None, config: ChainConfig | None = None) -> Web3:
    """Return a Web3 for `url`, or for a fresh embedded chain when `url` is None.

    A URL is probed with `eth_chainId`, retrying connection errors with backoff; raises
    ChainUnavailableError (with the URL and attempts) when it never answers. Call `disconnect(w3)`
    when done with it: that closes the HTTP connections.
    """
    cfg = config or ChainConfig()
    cfg.validate()
    if url is None:
        w3 = Web3(EthereumTesterProvider())
        # eth_call's sender: the account eth-tester's middleware would guess for every call (its guess asks for
        # eth_accounts twice per call, about a third of a call's time); transactions still name their own
        w3.eth.default_account = w3.eth.accounts[0]
        return w3
    provider = ClosableHTTPProvider(url, request_kwargs={"timeout": cfg.request_timeout_s})
    w3 = Web3(provider)
    try:
        with_retries(lambda: w3.eth.chain_id, cfg, url)
    except BaseException:
        provider.close()
        raise
    return w3


def disconnect(w3: Web3) -> None:
    """Release what `connect` opened: the HTTP session of a URL chain (nothing for the embedded chain)."""
    if isinstance(w3.provider, ClosableHTTPProvider):
        w3.provider.close()


def with_retries(fn: Any, config: ChainConfig, url: str) -> Any:
    """Call `fn()`, retrying connection errors per `config`; raise ChainUnavailableError at the end."""
    last: BaseException | None = None
    for attempt in range(1, config.connect_attempts + 1):
        try:
            return fn()
        except CONNECTION_ERRORS as exc:
            last = exc
            if attempt < config.connect_attempts:
                time.sleep(config.backoff_s(attempt))
    raise ChainUnavailableError(url, config.connect_attempts, last)


def endpoint_of(w3: Web3) -> str:
    """A printable name of the chain endpoint."""
    return str(getattr(w3.provider, "endpoint_uri", None) or "embedded")


def is_embedded(w3: Web3) -> bool:
    """True for an in-process eth-tester chain."""
    return isinstance(w3.provider, EthereumTesterProvider)


def test_accounts(w3: Web3, count: int = 10) -> list[LocalAccount]:
    """Funded accounts: eth-tester's default keys (embedded) or anvil's default mnemonic (URL)."""
    if is_embedded(w3):
        keys = w3.provider.ethereum_tester.backend.account_keys  # type: ignore[attr-defined]
        return [Account.from_key(k.to_bytes()) for k in keys[:count]]
    Account.enable_unaudited_hdwallet_features()
    return [
        Account.from_mnemonic(ANVIL_MNEMONIC, account_path=f"m/44'/60'/0'/0/{i}") for i in range(count)
    ]


test_accounts.__test__ = False  # type: ignore[attr-defined]  # a helper, not a pytest test


def advance_time(w3: Web3, seconds: int) -> int:
    """Move chain time forward by `seconds` and mine a block; return the new block timestamp."""
    if seconds < 0:
        raise ValueError("advance_time: seconds must be >= 0")
    if is_embedded(w3):
        tester = w3.provider.ethereum_tester  # type: ignore[attr-defined]
        with getattr(w3.manager, "_pmn_lock", None) or nullcontext():  # held while served over HTTP
            now = w3.eth.get_block("latest")["timestamp"]
            tester.time_travel(now + seconds + 1)  # eth-tester's mined block lands one second before the target
    else:
        for method, params in (("evm_increaseTime", [seconds]), ("evm_mine", [])):
            resp = w3.provider.make_request(method, params)  # type: ignore[arg-type]
            if "error" in resp:
                raise ContractsError(f"{method} failed at {endpoint_of(w3)}: {resp['error']}")
    return int(w3.eth.get_block("latest")["timestamp"])
