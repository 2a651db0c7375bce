"""The SQLite store: migrations, WAL, batched writer, queries, unwritable files."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from llm_manager.store.db import MERGE_ROWS, MERGE_SIZES, Database, merged
from llm_manager.store.migrations import MIGRATIONS
from llm_manager.store.usage import RequestRecord, UsageStore


def record(
    model: str, started: float, prompt: int, completion: int, status: int = 200
) -> RequestRecord:
    return RequestRecord(
        model=model,
        endpoint="/v1/chat/completions",
        method="POST",
        started_at=started,
        ended_at=started + 1,
        status=status,
        duration_ms=1000,
        ttfb_ms=10,
        prompt_tokens=prompt,
        completion_tokens=completion,
    )


def test_migrations_and_wal_of_the_file(tmp_path: Path) -> None:
    """SQLite's own: the file in WAL mode, every migration recorded. What both stores do
    with records is in test_store_backends.py."""
    db = Database(tmp_path / "x.db")
    assert db.open()
    UsageStore(db).add(record("a", 1_699_999_200.0, 5, 7))
    assert db.flush()
    with sqlite3.connect(tmp_path / "x.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        versions = conn.execute("SELECT version FROM schema_migrations ORDER BY version")
        assert versions.fetchall() == [(v,) for v, _ in MIGRATIONS]
    db.close()


def test_unopenable_path_keeps_serving(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the data directory should be")
    db = Database(blocker / "x.db")
    assert db.open() is False
    assert db.last_error is not None and "cannot open" in db.last_error
    UsageStore(db).add(record("a", time.time(), 1, 1))  # dropped, counted, no exception
    assert db.dropped == 1
    assert db.flush()


def test_failed_writes_are_retried_when_the_file_recovers(tmp_path: Path) -> None:
    db = Database(tmp_path / "x.db")
    assert db.open()
    store = UsageStore(db)
    # Break the table under the writer, as a corrupt or foreign schema change would.
    with sqlite3.connect(tmp_path / "x.db") as conn:
        conn.execute("ALTER TABLE requests RENAME TO requests_moved")
    store.add(record("a", time.time(), 1, 1))
    db.flush()
    assert db.last_error is not None and "requests" in db.last_error
    with sqlite3.connect(tmp_path / "x.db") as conn:
        conn.execute("ALTER TABLE requests_moved RENAME TO requests")
    deadline = time.monotonic() + 5
    while db.written == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert db.written == 1 and db.last_error is None
    assert store.recent()[0]["model"] == "a"
    db.close()


def test_merged_inserts_keep_every_row_and_the_order(tmp_path: Path) -> None:
    """Runs of one INSERT become multi-row statements; other writes keep their place."""
    insert = "INSERT INTO t (a, b) VALUES (?, ?)"
    other = "INSERT INTO u (a) VALUES (?)"
    rows = [(insert, (i, f"r{i}")) for i in range(MERGE_ROWS + 3)]
    writes = [*rows[:2], ("DELETE FROM t WHERE a = ?", (0,)), *rows[2:], (other, (9,))]
    statements = list(merged(writes))
    assert [len(params) for _, params in statements] == [2, 2, 1, 2 * MERGE_ROWS, 2, 1]
    assert statements[3][0].count("(?, ?)") == MERGE_ROWS
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (a, b)")
    conn.execute("CREATE TABLE u (a)")
    for sql, params in statements:
        conn.execute(sql, params)
    kept = conn.execute("SELECT a, b FROM t ORDER BY rowid").fetchall()
    assert kept == [(i, f"r{i}") for i in range(1, MERGE_ROWS + 3)]
    assert conn.execute("SELECT a FROM u").fetchall() == [(9,)]


def test_merged_inserts_use_few_distinct_statements() -> None:
    """Each distinct statement text is cached by sqlite3: batch sizes must not each make one."""
    insert = "INSERT INTO t (a) VALUES (?)"
    texts = set()
    for size in range(1, 700):
        texts |= {sql for sql, _ in merged([(insert, (n,)) for n in range(size)])}
    assert len(texts) == len(MERGE_SIZES)
