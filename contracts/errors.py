"""Exceptions of the contracts package (one root, one subclass per failure)."""

from __future__ import annotations

import re
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
        super().__init__(f"chain at {url} unavailable after {attempts} attempt(s): {_reason(cause)}")


class ContractRevertError(ContractsError):
    """A call or transaction reverted; `error_name` and `args` are the decoded custom error.

    Subclasses add `explanation`, a sentence saying what was wrong in terms of the protocol's rules.
    """

    def __init__(self, error_name: str, args: dict[str, Any] | None = None, raw: bytes = b"") -> None:
        self.error_name = error_name
        self.error_args = dict(args or {})
        self.raw = raw
        inner = ", ".join(f"{k}={_fmt(v)}" for k, v in self.error_args.items())
        self.explanation = self._explain()
        super().__init__(f"{error_name}({inner})" + (f": {self.explanation}" if self.explanation else ""))

    def _explain(self) -> str:
        return ""


class StageAssignmentError(ContractRevertError):
    """NodeRegistry refused a stage assignment, a stage departure or an unbonding because of the stage rules.

    The rules (contracts/SECURITY.md, "Extraction"): one operator serves at most one stage of a model; every
    assignment is backed by `stakePerStage` of the node's own stake; a node leaves its stages before unbonding.
    """

    EXPLANATIONS: dict[str, str] = {
        "NodeRegistryOperatorHoldsOtherStage": "operator {operator} already holds stage {heldStage} of model {modelId}"
        " and cannot take stage {stage}: one operator serves at most one stage of a model",
        "NodeRegistryStageAlreadyAssigned": "node {nodeKey} is already assigned to stage {stage} of model {modelId}",
        "NodeRegistryInsufficientStageStake": "node {nodeKey} would hold {stake} wei but needs {required} wei"
        " (capacity stake plus stakePerStage for every stage it holds); send the difference with the assignment",
        "NodeRegistryInvalidStage": "model {modelId} has {numStages} stage(s); stage {stage} does not exist",
        "NodeRegistryModelNotOpen": "model {modelId} is unknown or retired (status {status}); only proposed or"
        " training models take stage assignments",
        "NodeRegistryNotAssigned": "node {nodeKey} holds no stage of model {modelId}",
        "NodeRegistryStagesAssigned": "node {nodeKey} still holds {assignments} stage assignment(s); leave them"
        " (leaveStage) before unbonding",
    }

    MODEL_STATUS = ("None", "Proposed", "Training", "Retired")  # IModelRegistry.Status by value

    def _explain(self) -> str:
        args = {k: _fmt(v) for k, v in self.error_args.items()}
        status = self.error_args.get("status")
        if isinstance(status, int) and 0 <= status < len(self.MODEL_STATUS):
            args["status"] = self.MODEL_STATUS[status]
        try:
            return self.EXPLANATIONS.get(self.error_name, "").format(**args)
        except (KeyError, IndexError):  # malformed payload: the error name alone says it
            return ""


class TransactionFailedError(ContractsError):
    """A transaction was mined but failed without decodable revert data, or was not mined in time."""


class ReceiptTimeoutError(TransactionFailedError):
    """A sent transaction was not mined in time: whether it lands later is unknown (check the chain before resending)."""


class DeploymentError(ContractsError):
    """A deployment file is missing, malformed, or does not match the chain."""


class InvalidInputError(ContractsError):
    """A client call was given a value it cannot encode (wrong length, range or type)."""


def _reason(cause: BaseException | None) -> str:
    """The innermost words of a connection error ("[Errno 111] Connection refused", "Read timed out"), not the
    nested reprs requests and urllib3 wrap it in."""
    if cause is None:
        return "no answer"
    text = str(cause)
    errno = re.search(r"\[Errno -?\d+\] [^'\")\]]+", text)
    if errno:
        return errno.group(0).strip()
    timed_out = re.search(r"(Read|Connect) timed out\.?( \(\w+ timeout=[\d.]+\))?", text)
    if timed_out:
        return timed_out.group(0).strip()
    return f"{type(cause).__name__}: {' '.join(text.split())[:200]}"


def _fmt(value: Any) -> str:
    if isinstance(value, bytes):
        return "0x" + value.hex()
    return str(value)
