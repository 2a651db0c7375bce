"""The store: one writer thread with a queue, readers on their own connections.

Writes never block the event loop: callers enqueue rows; the writer commits whatever has
queued up as one transaction (batching grows with load). A failing write (read-only file,
full disk, a database that went away) is logged and kept for retry, bounded, so that
serving goes on. The SQL is written once, in SQLite's words; a driver (SQLite here,
PostgreSQL in store/postgres.py) connects and says what differs.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from llm_manager.errors import StorageUnavailable
from llm_manager.store.migrations import MIGRATIONS

log = logging.getLogger(__name__)
T = TypeVar("T")

Write = tuple[str, Sequence[Any]]
MAX_RETAINED = 100_000  # rows kept in memory while the store cannot be written
MERGE_ROWS = 256  # rows per multi-row INSERT (x 15 columns, well under SQLite's 32,766 variables)
MERGE_SIZES = (MERGE_ROWS, 64, 16, 4, 1)  # the row counts used: few distinct statements


class Connection(Protocol):
    """What the stores use of a connection: sqlite3's, or store/postgres.py's wrapper."""

    def execute(self, sql: str, params: Sequence[Any] = ..., /) -> Any: ...

    def close(self) -> None: ...


class Driver(Protocol):
    """Connects to one store and says what differs between databases."""

    name: str  # where, for messages: a file path, or a URL without its password
    errors: tuple[type[BaseException], ...]  # what its operations raise when it fails
    migration_lock: str  # SQL run first in the migrations' transaction ("" = none)

    def connect(self, writer: bool) -> Connection: ...

    def prepare(self, conn: Connection) -> None:
        """Once, on the writer's connection, before the migrations."""

    def schema(self, sql: str) -> str:
        """A migration's SQL (SQLite's) in this database's words."""

    def bucket(self, column: str, size: int) -> str:
        """SQL: ``column`` rounded down to a multiple of ``size``."""

    def broken(self, conn: Connection) -> bool:
        """Whether a connection that failed must be replaced (the server went away)."""

    def write(self, conn: Connection, pending: Sequence[Write]) -> None:
        """The writes of one batch, in order, inside the writer's transaction."""


class SqliteDriver:
    errors: tuple[type[BaseException], ...] = (sqlite3.Error,)
    migration_lock = ""  # SQLite locks the file for the writing transaction itself

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = str(path)

    def connect(self, writer: bool) -> Connection:
        if writer:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        return connect(self.path)

    def prepare(self, conn: Connection) -> None:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")

    def schema(self, sql: str) -> str:
        return sql

    def bucket(self, column: str, size: int) -> str:
        return f"CAST({column} / {size} AS INTEGER) * {size}"

    def broken(self, conn: Connection) -> bool:
        return False  # a file: the same connection works again once the file does

    def write(self, conn: Connection, pending: Sequence[Write]) -> None:
        for sql, params in merged(pending):
            conn.execute(sql, params)


def connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    else:
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout = 5000")
    return conn


def migrate(conn: Connection, driver: Driver | None = None) -> int:
    """Apply the migrations not applied yet, all in one transaction (taken under the
    driver's lock: two managers sharing a PostgreSQL database may start at once)."""
    schema = driver.schema if driver is not None else (lambda sql: sql)
    conn.execute("BEGIN")
    try:
        if driver is not None and driver.migration_lock:
            conn.execute(driver.migration_lock)
        conn.execute(
            schema(
                "CREATE TABLE IF NOT EXISTS schema_migrations"
                " (version INTEGER PRIMARY KEY, applied_at REAL)"
            )
        )
        done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations").fetchall()}
        for version, sql in MIGRATIONS:
            if version in done:
                continue
            for statement in schema(sql).split(";"):
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
    def __init__(self, fn: Callable[[Any], Any], future: Any) -> None:
        self.fn = fn
        self.future = future

    def run(self, conn: Connection, errors: tuple[type[BaseException], ...]) -> bool:
        """Run in one transaction; False when the store failed under it."""
        if not self.future.set_running_or_notify_cancel():
            return True
        try:
            conn.execute("BEGIN")
            result = self.fn(conn)
            conn.execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(*errors):
                conn.execute("ROLLBACK")
            failed = isinstance(exc, errors)
            if failed:
                exc = StorageUnavailable("the database cannot be written", str(exc))
            self.future.set_exception(exc)
            return not failed
        self.future.set_result(result)
        return True


