"""Log endpoints: the live SSE stream, statistics, clearing."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from llm_manager.api import sse
from llm_manager.api.sse import KEEPALIVE_SECONDS
from llm_manager.api.usage import TIME_HELP, parse_time
from llm_manager.logs import LogBook, LogLine, Subscription
from llm_manager.messages import Messages
from llm_manager.models.supervisor import Supervisor


def _event(kind: str, line: LogLine | None = None, **extra: Any) -> bytes:
    body: dict[str, Any] = {"type": kind}
    if line is not None:
        body["log"] = {
            "timestamp": line.timestamp,
            "message": line.message,
            "stream": line.stream,
            "level": line.level,  # from the line's content, not its stream
            "seq": line.seq,
        }
    body.update(extra)
    return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"


def router(supervisor: Supervisor, logbook: LogBook, say: Messages) -> APIRouter:
    api = APIRouter(prefix="/api", tags=["logs"])

    @api.get(
        "/models/{alias:path}/logs/stream",
        summary="A model's log as Server-Sent Events: history, then live lines",
        response_class=StreamingResponse,
    )
    async def stream(
        alias: str,
        history: int | None = Query(
            None, ge=0, description="Lines of history to send first (default: all kept)."
        ),
        follow: bool = Query(True, description="Keep streaming new lines after the history."),
        since: str | None = Query(None, description="Only history from then on. " + TIME_HELP),
    ) -> StreamingResponse:
        runtime = supervisor.resolve(alias)
        cutoff = parse_time(since, "since")
        model_log = runtime.log
        if follow:
            past, subscription = model_log.subscribe()
        else:
            past, subscription = model_log.lines(), None
        if cutoff is not None:
            past = [line for line in past if line.timestamp >= cutoff]
        if history is not None:
            past = past[-history:] if history else []

        async def events() -> AsyncIterator[bytes]:
            try:
                for line in past:
                    yield _event("historical", line)
                yield _event("historical_complete", count=len(past))
                if subscription is None:
                    yield _event("stream_end")
                    return
                while True:
                    try:
                        skipped, lines = await _get(subscription)
                    except TimeoutError:
                        yield sse.KEEPALIVE
                        continue
                    if skipped:
                        note = LogLine(
                            0, time.time(), "manager", f"{skipped} line(s) skipped: reader too slow"
                        )
                        yield _event("realtime", note, skipped=skipped)
                    for line in lines:
                        yield _event("realtime", line)
                    if subscription.closed and not lines:
                        yield _event("stream_end")
                        return
            finally:
                if subscription is not None:
                    model_log.unsubscribe(subscription)

        return sse.response(events())

    @api.get("/logs/stats", summary="How many log lines are kept, per model")
    async def stats() -> dict[str, Any]:
        counts = await logbook.counts()
        names = [r.name for r in supervisor.runtimes]
        per_model = {name: counts.get(name, 0) for name in names}
        return {
            "success": True,
            "stats": {
                "total_models": len(names),
                "total_log_entries": sum(per_model.values()),
                "models_with_logs": sum(1 for n in per_model.values() if n),
                "models": per_model,
                # Per model, the lines kept in memory by level (error, warning, info).
                "levels": logbook.level_counts(),
            },
        }

    @api.post("/logs/{alias:path}/clear", summary="Delete a model's log lines older than N minutes")
    async def clear(
        alias: str,
        keep_minutes: float = Query(
            0, ge=0, allow_inf_nan=False, description="Keep the last N minutes; 0 deletes all."
        ),
    ) -> dict[str, Any]:
        runtime = supervisor.resolve(alias)
        deleted = await logbook.clear(runtime.name, keep_minutes)
        return {
            "success": True,
            "message": say(
                "logs_cleared", name=runtime.name, minutes=f"{keep_minutes:g}", count=deleted
            ),
            "deleted": deleted,
        }

    return api


async def _get(subscription: Subscription) -> tuple[int, list[LogLine]]:
    async with asyncio.timeout(KEEPALIVE_SECONDS):
        return await subscription.get()
