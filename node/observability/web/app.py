"""The status page as an ASGI app: `/` (the page), `/static/*` (its assets), `/api/status` (one snapshot)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent / "static"

Source = Callable[[], Awaitable[dict[str, Any]]]  # returns the snapshot the page shows (node.observability.web.snapshot)


def make_app(source: Source, poll_s: float = 1.0) -> Starlette:
    """The page app reading its data from `source`; the page polls `/api/status` every `poll_s` seconds."""

    async def index(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-store"})

    async def status(request: Request) -> Response:
        snap = await source()
        return JSONResponse({**snap, "poll_s": poll_s}, headers={"Cache-Control": "no-store"})

    async def health(request: Request) -> Response:
        return Response(json.dumps({"ok": True}), media_type="application/json")

    return Starlette(routes=[Route("/", index), Route("/api/status", status), Route("/healthz", health),
                             Mount("/static", StaticFiles(directory=STATIC_DIR), name="static")])
