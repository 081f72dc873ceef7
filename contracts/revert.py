"""Decode revert data into ContractRevertError using every committed ABI."""

from __future__ import annotations

import ast
from typing import Any

from eth_abi import decode as abi_decode
from eth_utils import function_signature_to_4byte_selector
from web3.exceptions import ContractCustomError, ContractLogicError, ContractPanicError

from contracts.errors import ContractRevertError, StageAssignmentError

try:  # the embedded chain's revert exception
    from eth_tester.exceptions import TransactionFailed as _TesterFailed
except ImportError:  # pragma: no cover - eth-tester is a dependency
    _TesterFailed = RuntimeError  # type: ignore[assignment,misc]

REVERT_EXCEPTIONS: tuple[type[BaseException], ...] = (
    ContractCustomError, ContractLogicError, ContractPanicError, _TesterFailed,
)
_TESTER_PREFIX = "execution reverted: "

_ErrorSpec = tuple[str, list[str], list[str]]  # name, abi types, argument names

_BUILTIN: dict[bytes, _ErrorSpec] = {
    bytes.fromhex("08c379a0"): ("Error", ["string"], ["message"]),
    bytes.fromhex("4e487b71"): ("Panic", ["uint256"], ["code"]),
}


def _abi_type(inp: dict[str, Any]) -> str:
    t = inp["type"]
    if t.startswith("tuple"):
        return "(" + ",".join(_abi_type(c) for c in inp["components"]) + ")" + t[len("tuple") :]
    return t


def error_table(abis: list[list[dict[str, Any]]]) -> dict[bytes, _ErrorSpec]:
    """Map 4-byte selectors to (name, types, names) for every `error` in the ABIs."""
    table = dict(_BUILTIN)
    for abi in abis:
        for item in abi:
            if item.get("type") != "error":
                continue
            types = [_abi_type(i) for i in item["inputs"]]
            sig = f"{item['name']}({','.join(types)})"
            table[function_signature_to_4byte_selector(sig)] = (
                item["name"],
                types,
                [i["name"] or f"arg{n}" for n, i in enumerate(item["inputs"])],
            )
    return table


def decode_revert(data: bytes, table: dict[bytes, _ErrorSpec]) -> ContractRevertError:
    """Turn raw revert data into a ContractRevertError naming the error and its arguments."""
    if len(data) < 4:
        return ContractRevertError("UnknownRevert", {"data": data}, data)
    spec = table.get(data[:4])
    if spec is None:
        return ContractRevertError("UnknownError", {"selector": data[:4], "data": data[4:]}, data)
    name, types, names = spec
    cls = StageAssignmentError if name in StageAssignmentError.EXPLANATIONS else ContractRevertError
    try:
        values = abi_decode(types, data[4:])
    except Exception:  # malformed payload: still name the error
        return cls(name, {"data": data[4:]}, data)
    from eth_utils import to_checksum_address

    args = {
        n: (to_checksum_address(v) if t == "address" else v) for n, t, v in zip(names, types, values, strict=True)
    }
    return cls(name, args, data)


def revert_data_of(exc: BaseException) -> bytes | None:
    """Extract revert bytes from a web3 / eth-tester exception, if it carries any."""
    candidates: list[Any] = []
    if isinstance(exc, ContractCustomError | ContractLogicError | ContractPanicError):
        candidates.append(getattr(exc, "data", None))
    candidates.extend(getattr(exc, "args", ()))
    for c in candidates:
        if isinstance(c, dict):
            c = c.get("data")
        if isinstance(c, bytes | bytearray) and len(c) >= 4:
            return bytes(c)
        if isinstance(c, str) and c.startswith(_TESTER_PREFIX + "b"):  # eth-tester: repr of the bytes
            try:
                parsed = ast.literal_eval(c[len(_TESTER_PREFIX):])
            except (ValueError, SyntaxError):
                continue
            if isinstance(parsed, bytes) and len(parsed) >= 4:
                return parsed
        if isinstance(c, str) and c.startswith("0x") and len(c) >= 10:
            try:
                return bytes.fromhex(c[2:])
            except ValueError:
                continue
    return None
