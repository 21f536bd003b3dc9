"""The web dashboard: static files, shipped inside the package, served at `/dashboard`.

The page itself does the work in the browser: it subscribes to `/api/v1/agents/stream` with
an `EventSource` and redraws on every snapshot. The balancer only hands out three files.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import resources

from aiohttp import web

STATIC = resources.files("rower.balancer") / "dashboard_static"

FILES = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "style.css": "text/css",
}


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _file_handler(name: str, content_type: str) -> Handler:
    body = (STATIC / name).read_bytes()

    async def handle(request: web.Request) -> web.Response:
        return web.Response(
            body=body,
            content_type=content_type,
            charset="utf-8",
            headers={"Cache-Control": "no-cache"},
        )

    return handle


async def _to_dashboard(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/dashboard")


def dashboard_paths() -> list[str]:
    """Every path the dashboard's files are served at."""
    return ["/dashboard", "/dashboard/", *(f"/dashboard/{name}" for name in FILES)]


def add_dashboard_routes(app: web.Application) -> None:
    """Serve the dashboard on the management application."""
    app.router.add_get("/dashboard", _file_handler("index.html", FILES["index.html"]))
    app.router.add_get("/dashboard/", _to_dashboard)
    for name, content_type in FILES.items():
        app.router.add_get(f"/dashboard/{name}", _file_handler(name, content_type))
