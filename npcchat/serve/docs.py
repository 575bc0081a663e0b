"""``/docs``: the interactive API page, served with no internet.

FastAPI's default page loads Swagger UI's script and styles from a CDN, so on a studio's
offline network (or this project's own machines) it is blank. Here the assets come from the
``swagger-ui-bundle`` package (Swagger UI's release files, packaged for Python) and are
served by this server under ``/docs/assets``: FastAPI's documented self-hosting recipe.
ReDoc has no such package, so ``/redoc`` is off rather than blank.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = "/docs/assets"


def swagger_assets() -> Path:
    from swagger_ui_bundle import swagger_ui_path

    return Path(str(swagger_ui_path))


def mount(app: FastAPI) -> None:
    """``/docs`` and its assets (the app must be created with ``docs_url=None``)."""
    app.mount(ASSETS, StaticFiles(directory=swagger_assets()), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} API",
            swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS}/favicon-32x32.png",
        )