class Database:
    """Owns the store: a SQLite file, or a PostgreSQL database (``driver``). ``submit``
    from any thread; ``read`` runs in the caller's thread."""

    def __init__(
        self, path: Path | None = None, batch_interval: float = 0.2, driver: Driver | None = None
    ) -> None:
        if driver is None:
            if path is None:
                raise ValueError("a database needs a file path or a driver")
            driver = SqliteDriver(path)
        self.driver = driver
        self.path = path
        self.last_error: str | None = None
        self.written = 0
        self.dropped = 0
        self.batch_interval = batch_interval
        self._wake = threading.Event()  # cuts a batch's wait short: flush and close
        self._queue: queue.SimpleQueue[Write | list[Write] | threading.Event | _Call | None] = (
            queue.SimpleQueue()
        )
        self._thread: threading.Thread | None = None
        self._local = threading.local()
        self._readers: list[Connection] = []  # every thread's, closed with the store
        self._readers_lock = threading.Lock()

    def open(self) -> bool:
        """Open and migrate; False (logged, in ``last_error``) when the store is unusable:
        the manager keeps serving without records rather than not at all."""
        driver = self.driver
        failures: tuple[type[BaseException], ...] = (OSError, *driver.errors)
        try:
            conn = driver.connect(writer=True)
            driver.prepare(conn)
            migrate(conn, driver)
        except failures as exc:
            self.last_error = f"cannot open {driver.name}: {exc}"
            log.error("%s; request records will not be kept", self.last_error)
            return False
        self._thread = threading.Thread(
            target=self._writer, args=(conn,), name="store-writer", daemon=True
        )
        self._thread.start()
        return True

    def status(self) -> dict[str, Any]:
        """For /health: whether records are being written, and what went wrong if not."""
        return {
            "store": self.driver.name,
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

    def submit_many(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        """``submit`` for each row, handed to the writer at once (one queue operation)."""
        writes = [(sql, params) for params in rows]
        if self._thread is None:
            self.dropped += len(writes)
            return
        self._queue.put(writes)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything submitted so far is committed (or has failed)."""
        if self._thread is None:
            return True
        done = threading.Event()
        self._queue.put(done)
        self._wake.set()
        return done.wait(timeout)

    def close(self) -> None:
        with self._readers_lock:
            readers, self._readers = self._readers, []
        for conn in readers:
            with contextlib.suppress(*self.driver.errors):
                conn.close()
        if self._thread is None:
            return
        self._queue.put(None)
        self._wake.set()
        self._thread.join(30)
        self._thread = None

    def call(self, fn: Callable[[Any], T]) -> concurrent.futures.Future[T]:
        """Run ``fn`` in one transaction on the writer thread, after every write submitted
        before it (deletes that must see earlier inserts); the future holds its result."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        if self._thread is None:
            future.set_exception(self._unavailable())
            return future
        self._queue.put(_Call(fn, future))
        self._wake.set()
        return future

    def read(self, query: Callable[[Any], T]) -> T:
        """Run a read on this thread's own connection (WAL: readers never wait for the
        writer; PostgreSQL: its own snapshot)."""
        if self._thread is None:
            raise self._unavailable()
        driver = self.driver
        conn: Connection | None = getattr(self._local, "conn", None)
        try:
            if conn is None:
                conn = driver.connect(writer=False)
                self._local.conn = conn
                with self._readers_lock:
                    self._readers.append(conn)
            return query(conn)
        except driver.errors as exc:
            if conn is not None and driver.broken(conn):
                self._local.conn = None  # the next read connects afresh
                with self._readers_lock:
                    self._readers.remove(conn)
                with contextlib.suppress(*driver.errors):
                    conn.close()
            raise StorageUnavailable("the database cannot be read", str(exc)) from None

    def bucket(self, column: str, size: int) -> str:
        return self.driver.bucket(column, size)

    def _unavailable(self) -> StorageUnavailable:
        return StorageUnavailable(
            "the database is not available", self.last_error or "the database is closed"
        )

    def _writer(self, conn: Connection) -> None:
        pending: list[Write] = []
        driver = self.driver
        while True:
            items: list[Write | list[Write] | threading.Event | _Call | None] = []
            with contextlib.suppress(queue.Empty):
                # With writes waiting for a retry, wake up every second to try again.
                items.append(self._queue.get(timeout=1.0 if pending else None))
            if items and isinstance(items[0], (tuple, list)):
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
                if isinstance(item, list):  # submit_many
                    pending += item
                    continue
                # A marker, a call or the stop: what was submitted before it goes first.
                if pending:
                    self._commit(conn, pending)
                if item is None:
                    stop = True
                elif isinstance(item, threading.Event):
                    item.set()
                elif not item.run(conn, driver.errors):
                    conn = self._reconnect(conn)
            if pending:
                conn = self._commit(conn, pending)
            if stop:
                break
        with contextlib.suppress(*driver.errors):
            conn.close()

    def _reconnect(self, conn: Connection) -> Connection:
        """The writer's connection after a failure: a new one when the old is broken
        (the server went away), once one can be made; else the same."""
        driver = self.driver
        if not driver.broken(conn):
            return conn
        try:
            fresh = driver.connect(writer=True)
        except driver.errors as exc:
            self.last_error = str(exc)
            return conn  # still broken: the next retry tries again
        with contextlib.suppress(*driver.errors):
            conn.close()
        return fresh

    def _commit(self, conn: Connection, pending: list[Write]) -> Connection:
        driver = self.driver
        try:
            conn.execute("BEGIN")
            driver.write(conn, pending)
            conn.execute("COMMIT")
        except driver.errors as exc:
            with contextlib.suppress(*driver.errors):
                conn.execute("ROLLBACK")
            if self.last_error != str(exc):
                log.error("cannot write to %s: %s (will retry)", driver.name, exc)
            self.last_error = str(exc)
            if len(pending) > MAX_RETAINED:
                dropped = len(pending) - MAX_RETAINED
                log.error("dropping %d unwritten record(s): database unwritable", dropped)
                del pending[:dropped]
            return self._reconnect(conn)
        self.written += len(pending)
        self.last_error = None
        pending.clear()
        return conn


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


def for_store(store: str | None, data_dir: Path) -> Database:
    """The configured store: ``store:`` a PostgreSQL URL, else the SQLite file in the data
    directory. MissingDriver (store/postgres.py) when psycopg is not installed."""
    if store is None:
        return Database(data_dir / "llm-manager.db")
    from llm_manager.store.postgres import PostgresDriver

    return Database(driver=PostgresDriver(store))
