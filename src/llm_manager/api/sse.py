"""What every Server-Sent Events endpoint here shares."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

KEEPALIVE_SECONDS = 15.0  # a comment line after this much silence keeps proxies from closing
KEEPALIVE = b": keep-alive\n\n"
# No caching, and no buffering by a reverse proxy (nginx honours X-Accel-Buffering).
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def response(events: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers=HEADERS)
