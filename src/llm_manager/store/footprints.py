"""Measured memory footprints in SQLite: one row per (model, scheme, scheme device key)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from llm_manager.store.db import Connection, Database

_COLUMNS = (
    "model",
    "scheme",
    "device",
    "definition",
    "load_peak_mib",
    "serve_peak_mib",
    "runs",
    "updated_at",
)
# A whole row each time: the book holds the truth (peaks over runs) and the writer commits
# rows in order, so the newest row of a key wins. An upsert in the words SQLite and
# PostgreSQL share; it does not end in "VALUES (...)", so the writer never merges two rows
# of one key into one statement (PostgreSQL refuses that).
_SAVE = (
    f"INSERT INTO footprints ({', '.join(_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in _COLUMNS)}) "
    "ON CONFLICT (model, scheme, device) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS[3:])
)


@dataclass(frozen=True)
class Footprint:
    """What one scheme was seen to hold on one of its devices, over its runs.

    ``definition`` fingerprints the scheme (command, script, environment): a measurement
    of another definition says nothing about this one. Peaks in MiB; None = not seen yet.
    ``load_peak`` is the most held before the first request of a run, ``serve_peak`` the
    most held while serving.
    """

    model: str
    scheme: str
    device: str
    definition: str
    load_peak: int | None
    serve_peak: int | None
    runs: int
    updated_at: float

    @property
    def peak(self) -> int | None:
        seen = [v for v in (self.load_peak, self.serve_peak) if v is not None]
        return max(seen) if seen else None


class FootprintStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    def save(self, fp: Footprint) -> None:
        self._db.submit(
            _SAVE,
            (
                fp.model,
                fp.scheme,
                fp.device,
                fp.definition,
                fp.load_peak,
                fp.serve_peak,
                fp.runs,
                fp.updated_at,
            ),
        )

    async def forget(self, model: str) -> int:
        """Delete a model's rows (after every row submitted before); how many there were."""

        def delete(conn: Connection) -> int:
            return int(conn.execute("DELETE FROM footprints WHERE model = ?", (model,)).rowcount)

        return await asyncio.wrap_future(self._db.call(delete))

    def load_all(self) -> list[Footprint]:
        def query(conn: Connection) -> list[Footprint]:
            rows = conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM footprints").fetchall()
            return [Footprint(*tuple(r)) for r in rows]

        return self._db.read(query)
