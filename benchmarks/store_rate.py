"""The usage-write rate each store sustains: request records submitted as the gateway
submits them (one per request, from the event loop's thread), the time until all are
committed, and the CPU the writer spent (process CPU, all threads).

    .venv/bin/python benchmarks/store_rate.py [--rows 50000]

SQLite: a file in a temp folder. PostgreSQL: a throwaway server (Debian's binaries,
tests/postgres_server.py, fsync off as in the tests; pass --postgres-url for a real one).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llm_manager.store.db import Database  # noqa: E402
from llm_manager.store.postgres import PostgresDriver  # noqa: E402
from llm_manager.store.usage import RequestRecord, UsageStore  # noqa: E402


def measure(db: Database, rows: int) -> tuple[float, float]:
    assert db.open(), db.last_error
    store = UsageStore(db)
    cpu0, t0 = time.process_time(), time.perf_counter()
    for i in range(rows):
        store.add(
            RequestRecord(
                "m", "/v1/chat/completions", "POST", status=200, duration_ms=12.5,
                ttfb_ms=3.0, prompt_tokens=i % 500, completion_tokens=64,
            )
        )  # fmt: skip
    assert db.flush(timeout=600)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    assert db.written == rows, (db.written, db.last_error)
    db.close()
    return rows / wall, cpu / rows * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--postgres-url", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rate, cpu = measure(Database(Path(tmp) / "x.db"), args.rows)
        print(f"sqlite      {rate:10.0f} rows/s  {cpu:6.1f} us CPU/row")
    server = None
    url = args.postgres_url
    if url is None:
        from tests.postgres_server import PostgresServer, binaries

        bindir = binaries()
        if bindir is None:
            print("postgresql  skipped: no PostgreSQL binaries (apt-get install postgresql)")
            return
        server = PostgresServer(bindir)
        server.start()
        url = server.new_database()
    try:
        rate, cpu = measure(Database(driver=PostgresDriver(url)), args.rows)
        print(f"postgresql  {rate:10.0f} rows/s  {cpu:6.1f} us CPU/row (this process)")
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
