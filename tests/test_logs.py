"""Model logs with real model processes: capture, live SSE stream, seam, slow readers,
clearing, persistence across restarts, retention, stats, the CLI, and bad input."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from llm_manager.logs import LogBook, LogSettings, ModelLog
from llm_manager.models.process import MAX_LINE_BYTES
from llm_manager.models.runtime import State
from llm_manager.store.db import Database
from llm_manager.store.logs import LogStore
from tests.conftest import RunningManager, fake_command, make_config, running_manager, wait_until


def fake(spawn_log: Path, *switches: str, **extra: Any) -> dict[str, Any]:
    command = fake_command("--spawn-log", str(spawn_log), *switches)
    return {"schemes": {"CPU": {"command": command}}, **extra}


async def read_events(
    resp: aiohttp.ClientResponse, until: Any, timeout: float = 10.0
) -> list[tuple[float, dict[str, Any]]]:
    """(arrival time, event) pairs until ``until(events)`` holds."""
    events: list[tuple[float, dict[str, Any]]] = []
    async with asyncio.timeout(timeout):
        async for raw in resp.content:
            line = raw.decode().strip()
            if line.startswith("data: "):
                events.append((time.time(), json.loads(line[6:])))
                if until([e for _, e in events]):
                    return events
    return events


def ended(events: list[dict[str, Any]]) -> bool:
    return events[-1]["type"] == "stream_end"


async def open_stream(mgr: RunningManager, name: str, query: str = "") -> aiohttp.ClientResponse:
    return await mgr.http.get(f"{mgr.url}/api/models/{name}/logs/stream{query}")


async def test_live_lines_arrive_within_100_ms(tmp_path: Path, spawn_log: Path) -> None:
    loaded = make_config(tmp_path, {"m": fake(spawn_log, "--tick", "0.2")})
    async with running_manager(loaded) as mgr:
        await mgr.post("/api/models/m/start")
        resp = await open_stream(mgr, "m", "?history=0")
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.headers["Cache-Control"] == "no-cache"
        assert resp.headers["X-Accel-Buffering"] == "no"

        def ticks(evs: list[dict[str, Any]]) -> int:
            return sum(e.get("log", {}).get("message", "").startswith("tick ") for e in evs)

        events = await read_events(resp, lambda evs: ticks(evs) >= 5)
        resp.close()
        assert events[0][1] == {"type": "historical_complete", "count": 0}
        delays = []
        for arrived, event in events[1:]:
            assert event["type"] == "realtime"
            message = event["log"]["message"]
            if not message.startswith("tick "):
                continue  # a start-up line read (up to 20 ms late) after the start returned
            assert event["log"]["stream"] == "stdout"
            delays.append(arrived - float(message.split()[2]))
        assert len(delays) >= 5
        assert max(delays) < 0.1, delays
        await mgr.post("/api/models/m/stop")


async def test_history_then_realtime_without_loss_or_duplicate_at_the_seam(
    tmp_path: Path, spawn_log: Path
) -> None:
    loaded = make_config(tmp_path, {"m": fake(spawn_log, "--tick", "0.005")})
    async with running_manager(loaded) as mgr:
        await mgr.post("/api/models/m/start")
        await asyncio.sleep(0.3)  # history builds up while ticks keep coming
        resp = await open_stream(mgr, "m")
        events = [
            e
            for _, e in await read_events(
                resp, lambda evs: sum(e["type"] == "realtime" for e in evs) >= 50
            )
        ]
        resp.close()
        kinds = [e["type"] for e in events]
        split = kinds.index("historical_complete")
        assert set(kinds[:split]) == {"historical"} and set(kinds[split + 1 :]) == {"realtime"}
        assert events[split]["count"] == split
        seqs = [e["log"]["seq"] for e in events if "log" in e]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # contiguous: no gap, no repeat
        ticks = [
            int(e["log"]["message"].split()[1])
            for e in events
            if "log" in e and e["log"]["message"].startswith("tick ")
        ]
        assert ticks == list(range(1, len(ticks) + 1))
        await mgr.post("/api/models/m/stop")


async def test_a_reader_that_never_reads_does_not_stall_a_flooding_model(
    tmp_path: Path, spawn_log: Path
) -> None:
    loaded = make_config(tmp_path, {"m": fake(spawn_log, "--print-lines", "100000")})
    async with running_manager(loaded) as mgr:
        host, port = mgr.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /api/models/m/logs/stream HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()  # ...and never read a byte
        began = time.monotonic()
        status, _ = await mgr.post("/api/models/m/start")
        assert status == 200
        runtime = mgr.supervisor.resolve("m")
        await wait_until(
            lambda: any(x.message == "log line 99999" for x in runtime.log.lines()), timeout=20
        )
        assert time.monotonic() - began < 20
        # A live reader keeps up and is told when it skipped lines.
        writer.close()
        await mgr.post("/api/models/m/stop")


async def test_slow_subscriber_is_told_it_skipped(tmp_path: Path) -> None:
    book = LogBook(None, LogSettings(buffer_lines=100, retention=0, max_lines=0))
    model_log = book.create("m")
    model_log._subscriber_limit = 10  # noqa: SLF001 - a small buffer to overflow
    past, sub = model_log.subscribe()
    assert past == []
    for i in range(25):
        model_log.append("stdout", f"line {i}")
    skipped, lines = await sub.get()
    assert skipped == 15 and [x.message for x in lines] == [f"line {i}" for i in range(10)]
    model_log.append("stdout", "after")
    skipped, lines = await sub.get()
    assert skipped == 0 and [x.message for x in lines] == ["after"]


async def test_odd_output_is_kept_readable(tmp_path: Path, spawn_log: Path) -> None:
    loaded = make_config(tmp_path, {"m": fake(spawn_log, "--print-odd")})
    async with running_manager(loaded) as mgr:
        assert (await mgr.post("/api/models/m/start"))[0] == 200
        runtime = mgr.supervisor.resolve("m")
        await wait_until(lambda: any(x.message == "after long" for x in runtime.log.lines()))
        messages = [x.message for x in runtime.log.lines()]
        assert "bad bytes \ufffd\ufffd end" in messages
        long = next(m for m in messages if m.startswith("LLLL"))
        assert long.endswith("…[truncated]") and len(long) < MAX_LINE_BYTES + 20
        resp = await open_stream(mgr, "m", "?follow=false")
        events = [
            e for _, e in await read_events(resp, lambda evs: evs[-1]["type"] == "stream_end")
        ]
        assert any(e.get("log", {}).get("message") == "bad bytes \ufffd\ufffd end" for e in events)
        await mgr.post("/api/models/m/stop")


async def test_clear_keep_minutes_deletes_exactly_the_older_lines(
    tmp_path: Path, spawn_log: Path
) -> None:
    loaded = make_config(tmp_path, {"m": fake(spawn_log), "other": fake(spawn_log)})
    async with running_manager(loaded) as mgr:
        runtime = mgr.supervisor.resolve("m")
        old = time.time() - 2 * 3600
        store = LogStore(mgr.app.db)
        history = [(old + i, "stdout", f"old {i}") for i in range(30)]
        runtime.log.load(history)
        for ts, stream, message in history:
            store.add_lines("m", ts, stream, [message])
            store.add_lines("other", ts, stream, [message])
        for i in range(5):
            runtime.log.append("stdout", f"new {i}")
        status, body = await mgr.post("/api/logs/m/clear?keep_minutes=60")
        assert status == 200 and body["deleted"] == 30
        assert body["message"] == "model 'm': deleted 30 log line(s) older than 60 minutes"
        assert [x.message for x in runtime.log.lines()] == [f"new {i}" for i in range(5)]
        _, stats = await mgr.get("/api/logs/stats")
        assert stats["stats"]["models"] == {"m": 5, "other": 30}
        assert stats["stats"]["total_log_entries"] == 35
        assert stats["stats"]["models_with_logs"] == 2 and stats["stats"]["total_models"] == 2
        status, body = await mgr.post("/api/logs/m/clear")  # default 0: everything
        assert body["deleted"] == 5 and len(runtime.log) == 0


@pytest.mark.parametrize("value", ["-1", "abc", "nan", "inf"])
async def test_clear_bad_keep_minutes_is_400(tmp_path: Path, spawn_log: Path, value: str) -> None:
    async with running_manager(make_config(tmp_path, {"m": fake(spawn_log)})) as mgr:
        status, body = await mgr.post(f"/api/logs/m/clear?keep_minutes={value}")
        assert status == 400 and body["success"] is False and "keep_minutes" in body["error"]


async def test_unknown_model_is_404(tmp_path: Path) -> None:
    async with running_manager(make_config(tmp_path, {})) as mgr:
        status, body = await mgr.get("/api/models/nope/logs/stream")
        assert status == 404 and body["success"] is False
        status, body = await mgr.post("/api/logs/nope/clear")
        assert status == 404


async def test_logs_survive_a_restart_and_stopped_models_have_history(
    tmp_path: Path, spawn_log: Path
) -> None:
    loaded = make_config(tmp_path, {"m": fake(spawn_log, "--print-lines", "20")})
    async with running_manager(loaded) as mgr:
        await mgr.post("/api/models/m/start")
        await mgr.post("/api/models/m/stop")
        before = [x.message for x in mgr.supervisor.resolve("m").log.lines()]
    assert "log line 19" in before and any(m.startswith("stopped") for m in before)
    async with running_manager(loaded) as mgr:
        assert mgr.supervisor.resolve("m").state is State.STOPPED
        resp = await open_stream(mgr, "m", "?follow=false")
        events = [
            e for _, e in await read_events(resp, lambda evs: evs[-1]["type"] == "stream_end")
        ]
        assert [e["log"]["message"] for e in events if e["type"] == "historical"] == before
        resp = await open_stream(mgr, "m", "?follow=false&history=3")
        events = [
            e for _, e in await read_events(resp, lambda evs: evs[-1]["type"] == "stream_end")
        ]
        assert [e["log"]["message"] for e in events if "log" in e] == before[-3:]


async def test_retention_by_age_and_by_count(tmp_path: Path) -> None:
    db = Database(tmp_path / "x.db")
    assert db.open()
    store = LogStore(db)
    now = time.time()
    for i in range(10):
        store.add_lines("a", now - 10 * 86400 + i, "stdout", [f"ancient {i}"])
    for i in range(50):
        store.add_lines("a", now + i * 0.001, "stdout", [f"a {i}"])
        store.add_lines("b", now + i * 0.001, "stdout", [f"b {i}"])
    removed = await store.apply_retention(max_age=7 * 86400, max_lines=20)
    assert removed == 10 + 30 + 30
    assert await asyncio.to_thread(store.counts) == {"a": 20, "b": 20}
    kept = await asyncio.to_thread(store.recent, "a", 100)
    assert [m for _, _, m in kept] == [f"a {i}" for i in range(30, 50)]
    db.close()


async def test_the_lines_of_one_read_are_kept_streamed_and_stored_together(tmp_path: Path) -> None:
    # A read's lines go down in one call (ModelLog.extend, one hand-over to the store's
    # writer): in order, numbered, with their levels and the read's one timestamp.
    db = Database(tmp_path / "x.db")
    assert db.open()
    store = LogStore(db)
    model_log = ModelLog("m", 100, store.add_lines)
    model_log.append("manager", "before")
    _, subscription = model_log.subscribe()
    read = ["0.00.001.000 I srv  first", "0.00.001.001 W srv  second", "", "plain third"]
    model_log.extend("stderr", read)
    model_log.extend("stdout", [])  # a read of no complete line: nothing
    lines = model_log.lines()
    assert [(line.seq, line.message, line.level) for line in lines] == [
        (1, "before", "info"),
        (2, read[0], "info"),
        (3, read[1], "warning"),
        (4, "", "info"),
        (5, "plain third", "info"),
    ]
    assert len({line.timestamp for line in lines[1:]}) == 1
    skipped, live = await asyncio.wait_for(subscription.get(), 5)
    assert skipped == 0 and live == lines[1:]
    assert db.flush()
    stored = await asyncio.to_thread(store.recent, "m", 100)
    assert stored == [(line.timestamp, line.stream, line.message) for line in lines]
    db.close()
    model_log.extend("stderr", ["after the store closed"])  # counted as dropped, no error
    assert db.dropped == 1


async def test_server_shutdown_ends_live_streams(tmp_path: Path, spawn_log: Path) -> None:
    loaded = make_config(tmp_path, {"m": fake(spawn_log)})
    async with running_manager(loaded) as mgr:
        resp = await open_stream(mgr, "m")
        await read_events(resp, lambda evs: evs[-1]["type"] == "historical_complete")
        mgr.app.begin_shutdown()
        events = await read_events(resp, lambda evs: evs[-1]["type"] == "stream_end", timeout=5)
        assert events[-1][1]["type"] == "stream_end"


async def test_keepalive_comments(
    tmp_path: Path, spawn_log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("llm_manager.api.logs.KEEPALIVE_SECONDS", 0.1)
    async with running_manager(make_config(tmp_path, {"m": fake(spawn_log)})) as mgr:
        resp = await open_stream(mgr, "m")
        seen = b""
        async with asyncio.timeout(5):
            while seen.count(b": keep-alive") < 2:
                seen += await resp.content.readany()
        resp.close()


async def test_cli_logs(tmp_path: Path, spawn_log: Path) -> None:
    loaded = make_config(tmp_path, {"m": fake(spawn_log, "--print-lines", "3", "--tick", "0.1")})
    async with running_manager(loaded) as mgr:
        await mgr.post("/api/models/m/start")
        cli = [sys.executable, "-m", "llm_manager", "logs", "m", "--url", mgr.url]
        done = await asyncio.to_thread(
            subprocess.run, [*cli, "-n", "50"], capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, done.stderr
        assert (
            "[stdout] log line 2" in done.stdout and "[manager] starting with scheme" in done.stdout
        )
        follow = await asyncio.create_subprocess_exec(
            *cli, "-f", "-n", "0", stdout=asyncio.subprocess.PIPE
        )
        assert follow.stdout is not None
        first = await asyncio.wait_for(follow.stdout.readline(), 10)
        assert b"[stdout] tick " in first
        follow.terminate()
        await follow.wait()
        missing = await asyncio.to_thread(
            subprocess.run, [*cli[:3], "logs", "nope", "--url", mgr.url], capture_output=True,
            text=True, timeout=30,
        )  # fmt: skip
        assert missing.returncode == 1 and "404" in missing.stderr
        await mgr.post("/api/models/m/stop")


async def test_many_subscribers_each_get_every_line() -> None:
    book = LogBook(None, LogSettings(buffer_lines=1000, retention=0, max_lines=0))
    model_log = book.create("m")
    model_log.append("stdout", "before")
    subs = [model_log.subscribe() for _ in range(20)]
    for i in range(100):
        model_log.append("stdout", f"line {i}")
    for past, sub in subs:
        assert [x.message for x in past] == ["before"]
        skipped, lines = await sub.get()
        assert skipped == 0 and [x.message for x in lines] == [f"line {i}" for i in range(100)]
    for _, sub in subs:
        model_log.unsubscribe(sub)
    model_log.append("stdout", "after")  # nobody listens: nothing queued anywhere
    assert all(not sub._lines for _, sub in subs)  # noqa: SLF001


async def test_history_loads_while_a_reload_adds_a_model() -> None:
    """A reload (SIGHUP) during the start adds a model while the stored history is read:
    the start goes on (it once failed with "dictionary changed size during iteration")."""

    class SlowStore:
        def __init__(self) -> None:
            self.reading = threading.Event()

        def recent(self, model: str, limit: int) -> list[tuple[float, str, str]]:
            self.reading.set()
            time.sleep(0.2)  # in a worker thread: the loop runs on meanwhile
            return [(1.0, "stdout", f"{model} line")]

        def add_lines(self, model: str, ts: float, stream: str, messages: list[str]) -> None:
            pass

    store = SlowStore()
    book = LogBook(store, LogSettings(buffer_lines=10, retention=0, max_lines=0))
    book.create("a")
    loading = asyncio.create_task(book.load())
    await asyncio.to_thread(store.reading.wait, 5)
    book.create("b")  # what the reload does while the history is read
    await loading
    assert [line.message for line in book.get("a").lines()] == ["a line"]


SPLIT_INPUT = (
    b"first\r\nsecond \xff\xfe line\n"
    + b"x" * (MAX_LINE_BYTES + 100)
    + b"\nafter the long one\n"
    + b"y" * (MAX_LINE_BYTES + 5)
    + b"\nlast, unended"
)
SPLIT_LINES = [
    "first",
    "second \ufffd\ufffd line",
    "x" * MAX_LINE_BYTES + " …[truncated]",
    "after the long one",
    "y" * MAX_LINE_BYTES + " …[truncated]",
    "last, unended",
]


@pytest.mark.parametrize("size", [1, 7, 4096, len(SPLIT_INPUT)])
def test_output_is_split_into_the_same_lines_however_it_is_read(size: int) -> None:
    # The splitter takes whole reads apart in one go: the lines must not depend on where
    # the reads were cut (a byte at a time, mid-line, mid-UTF-8, inside an over-long line).
    from llm_manager.models.process import _LineSplitter

    got: list[tuple[str, str]] = []
    splitter = _LineSplitter("stderr", lambda stream, lines: got.extend((stream, x) for x in lines))
    for at in range(0, len(SPLIT_INPUT), size):
        splitter.feed(SPLIT_INPUT[at : at + size])
    splitter.finish()
    assert got == [("stderr", line) for line in SPLIT_LINES]
