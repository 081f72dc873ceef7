"""Serve the status page with hypercorn on the caller's trio loop (a node's nursery, or a thread of its own)."""

from __future__ import annotations

import logging
import threading
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app
from starlette.applications import Starlette


class StatusPageError(RuntimeError):
    """The status page could not be served (port taken, bad address)."""


def _config(host: str, port: int, graceful_s: float) -> Config:
    cfg = Config()
    cfg.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    cfg.accesslog = None  # one line per poll would drown the node's log
    cfg.errorlog = logging.getLogger("pmn.status_page")  # quiet unless the application logs at WARNING+
    cfg.graceful_timeout = graceful_s
    return cfg


def page_url(bind: str) -> str:
    """`http://host:port/` from a hypercorn bind string."""
    return bind.rstrip("/") + "/"


async def serve_page(app: Starlette, host: str, port: int, graceful_s: float = 1.0,
                     task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve `app` on host:port (0 = any free port) until cancelled; `task_status.started(url)`."""

    class _Started:
        def started(self, binds: list[str] | None = None) -> None:
            task_status.started(page_url(binds[0]) if binds else "")

    cfg = _config(host, port, graceful_s)
    try:  # our own sockets (hypercorn's `serve` would make them): a taken port is one clear error, and they
        sockets = cfg.create_sockets()  # are closed here however serving ends (no ResourceWarning)
        for sock in sockets.insecure_sockets:
            sock.listen(cfg.backlog)
    except OSError as exc:
        raise StatusPageError(f"cannot serve the status page on {host}:{port}: {exc}") from exc
    try:
        await worker_serve(wrap_app(app, cfg.wsgi_max_body_size, None),  # type: ignore[arg-type]
                           cfg, sockets=sockets, task_status=_Started())  # type: ignore[arg-type]
    finally:
        for sock in sockets.insecure_sockets:
            sock.close()


class PageThread:
    """The page served from a thread with its own trio loop (for a process that is not itself on trio,
    like `pmn demo`); `url` once started, `stop()` ends it and joins the thread."""

    def __init__(self, app: Starlette, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 10.0) -> None:
        self.url = ""
        self._error: BaseException | None = None
        self._ready = threading.Event()
        self._stop: trio.Event | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._thread = threading.Thread(target=self._run, args=(app, host, port), name="status-page", daemon=True)
        self._thread.start()
        if not self._ready.wait(start_timeout_s):
            raise StatusPageError(f"the status page did not start within {start_timeout_s} s")
        if self._error is not None:
            raise StatusPageError(str(self._error)) from self._error

    def _run(self, app: Starlette, host: str, port: int) -> None:
        async def main() -> None:
            self._stop = trio.Event()
            self._token = trio.lowlevel.current_trio_token()
            async with trio.open_nursery() as nursery:
                self.url = await nursery.start(serve_page, app, host, port)
                self._ready.set()
                await self._stop.wait()
                nursery.cancel_scope.cancel()

        try:
            trio.run(main)
        except BaseException as exc:  # reported to the starting thread
            self._error = exc
        finally:
            self._ready.set()

    def stop(self) -> None:
        """Stop serving (idempotent)."""
        if self._token is not None and self._stop is not None and self._thread.is_alive():
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        self._thread.join(timeout=10)
