"""Typed configuration of the chain client."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ChainConfig:
    """How the client talks to a chain; every timeout, retry and backoff is named here."""

    connect_attempts: int = 5  # attempts per JSON-RPC request before ChainUnavailableError
    backoff_initial_s: float = 0.2  # wait after the first failed attempt
    backoff_factor: float = 2.0  # each further wait is multiplied by this
    backoff_max_s: float = 5.0  # cap on a single wait
    request_timeout_s: float = 10.0  # HTTP timeout of one JSON-RPC request
    receipt_timeout_s: float = 60.0  # how long to wait for a transaction to be mined
    receipt_poll_s: float = 0.05  # polling interval while waiting for a receipt
    nonce_conflict_retries: int = 8  # re-sign with a fresh nonce when another client used this account's nonce
    nonce_conflict_backoff_s: float = 0.05  # max jittered wait before the first re-sign, doubled per conflict
    fixed_gas: int | None = None  # explicit gas limit for every transaction; None = estimate (preflight)
    gas_margin_pct: int = 25  # added to an estimate, in percent
    priority_fee_wei: int = 1_000_000_000  # EIP-1559 tip per gas

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if self.connect_attempts < 1:
            raise ValueError("ChainConfig.connect_attempts must be >= 1")
        for name in ("backoff_initial_s", "backoff_max_s", "request_timeout_s", "receipt_timeout_s", "receipt_poll_s",
                     "nonce_conflict_backoff_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"ChainConfig.{name} must be >= 0")
        if self.nonce_conflict_retries < 0:
            raise ValueError("ChainConfig.nonce_conflict_retries must be >= 0")
        if self.backoff_factor < 1:
            raise ValueError("ChainConfig.backoff_factor must be >= 1")
        if self.fixed_gas is not None and self.fixed_gas < 21_000:
            raise ValueError("ChainConfig.fixed_gas must be None or >= 21000")
        if self.gas_margin_pct < 0:
            raise ValueError("ChainConfig.gas_margin_pct must be >= 0")
        if self.priority_fee_wei < 0:
            raise ValueError("ChainConfig.priority_fee_wei must be >= 0")

    def backoff_s(self, attempt: int) -> float:
        """Wait after failed attempt number `attempt` (1-based)."""
        return min(self.backoff_max_s, self.backoff_initial_s * self.backoff_factor ** (attempt - 1))
