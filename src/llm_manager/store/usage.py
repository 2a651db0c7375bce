"""Request records (one row per forwarded request) and the queries over them."""

from __future__ import annotations

import operator
import time
from dataclasses import dataclass, field
from typing import Any

from llm_manager.store.db import Connection, Database

_COLUMNS = (
    "model",
    "endpoint",
    "method",
    "status",
    "stream",
    "started_at",
    "ended_at",
    "duration_ms",
    "ttfb_ms",
    "prompt_tokens",
    "completion_tokens",
    "cache_n",
    "prompt_n",
    "predicted_n",
    "error",
)
_INSERT = (
    f"INSERT INTO requests ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' for _ in _COLUMNS)})"
)
_VALUES = operator.attrgetter(*_COLUMNS)
BUCKETS = {"hour": 3600, "day": 86400}


@dataclass
class RequestRecord:
    model: str
    endpoint: str
    method: str
    started_at: float = field(default_factory=time.time)
    status: int = 0
    stream: bool = False
    ended_at: float = 0.0
    duration_ms: float = 0.0
    ttfb_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cache_n: int | None = None
    prompt_n: int | None = None
    predicted_n: int | None = None
    error: str | None = None
    overhead_ms: float | None = None  # for metrics and the response header; not stored
    wait_ms: float | None = None  # arrival to forwarded (turn, queue, start); metrics only


class UsageStore:
    """Writes records through the database's writer; reads run in a worker thread."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def add(self, record: RequestRecord) -> None:
        # attrgetter, not dataclasses.asdict: this runs once per relayed request.
        self._db.submit(_INSERT, _VALUES(record))

    def recent(
        self,
        limit: int = 100,
        model: str | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> list[dict[str, Any]]:
        where, params = _filters(model, since, until)
        sql = f"SELECT id, {', '.join(_COLUMNS)} FROM requests{where} ORDER BY id DESC LIMIT ?"

        def query(conn: Connection) -> list[dict[str, Any]]:
            rows = conn.execute(sql, [*params, limit]).fetchall()
            return [{**dict(r), "stream": bool(r["stream"])} for r in rows]

        return self._db.read(query)

    def summary(
        self,
        since: float | None,
        until: float | None,
        bucket: str = "hour",
        model: str | None = None,
    ) -> dict[str, Any]:
        """Totals per model and a series of buckets (UTC hours or days) per model."""
        size = BUCKETS[bucket]
        where, params = _filters(model, since, until)
        sums = (
            "COUNT(*) AS requests, "
            "COALESCE(SUM(prompt_tokens), 0) AS prompt_tokens, "
            "COALESCE(SUM(completion_tokens), 0) AS completion_tokens, "
            "SUM(CASE WHEN status >= 400 OR status = 0 THEN 1 ELSE 0 END) AS errors, "
            "AVG(duration_ms) AS avg_duration_ms, AVG(ttfb_ms) AS avg_ttfb_ms"
        )
        totals_sql = f"SELECT model, {sums} FROM requests{where} GROUP BY model ORDER BY model"
        series_sql = (
            f"SELECT model, {self._db.bucket('started_at', size)} AS start, {sums} "
            f"FROM requests{where} GROUP BY model, start ORDER BY model, start"
        )

        def query(conn: Connection) -> dict[str, Any]:
            totals = {r["model"]: _row(r) for r in conn.execute(totals_sql, params)}
            series: dict[str, list[dict[str, Any]]] = {}
            for r in conn.execute(series_sql, params):
                series.setdefault(r["model"], []).append({"start": r["start"], **_row(r)})
            return {"totals": totals, "series": series}

        return self._db.read(query)


def _row(r: Any) -> dict[str, Any]:
    return {
        "requests": r["requests"],
        "prompt_tokens": r["prompt_tokens"],
        "completion_tokens": r["completion_tokens"],
        "errors": r["errors"],
        "avg_duration_ms": r["avg_duration_ms"],
        "avg_ttfb_ms": r["avg_ttfb_ms"],
    }


def _filters(model: str | None, since: float | None, until: float | None) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    if model is not None:
        clauses.append("model = ?")
        params.append(model)
    if since is not None:
        clauses.append("started_at >= ?")
        params.append(since)
    if until is not None:
        clauses.append("started_at < ?")
        params.append(until)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params
