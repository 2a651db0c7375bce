"""Request records and token usage: ``GET /api/requests``, ``GET /api/usage``."""

from __future__ import annotations

import asyncio
import math
import time
from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Query

from llm_manager.config import parse_duration
from llm_manager.errors import BadRequest
from llm_manager.models.supervisor import Supervisor
from llm_manager.store.usage import UsageStore

TIME_HELP = "Unix seconds, ISO 8601 (2026-11-27T10:00), or a duration ago (24h, 7d)."


def parse_time(value: str | None, name: str) -> float | None:
    if value is None or value == "":
        return None
    seconds = _parse_time(value, name)
    # Far past or future moments (0001-01-01, 1e300) and nan/inf are not times a record
    # can have: a clear 400, never an overflow further down.
    if not math.isfinite(seconds) or not _EARLIEST <= seconds <= _LATEST:
        raise BadRequest(f"{name}: {value!r} is out of range ({TIME_HELP})")
    return seconds


_EARLIEST = 0.0  # 1970-01-01
_LATEST = 253402300799.0  # 9999-12-31T23:59:59Z


def _parse_time(value: str, name: str) -> float:
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return time.time() - parse_duration(value)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(value)
        if moment.tzinfo is None:
            moment = moment.astimezone()  # a naive time is the server's local time
        return moment.timestamp()
    except (ValueError, OverflowError, OSError):
        raise BadRequest(f"{name}: {value!r} is not a time ({TIME_HELP})") from None


def router(supervisor: Supervisor, store: UsageStore) -> APIRouter:
    api = APIRouter(prefix="/api", tags=["usage"])

    def model_filter(model: str | None) -> str | None:
        return supervisor.resolve(model).name if model else None

    @api.get("/requests", summary="Recent request records, newest first")
    async def requests(
        model: str | None = Query(None, description="Only this model (name or alias)."),
        limit: int = Query(100, ge=1, le=10000),
        since: str | None = Query(None, description=TIME_HELP),
        until: str | None = Query(None, description=TIME_HELP),
    ) -> dict[str, Any]:
        name = model_filter(model)
        rows = await asyncio.to_thread(
            store.recent, limit, name, parse_time(since, "since"), parse_time(until, "until")
        )
        return {"success": True, "count": len(rows), "requests": rows}

    @api.get("/usage", summary="Token totals and an hourly or daily series per model")
    async def usage(
        model: str | None = Query(None, description="Only this model (name or alias)."),
        since: str | None = Query("24h", description=TIME_HELP),
        until: str | None = Query(None, description=TIME_HELP),
        bucket: Literal["hour", "day"] = Query("hour"),
    ) -> dict[str, Any]:
        name = model_filter(model)
        start, end = parse_time(since, "since"), parse_time(until, "until")
        data = await asyncio.to_thread(store.summary, start, end, bucket, name)
        totals = data["totals"].values()
        overall = {
            key: sum(t[key] for t in totals)
            for key in ("requests", "prompt_tokens", "completion_tokens", "errors")
        }
        return {
            "success": True,
            "since": start,
            "until": end,
            "bucket": bucket,
            "total": overall,
            **data,
        }

    return api
