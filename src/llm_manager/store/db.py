"""The database file: one writer thread with a queue, readers on their own connections.

Writes never block the event loop: callers enqueue rows; the writer commits whatever has
queued up as one transaction (batching grows with load). A failing write (read-only file,
full disk) is logged and kept for retry, bounded, so that serving goes on.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from llm_manager.errors import StorageUnavailable
from llm_manager.store.migrations import MIGRATIONS

log = logging.getLogger(__name__)
T = TypeVar("T")

Write = tuple[str, Sequence[Any]]
MAX_RETAINED = 100_000  # rows kept in memory while the file cannot be written
MERGE_ROWS = 256  # rows per multi-row INSERT (x 15 columns, well under SQLite's 32,766 variables)
MERGE_SIZES = (MERGE_ROWS, 64, 16, 4, 1)  # the row counts used: few distinct statements


def connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    else:
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout = 5000")
    return conn


def migrate(conn: sqlite3.Connection) -> int:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations"
        " (version INTEGER PRIMARY KEY, applied_at REAL)"
    )
    done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
    for version, sql in MIGRATIONS:
        if version in done:
            continue
        conn.execute("BEGIN")
        try:
            for statement in sql.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                (version, time.time()),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return max((v for v, _ in MIGRATIONS), default=0)


class _Call:
    def __init__(self, fn: Callable[[sqlite3.Connection], Any], future: Any) -> None:
        self.fn = fn
        self.future = future

    def run(self, conn: sqlite3.Connection) -> None:
        if not self.future.set_running_or_notify_cancel():
            return
        try:
            conn.execute("BEGIN")
            result = self.fn(conn)
            conn.execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                exc = StorageUnavailable("the database cannot be written", str(exc))
            self.future.set_exception(exc)
        else:
            self.future.set_result(result)


class Database:
    """Owns the SQLite file. ``submit`` from any thread; ``read`` runs in the caller's thread."""

    def __init__(self, path: Path, batch_interval: float = 0.2) -> None:
        self.path = path
        self.last_error: str | None = None
        self.written = 0
        self.dropped = 0
        self.batch_interval = batch_interval
        self._wake = threading.Event()  # cuts a batch's wait short: flush and close
        self._queue: queue.SimpleQueue[Write | threading.Event | _Call | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._local = threading.local()

    def open(self) -> bool:
        """Open and migrate; False (logged, in ``last_error``) when the file is unusable:
        the manager keeps serving without records rather than not at all."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = connect(self.path)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            migrate(conn)
        except (OSError, sqlite3.Error) as exc:
            self.last_error = f"cannot open {self.path}: {exc}"
            log.error("%s; request records will not be kept", self.last_error)
            return False
        self._thread = threading.Thread(
            target=self._writer, args=(conn,), name="sqlite-writer", daemon=True
        )
        self._thread.start()
        return True

    def status(self) -> dict[str, Any]:
        """For /health: whether records are being written, and what went wrong if not."""
        return {
            "ok": self._thread is not None and self.last_error is None,
            "error": self.last_error,
            "written": self.written,
            "dropped": self.dropped,
        }

    def submit(self, sql: str, params: Sequence[Any]) -> None:
        if self._thread is None:
            self.dropped += 1
            return
        self._queue.put((sql, params))

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything submitted so far is committed (or has failed)."""
        if self._thread is None:
            return True
        done = threading.Event()
        self._queue.put(done)
        self._wake.set()
        return done.wait(timeout)

    def close(self) -> None:
        if self._thread is None:
            return
        self._queue.put(None)
        self._wake.set()
        self._thread.join(30)
        self._thread = None

    def call(self, fn: Callable[[sqlite3.Connection], T]) -> concurrent.futures.Future[T]:
        """Run ``fn`` in one transaction on the writer thread, after every write submitted
        before it (deletes that must see earlier inserts); the future holds its result."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        if self._thread is None:
            future.set_exception(self._unavailable())
            return future
        self._queue.put(_Call(fn, future))
        self._wake.set()
        return future

    def read(self, query: Callable[[sqlite3.Connection], T]) -> T:
        """Run a read on this thread's own connection (WAL: readers never wait for the writer)."""
        if self._thread is None:
            raise self._unavailable()
        try:
            conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
            if conn is None:
                conn = connect(self.path)
                self._local.conn = conn
            return query(conn)
        except sqlite3.Error as exc:
            raise StorageUnavailable("the database cannot be read", str(exc)) from None

    def _unavailable(self) -> StorageUnavailable:
        return StorageUnavailable(
            "the database is not available", self.last_error or "the database is closed"
        )

    def _writer(self, conn: sqlite3.Connection) -> None:
        pending: list[Write] = []
        while True:
            items: list[Write | threading.Event | _Call | None] = []
            with contextlib.suppress(queue.Empty):
                # With writes waiting for a retry, wake up every second to try again.
                items.append(self._queue.get(timeout=1.0 if pending else None))
            if items and isinstance(items[0], tuple):
                # Let a batch gather: one commit (and one wake-up of this thread) per
                # interval under load, instead of one per request on the serving path.
                self._wake.wait(self.batch_interval)
                self._wake.clear()
            while True:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = False
            for item in items:
                if isinstance(item, tuple):
                    pending.append(item)
                    continue
                # A marker, a call or the stop: what was submitted before it goes first.
                if pending:
                    self._commit(conn, pending)
                if item is None:
                    stop = True
                elif isinstance(item, threading.Event):
                    item.set()
                else:
                    item.run(conn)
            if pending:
                self._commit(conn, pending)
            if stop:
                break
        conn.close()

    def _commit(self, conn: sqlite3.Connection, pending: list[Write]) -> None:
        try:
            conn.execute("BEGIN")
            for sql, params in merged(pending):
                conn.execute(sql, params)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            if self.last_error != str(exc):
                log.error("cannot write to %s: %s (will retry)", self.path, exc)
            self.last_error = str(exc)
            if len(pending) > MAX_RETAINED:
                dropped = len(pending) - MAX_RETAINED
                log.error("dropping %d unwritten record(s): database unwritable", dropped)
                del pending[:dropped]
            return
        self.written += len(pending)
        self.last_error = None
        pending.clear()


def merged(pending: Sequence[Write]) -> Iterator[Write]:
    """The writes, with runs of the same ``INSERT ... VALUES (?, ...)`` merged into multi-row
    INSERTs of MERGE_SIZES rows.

    Why: sqlite3 releases the GIL around every statement it runs. Under load, one statement
    per row made the writer thread and the event loop trade the GIL hundreds of times per
    batch (measured: about 70 us of the manager's CPU per relayed request). A merged
    statement is one release per up to 256 rows. Only a few fixed row counts are used: each
    distinct statement text stays in sqlite3's statement cache (128 entries), and one per
    batch size made the manager's memory grow by ~25 MiB.
    """
    i = 0
    while i < len(pending):
        sql, params = pending[i]
        at = sql.rfind(" VALUES (")
        j = i + 1
        if at >= 0 and sql.endswith(")"):
            while j < len(pending) and j - i < MERGE_ROWS and pending[j][0] == sql:
                j += 1
        run = j - i
        size = next(size for size in MERGE_SIZES if size <= run)
        if size == 1:
            yield sql, params
            i += 1
            continue
        row = sql[at + len(" VALUES ") :]
        values = [value for _, row_params in pending[i : i + size] for value in row_params]
        yield sql + ("," + row) * (size - 1), values
        i += size
