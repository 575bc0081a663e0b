"""``/ui``: the designer's playground, a page served from the package (no CDN, no build
step at install time). It uses only the server's public HTTP API: the game's ``/v1/turn``
(streamed), the session and NPC routes, ``/healthz``; with ``--api-key`` it asks for the
key and sends it like any client.

Plain JavaScript in one module rather than a framework or htmx: the page mostly renders
JSON the API already returns and reads a streamed turn's Server-Sent Events, which fetch
does natively; a vendored framework would be more code to keep current than the page.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles


def ui_dir() -> Path:
    return Path(str(resources.files("npcchat.serve") / "ui"))


def mount(app: FastAPI) -> None:
    app.mount("/ui/assets", StaticFiles(directory=ui_dir()), name="ui-assets")

    @app.get("/ui", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse((ui_dir() / "index.html").read_text("utf-8"))
