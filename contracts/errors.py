"""Exceptions of the contracts package (one root, one subclass per failure)."""

from __future__ import annotations

from typing import Any


class ContractsError(Exception):
    """Root of every error raised by the contracts package."""


class BuildError(ContractsError):
    """Compiling the Solidity sources failed, or the committed artifacts are stale."""


class ArtifactError(ContractsError):
    """A compiled artifact is missing or malformed."""


class ChainUnavailableError(ContractsError):
    """The JSON-RPC endpoint did not answer after the configured retries."""

    def __init__(self, url: str, attempts: int, cause: BaseException | None = None) -> None:
        self.url = url
        self.attempts = attempts
        self.cause = cause
        super().__init__(f"chain at {url} unavailable after {attempts} attempt(s): {cause!r}")


class ContractRevertError(ContractsError):
    """A call or transaction reverted; `error_name` and `args` are the decoded custom error."""

    def __init__(self, error_name: str, args: dict[str, Any] | None = None, raw: bytes = b"") -> None:
        self.error_name = error_name
        self.error_args = dict(args or {})
        self.raw = raw
        inner = ", ".join(f"{k}={_fmt(v)}" for k, v in self.error_args.items())
        super().__init__(f"{error_name}({inner})")


class TransactionFailedError(ContractsError):
    """A transaction was mined but failed without decodable revert data, or was not mined in time."""


class DeploymentError(ContractsError):
    """A deployment file is missing, malformed, or does not match the chain."""


class InvalidInputError(ContractsError):
    """A client call was given a value it cannot encode (wrong length, range or type)."""


def _fmt(value: Any) -> str:
    if isinstance(value, bytes):
        return "0x" + value.hex()
    return str(value)
