"""Headless Chromium (Debian's `chromium`, never a downloaded browser) driven over the DevTools protocol.

`Browser(profile_dir)` starts it with its own profile, `page.open(url)` loads a page, `page.text(css)`
reads an element's text, `page.screenshot(path)` saves a PNG. Chromium as root (CI) needs --no-sandbox.
Chromium puts its singleton socket in a directory under $TMPDIR that it does not remove, and aborts when that
socket's path is longer than a unix socket's 107 bytes (a pytest tmp_path easily is): the browser gets a short
directory of its own under the system's temp directory as its TMPDIR, and `close()` removes it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection, connect

from tests.waiting import wait_until

START_TIMEOUT_S = 30.0  # time for chromium to write its DevTools port
CALL_TIMEOUT_S = 30.0  # time for one DevTools call to answer


def chromium_path() -> str | None:
    """The system chromium, or None."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Page:
    """One tab, over its DevTools websocket."""

    def __init__(self, ws_url: str) -> None:
        self._stack = ExitStack()
        self.ws: ClientConnection = self._stack.enter_context(
            connect(ws_url, max_size=64 * 1024 * 1024, open_timeout=CALL_TIMEOUT_S))
        self._id = 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        deadline = time.monotonic() + CALL_TIMEOUT_S
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise AssertionError(f"DevTools {method} failed: {msg['error']}")
                return dict(msg.get("result", {}))

    def open(self, url: str) -> None:
        self.call("Page.enable")
        self.call("Page.navigate", url=url)

    def eval(self, expression: str) -> Any:
        out = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in out:
            raise AssertionError(f"page script failed: {out['exceptionDetails']}")
        return out.get("result", {}).get("value")

    def text(self, selector: str) -> str | None:
        return self.eval(f"(e => e ? e.textContent : null)(document.querySelector({json.dumps(selector)}))")

    def screenshot(self, path: Path) -> Path:
        import base64

        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        return path

    def close(self) -> None:
        self._stack.close()


class Browser:
    """A headless chromium process with a DevTools port; `close()` ends it."""

    def __init__(self, profile_dir: Path, width: int = 1400, height: int = 1100) -> None:
        exe = chromium_path()
        if exe is None:
            raise AssertionError("chromium is not installed (apt-get install -y chromium)")
        profile_dir.mkdir(parents=True, exist_ok=True)
        # the browser's TMPDIR (its singleton socket's directory): short, so the socket's path fits
        self.tmp_dir = Path(tempfile.mkdtemp(prefix="pmn-chromium-"))
        self.log_path = profile_dir / "chromium.log"
        self.log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1", f"--user-data-dir={profile_dir}",
             f"--window-size={width},{height}", "about:blank"], stdout=self.log, stderr=subprocess.STDOUT,
            env={**os.environ, "TMPDIR": str(self.tmp_dir)})
        try:
            port_file = profile_dir / "DevToolsActivePort"
            lines = wait_until(lambda: self._port_lines(port_file), START_TIMEOUT_S, "chromium's DevTools port")
            self.http = f"http://127.0.0.1:{int(lines[0])}"
        except BaseException:
            self.close()
            raise

    def _port_lines(self, path: Path) -> list[str] | None:
        if self.proc.poll() is not None:
            self.log.flush()
            tail = self.log_path.read_text(errors="replace").strip().splitlines()[-3:]
            raise AssertionError(f"chromium exited with {self.proc.returncode}: " + " | ".join(tail))
        lines = path.read_text().split() if path.exists() else []
        return lines if len(lines) >= 2 else None

    def page(self) -> Page:
        with urllib.request.urlopen(self.http + "/json/list", timeout=CALL_TIMEOUT_S) as r:
            targets = json.load(r)
        tab = next(t for t in targets if t.get("type") == "page")
        return Page(tab["webSocketDebuggerUrl"])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
