"""Start and stop a real anvil process; a flaky HTTP proxy to simulate an endpoint going down."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.waiting import wait_until

ANVIL = Path(__file__).resolve().parents[2] / "contracts/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(url: str) -> bool:
    req = urllib.request.Request(url, data=b'{"jsonrpc":"2.0","id":1,"method":"eth_chainId","params":[]}',
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=1) as resp:
            return b"result" in resp.read()
    except OSError:
        return False


def _start_anvil(port: int, start_timeout_s: float, *extra: str) -> subprocess.Popen[bytes]:
    """Start anvil on `port` and wait until it answers (killed again if it does not)."""
    proc = subprocess.Popen([str(ANVIL), "--host", "127.0.0.1", "--port", str(port), "--silent", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        if proc.poll() is not None:
            err = proc.stderr.read().decode()[-500:] if proc.stderr else ""
            raise RuntimeError(f"anvil exited with {proc.returncode}: {err}")
        return _answers(url)

    try:
        wait_until(answers, start_timeout_s, f"anvil to answer at {url}")
    except BaseException:
        _stop_anvil(proc)
        raise
    return proc


def _stop_anvil(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (anvil dumps its --state file on the way out), SIGKILL after 10 s; close its pipe."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stderr:
        proc.stderr.close()


@contextmanager
def anvil_process(start_timeout_s: float = 30.0) -> Iterator[str]:
    """Run anvil on a free loopback port until the block exits; yield its URL."""
    port = free_port()
    proc = _start_anvil(port, start_timeout_s)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop_anvil(proc)


class RestartableAnvil:
    """One anvil on a fixed loopback port that can be stopped and started again with its chain intact.

    `--state FILE` loads the file at start (when it exists) and dumps the chain to it on exit: blocks,
    receipts, logs and balances survive a `stop()` / `start()`; the URL stays the same (an RPC outage).
    """

    def __init__(self, state_dir: Path, start_timeout_s: float = 30.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        Path(state_dir).mkdir(parents=True, exist_ok=True)  # anvil does not create it (and then dumps nothing)
        self.state = Path(state_dir) / "anvil-state.json"
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0  # completed stop/start cycles

    @property
    def running(self) -> bool:
        return self.proc is not None

    def start(self) -> None:
        if self.proc is None:
            self.proc = _start_anvil(self.port, self.start_timeout_s, "--state", str(self.state))

    def stop(self) -> None:
        if self.proc is not None:
            proc, self.proc = self.proc, None
            _stop_anvil(proc)
            if not self.state.exists():
                raise RuntimeError(f"anvil did not dump its state to {self.state} on exit")

    def restart_after(self, outage_s: float, wait: Callable[[float], None] = time.sleep) -> None:
        """Stop, stay down `outage_s`, start again (same port, same chain)."""
        self.stop()
        wait(outage_s)
        self.start()
        self.restarts += 1


@contextmanager
def restartable_anvil(state_dir: Path, start_timeout_s: float = 30.0) -> Iterator[RestartableAnvil]:
    """A started `RestartableAnvil`, stopped when the block exits (whatever happened inside)."""
    anvil = RestartableAnvil(state_dir, start_timeout_s)
    anvil.start()
    try:
        yield anvil
    finally:
        if anvil.proc is not None:
            proc, anvil.proc = anvil.proc, None
            _stop_anvil(proc)


class FlakyProxy:
    """Forwards JSON-RPC to `upstream`; can refuse requests or swallow responses after forwarding."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.refuse_next = 0  # close the next N connections without forwarding
        self.refuse_all = False  # close every connection without forwarding
        self.swallow_method: str | None = None  # forward once, then drop the response, for this method
        self.forwarded: list[str] = []  # methods forwarded upstream, in order
        self.refused = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                method = json.loads(body).get("method", "?") if body.startswith(b"{") else "batch"
                with proxy._lock:
                    refuse = proxy.refuse_all or proxy.refuse_next > 0
                    if refuse:
                        proxy.refuse_next = max(0, proxy.refuse_next - 1)
                        proxy.refused += 1
                    swallow = not refuse and method == proxy.swallow_method
                    if swallow:
                        proxy.swallow_method = None
                if refuse:
                    self.close_connection = True
                    return
                req = urllib.request.Request(proxy.upstream, data=body, headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=10) as resp:
                    data = resp.read()
                with proxy._lock:
                    proxy.forwarded.append(method)
                if swallow:
                    self.close_connection = True
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def sends(self) -> int:
        """How many eth_sendRawTransaction calls reached upstream."""
        with self._lock:
            return self.forwarded.count("eth_sendRawTransaction")

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
