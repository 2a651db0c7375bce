"""The store's behaviour on both databases: SQLite (the default) and PostgreSQL (a real
server, tests/postgres_server.py). What only one of them has is tested beside it: the
SQLite file in test_store.py, a PostgreSQL outage here."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llm_manager.errors import StorageUnavailable
from llm_manager.store.db import Database
from llm_manager.store.footprints import Footprint, FootprintStore
from llm_manager.store.logs import LogStore
from llm_manager.store.migrations import MIGRATIONS
from llm_manager.store.postgres import PostgresDriver, redacted
from llm_manager.store.usage import UsageStore
from tests.conftest import fake_command, make_config, running_manager
from tests.test_store import record


@pytest.fixture(params=["sqlite", "postgresql"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """A function that opens (again) the same store: a file, or a fresh database."""
    if request.param == "sqlite":
        path = tmp_path / "x.db"

        def open_sqlite() -> Database:
            return Database(path)

        yield open_sqlite
    else:
        server = request.getfixturevalue("postgres")
        url = server.new_database()

        def open_postgres() -> Database:
            return Database(driver=PostgresDriver(url))

        yield open_postgres


@pytest.fixture
def db(opener: Any) -> Iterator[Database]:
    database = opener()
    assert database.open(), database.last_error
    yield database
    database.close()


def test_records_totals_and_buckets(db: Database, opener: Any) -> None:
    store = UsageStore(db)
    base = 1_699_999_200.0  # on an hour boundary (UTC)
    store.add(record("a", base + 10, 5, 7))
    store.add(record("a", base + 3600 + 5, 1, 1, status=500))
    store.add(record("b", base + 20, 2, 3))
    assert db.flush()
    recent = store.recent(limit=2)
    assert [r["model"] for r in recent] == ["b", "a"]  # newest id first
    assert recent[0]["stream"] is False and recent[0]["started_at"] == base + 20
    assert store.recent(model="b")[0]["prompt_tokens"] == 2
    assert len(store.recent(since=base + 3000)) == 1
    summary = store.summary(since=None, until=None, bucket="hour")
    assert summary["totals"]["a"] == {
        "requests": 2,
        "prompt_tokens": 6,
        "completion_tokens": 8,
        "errors": 1,
        "avg_duration_ms": 1000.0,
        "avg_ttfb_ms": 10.0,
    }
    assert [p["start"] for p in summary["series"]["a"]] == [base, base + 3600]
    day = store.summary(since=None, until=None, bucket="day", model="a")
    assert set(day["totals"]) == {"a"} and len(day["series"]["a"]) == 1
    assert day["series"]["a"][0]["start"] == base - base % 86400
    db.close()
    again = opener()  # reopened: the rows are kept, the migrations not run again
    assert again.open()
    assert len(UsageStore(again).recent()) == 3
    versions = again.read(
        lambda c: [r[0] for r in c.execute("SELECT version FROM schema_migrations").fetchall()]
    )
    assert sorted(versions) == [v for v, _ in MIGRATIONS]
    again.close()


def test_a_thousand_records_in_one_batch(db: Database) -> None:
    store = UsageStore(db)
    for i in range(1000):
        store.add(record("m", 1_700_000_000.0 + i, i, 1))
    assert db.flush()
    rows = store.recent(limit=2000)
    assert sorted(r["prompt_tokens"] for r in rows) == list(range(1000))
    assert db.status()["written"] == 1000


async def test_log_lines_history_clearing_and_retention(db: Database) -> None:
    logs = LogStore(db)
    now = time.time()
    for i in range(10):
        logs.add_lines("m", now - 100 + i, "stdout", [f"line {i}"])
    logs.add_lines("other", now - 1000, "stderr", ["old"])
    assert db.flush()
    assert logs.recent("m", 3) == [
        (now - 93, "stdout", "line 7"),
        (now - 92, "stdout", "line 8"),
        (now - 91, "stdout", "line 9"),
    ]
    assert logs.counts() == {"m": 10, "other": 1}
    assert await logs.delete_before("m", now - 95) == 5
    assert await logs.apply_retention(max_age=500, max_lines=3) == 1 + 2
    assert logs.counts() == {"m": 3}
    assert [m for _, _, m in logs.recent("m", 10)] == ["line 7", "line 8", "line 9"]


async def test_footprints_newest_row_of_a_key_wins(db: Database) -> None:
    store = FootprintStore(db)

    def fp(peak: int, runs: int) -> Footprint:
        return Footprint("m", "gpu", "cuda:0", "def1", peak, None, runs, time.time())

    for runs in range(1, 6):  # one batch: five rows of the same key
        store.save(fp(1000 + runs, runs))
    store.save(Footprint("m", "gpu", "cpu", "def1", 10, 20, 1, time.time()))
    assert db.flush()
    rows = {f.device: f for f in store.load_all()}
    assert rows["cuda:0"].load_peak == 1005 and rows["cuda:0"].runs == 5
    assert rows["cpu"].peak == 20
    assert await store.forget("m") == 2
    assert store.load_all() == []


def test_the_url_is_shown_without_its_password() -> None:
    assert redacted("postgresql://u:secret@db:5432/x") == "postgresql://u:***@db:5432/x"
    assert redacted("postgresql://u@db/x") == "postgresql://u@db/x"


def test_an_outage_loses_no_acknowledged_row(postgres: Any) -> None:
    """The database stops mid-load: writes wait and are retried, reads say why they
    cannot answer, and once it is back every row submitted is there."""
    db = Database(driver=PostgresDriver(postgres.new_database()), batch_interval=0.05)
    assert db.open()
    store = UsageStore(db)
    try:
        for i in range(50):
            store.add(record("m", 1_700_000_000.0 + i, i, 1))
        assert db.flush()
        postgres.pause()
        try:
            for i in range(50, 120):
                store.add(record("m", 1_700_000_000.0 + i, i, 1))
            db.flush(timeout=10)
            assert db.last_error is not None and not db.status()["ok"]
            with pytest.raises(StorageUnavailable) as caught:
                store.recent()
            assert caught.value.status == 503
        finally:
            postgres.resume()
        deadline = time.monotonic() + 20
        while db.written < 120 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert db.written == 120 and db.last_error is None
        rows = store.recent(limit=500)  # a reader whose connection broke connects again
        assert sorted(r["prompt_tokens"] for r in rows) == list(range(120))
    finally:
        db.close()


async def test_two_managers_share_one_postgresql_store(tmp_path: Path, postgres: Any) -> None:
    url = postgres.new_database()
    models = {"m": {"schemes": {"cpu": {"command": fake_command()}}}}
    first = make_config(tmp_path / "a", models)
    second = make_config(tmp_path / "b", models)
    first = type(first)(first.config.model_copy(update={"store": url}), "a", tmp_path)
    second = type(second)(second.config.model_copy(update={"store": url}), "b", tmp_path)
    async with running_manager(first) as one, running_manager(second) as two:
        chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        for manager, count in ((one, 2), (two, 3)):
            for _ in range(count):
                status, _ = await manager.post("/v1/chat/completions", json=chat)
                assert status == 200
            await asyncio.to_thread(manager.app.db.flush)
        for manager in (one, two):  # either answers for both
            status, body = await manager.get("/api/usage?since=1h")
            assert status == 200, body
            assert body["totals"]["m"]["requests"] == 5
            assert body["total"]["completion_tokens"] == 5 * 5  # the fake answers 5 tokens
            _, health = await manager.get("/health")
            assert health["storage"]["ok"] and health["storage"]["store"] == url


def test_estimate_reads_the_measurements_of_a_postgresql_store(
    postgres: Any, tmp_path: Path
) -> None:
    from llm_manager.cli.memory import read_footprints

    url = postgres.new_database()
    assert read_footprints(tmp_path, url) == ([], None)  # the manager never ran with it
    db = Database(driver=PostgresDriver(url))
    assert db.open()
    FootprintStore(db).save(Footprint("m", "gpu", "cuda:0", "d", 900, 1100, 2, 1.0))
    assert db.flush()
    db.close()
    rows, problem = read_footprints(tmp_path, url)
    assert problem is None and [(r.model, r.peak, r.runs) for r in rows] == [("m", 1100, 2)]
    rows, problem = read_footprints(tmp_path, url.rsplit("/", 1)[0] + "/no_such_db")
    assert rows == [] and problem is not None and "no_such_db" in problem
