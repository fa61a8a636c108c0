"""The chat page at `/`: static files from webui/, served as they are (no build step, nothing from a CDN).

The page talks to the server only through the public OpenAI API, so it needs no key of its own: the key
guard stays on /v1. A strict Content-Security-Policy lets the browser run only these files and talk only
to this server, whatever a model writes into the page.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from .errors import APIError

WEBUI_DIR = Path(__file__).resolve().parent / "webui"

_MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; connect-src 'self'; img-src 'self' data:; "
                               "style-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # The files are small and change with the server: always revalidated, so an upgrade shows at once.
    "Cache-Control": "no-cache",
}


def chat_page_router() -> APIRouter:
    """GET / (the page) and GET /webui/NAME (its scripts and styles); outside the OpenAPI schema."""
    # Only the files shipped here, looked up by name: no path from the URL ever reaches the filesystem.
    files = {p.name: p for p in WEBUI_DIR.iterdir() if p.suffix in _MEDIA_TYPES}
    router = APIRouter(include_in_schema=False)

    def serve(name: str) -> FileResponse:
        path = files.get(name)
        if path is None:
            raise APIError(404, f"no such file of the chat page: {name}", code="not_found")
        return FileResponse(path, media_type=_MEDIA_TYPES[path.suffix], headers=SECURITY_HEADERS)

    @router.get("/")
    async def index() -> FileResponse:
        return serve("index.html")

    @router.get("/webui/{name}")
    async def asset(name: str) -> FileResponse:
        return serve(name)

    return router
