"""Serve the in-process eth-tester chain over HTTP JSON-RPC, so other processes can share it."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from hexbytes import HexBytes
from web3 import Web3

from contracts.chain import is_embedded
from contracts.revert import REVERT_EXCEPTIONS, revert_data_of

_DATA_INTS = {"logsBloom": 256}  # integer fields that JSON-RPC encodes as fixed-size data


def _to_rpc(value: Any, key: str | None = None) -> Any:
    """Convert web3-formatted results back to JSON-RPC wire form (hex quantities and data)."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        if key in _DATA_INTS:
            return "0x" + value.to_bytes(_DATA_INTS[key], "big").hex()
        return hex(value)
    if isinstance(value, bytes | bytearray | HexBytes):
        return "0x" + bytes(value).hex()
    if isinstance(value, Mapping):
        return {k: _to_rpc(v, k) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_rpc(v, key) for v in value]
    return value


def _increase_time(w3: Web3, params: list[Any]) -> str:
    seconds = int(params[0], 16) if isinstance(params[0], str) else int(params[0])
    tester = w3.provider.ethereum_tester  # type: ignore[attr-defined]
    tester.time_travel(int(w3.eth.get_block("latest")["timestamp"]) + seconds + 1)
    return hex(seconds)


def _mine(w3: Web3, params: list[Any]) -> str:
    w3.provider.ethereum_tester.mine_blocks(1)  # type: ignore[attr-defined]
    return "0x0"


_TIME_METHODS: dict[str, Callable[[Web3, list[Any]], str]] = {"evm_increaseTime": _increase_time, "evm_mine": _mine}


def chain_lock(w3: Web3) -> threading.RLock:
    """The lock serialising every request to this embedded chain (installed on first use)."""
    manager: Any = w3.manager
    lock = getattr(manager, "_pmn_lock", None)
    if lock is None:
        lock = threading.RLock()
        inner = manager._make_request

        def locked(method: str, params: Any) -> Any:
            with lock:
                return inner(method, params)

        manager._make_request = locked
        manager._pmn_lock = lock
    return lock


def serve_embedded(w3: Web3, host: str = "127.0.0.1", port: int = 0) -> tuple[str, Callable[[], None]]:
    """Serve `w3`'s embedded chain at http://host:port (port 0 = any free port); return (url, stop).

    eth-tester is not thread-safe: from here on every request through `w3` (in-process callers and HTTP
    clients alike) runs under one lock, `chain_lock(w3)`.
    """
    if not is_embedded(w3):
        raise ValueError("serve_embedded needs a Web3 on the embedded chain (connect(None, ...))")
    lock = chain_lock(w3)

    def handle(req: dict[str, Any]) -> dict[str, Any]:
        rid = req.get("id")
        method, params = req.get("method"), req.get("params") or []
        if not isinstance(method, str):
            return {"jsonrpc": "2.0", "id": rid, "error": {"code": -32600, "message": "invalid request: no method"}}
        try:
            with lock:
                if method in _TIME_METHODS:
                    return {"jsonrpc": "2.0", "id": rid, "result": _TIME_METHODS[method](w3, params)}
                resp = w3.manager._make_request(method, params)  # type: ignore[arg-type]
        except REVERT_EXCEPTIONS as exc:
            data = revert_data_of(exc)
            err: dict[str, Any] = {"code": 3, "message": "execution reverted"}
            if data is not None:
                err["data"] = "0x" + data.hex()
            return {"jsonrpc": "2.0", "id": rid, "error": err}
        except Exception as exc:  # report every other failure to the client instead of dropping it
            return {"jsonrpc": "2.0", "id": rid, "error": {"code": -32000, "message": f"{type(exc).__name__}: {exc}"}}
        out: dict[str, Any] = {"jsonrpc": "2.0", "id": rid}
        if "error" in resp:
            out["error"] = dict(resp["error"])
        else:
            out["result"] = _to_rpc(resp.get("result"))
        return out

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server API
            length = int(self.headers.get("Content-Length", 0))
            try:
                body = json.loads(self.rfile.read(length))
            except ValueError:
                payload: Any = {"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "parse error"}}
            else:
                payload = [handle(r) for r in body] if isinstance(body, list) else handle(body)
            data = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence access logs
            return

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="pmn-embedded-rpc", daemon=True)
    thread.start()
    url = f"http://{host}:{server.server_address[1]}"

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return url, stop
