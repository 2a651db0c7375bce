"""Serves the dashboard: ``GET /ui`` is the page, ``/ui/assets/*`` its script and style.

No build step and nothing fetched from elsewhere: the files in ``static/`` are the page.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from starlette.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent / "static"
NO_CACHE = {"Cache-Control": "no-cache"}


def install(app: FastAPI) -> None:
    @app.get(
        "/ui",
        tags=["system"],
        summary="The dashboard: models, logs, devices, usage, playground",
        response_class=FileResponse,
    )
    async def dashboard() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html", headers=NO_CACHE)

    app.mount("/ui/assets", StaticFiles(directory=STATIC), name="ui-assets")
