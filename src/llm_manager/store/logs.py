"""Model log lines in SQLite: batched inserts, history at start-up, clearing, retention."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from llm_manager.store.db import Connection, Database

_INSERT = "INSERT INTO log_lines (model, ts, stream, message) VALUES (?, ?, ?, ?)"


class LogStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    def add_lines(self, model: str, ts: float, stream: str, messages: list[str]) -> None:
        """The lines of one read, with one timestamp: one hand-over to the writer."""
        self._db.submit_many(_INSERT, ((model, ts, stream, message) for message in messages))

    def recent(self, model: str, limit: int) -> list[tuple[float, str, str]]:
        """The newest ``limit`` lines of a model, oldest first."""

        def query(conn: Connection) -> list[tuple[float, str, str]]:
            rows = conn.execute(
                "SELECT ts, stream, message FROM log_lines WHERE model = ? "
                "ORDER BY id DESC LIMIT ?",
                (model, limit),
            ).fetchall()
            return [(r[0], r[1], r[2]) for r in reversed(rows)]

        return self._db.read(query)

    def counts(self) -> dict[str, int]:
        def query(conn: Connection) -> dict[str, int]:
            rows = conn.execute("SELECT model, COUNT(*) FROM log_lines GROUP BY model")
            return {r[0]: r[1] for r in rows}

        return self._db.read(query)

    async def delete_before(self, model: str, cutoff: float) -> int:
        """Delete a model's lines older than ``cutoff`` (after every pending insert)."""

        def delete(conn: Connection) -> int:
            cur = conn.execute("DELETE FROM log_lines WHERE model = ? AND ts < ?", (model, cutoff))
            return int(cur.rowcount)

        return await asyncio.wrap_future(self._db.call(delete))

    async def apply_retention(self, max_age: float, max_lines: int) -> int:
        """Drop lines older than ``max_age`` seconds (0 = keep) and beyond ``max_lines``
        per model (0 = no limit); returns how many went."""

        def prune(conn: Connection) -> int:
            removed = 0
            if max_age > 0:
                cur = conn.execute("DELETE FROM log_lines WHERE ts < ?", (time.time() - max_age,))
                removed += cur.rowcount
            if max_lines > 0:
                models: list[Any] = conn.execute("SELECT DISTINCT model FROM log_lines").fetchall()
                for (model,) in models:
                    row = conn.execute(
                        "SELECT id FROM log_lines WHERE model = ? ORDER BY id DESC "
                        "LIMIT 1 OFFSET ?",
                        (model, max_lines),
                    ).fetchone()
                    if row is not None:
                        cur = conn.execute(
                            "DELETE FROM log_lines WHERE model = ? AND id <= ?", (model, row[0])
                        )
                        removed += cur.rowcount
            return removed

        return await asyncio.wrap_future(self._db.call(prune))
