"""Faults and fuzzing: arbitrary input never gives a 500 or a crash; storage failures and
signals at bad moments lose nothing they promise to keep and leave no process behind."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import random
import signal
import sqlite3
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_manager.errors import BadRequest
from llm_manager.gateway.forward import _find_model
from llm_manager.gateway.usage import SSEUsageScanner, Usage, from_json_bytes
from tests.conftest import alive, fake_command, make_config, read_pids, running_manager
from tests.test_server_process import Manager, launch, write_config

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(data=st.binary(max_size=2000), cuts=st.lists(st.integers(0, 2000), max_size=8))
def test_sse_scanner_never_raises_on_arbitrary_bytes(data: bytes, cuts: list[int]) -> None:
    scanner = SSEUsageScanner()
    start = 0
    for cut in sorted(cuts):
        scanner.feed(data[start:cut])
        start = max(start, cut)
    scanner.feed(data[start:])
    assert isinstance(scanner.finish(), Usage)


@FUZZ
@given(
    prompt=st.integers(0, 10**9),
    completion=st.integers(0, 10**9),
    noise=st.lists(st.text(max_size=40), max_size=6),
    cuts=st.lists(st.integers(0, 5000), max_size=10),
)
def test_sse_scanner_finds_usage_wherever_the_stream_is_split(
    prompt: int, completion: int, noise: list[str], cuts: list[int]
) -> None:
    events = [json.dumps({"choices": [{"delta": {"content": n}}]}) for n in noise]
    events.append(json.dumps({"usage": {"prompt_tokens": prompt, "completion_tokens": completion}}))
    stream = "".join(f"data: {e}\n\n" for e in events).encode() + b"data: [DONE]\n\n"
    scanner = SSEUsageScanner()
    start = 0
    for cut in sorted(c % (len(stream) + 1) for c in cuts):
        scanner.feed(stream[start:cut])
        start = max(start, cut)
    scanner.feed(stream[start:])
    assert scanner.finish() == Usage(prompt, completion)


@FUZZ
@given(body=st.binary(max_size=500))
def test_json_usage_never_raises(body: bytes) -> None:
    assert isinstance(from_json_bytes(body), Usage)


@FUZZ
@given(
    body=st.one_of(
        st.binary(max_size=300),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
            lambda inner: (
                st.lists(inner, max_size=4)
                | st.dictionaries(st.text(max_size=8), inner, max_size=4)
            ),
            max_leaves=10,
        ).map(lambda v: json.dumps(v).encode()),
    ),
    query=st.binary(max_size=60),
)
def test_model_name_is_found_or_a_bad_request(body: bytes, query: bytes) -> None:
    scope = {"query_string": query}
    try:
        name, named_in_body, stream, _ = _find_model(scope, body)
    except BadRequest:
        return
    assert name is None or (isinstance(name, str) and name)
    assert isinstance(named_in_body, bool) and isinstance(stream, bool)


async def test_random_requests_never_get_a_500(tmp_path: Path, spawn_log: Path) -> None:
    command = fake_command("--spawn-log", str(spawn_log))
    models = {"chat": {"schemes": {"CPU": {"command": command}}}}
    rng = random.Random(20261127)
    paths = ["/v1/chat/completions", "/v1/embeddings", "/rerank", "/v1/x", "/api/models/chat/info",
             "/api/logs/chat/clear", "/api/usage", "/api/requests", "/v1/models/chat", "/%00",
             "/api/models/%ff/start", "/" + "a" * 3000]  # fmt: skip
    bodies = [b"", b"{", b"[]", b'{"model": "chat"}', b'{"model": "ch"}', b'{"model": 1}',
              b'{"model": "chat", "stream": "yes"}', b"\x00\xff" * 50, b'{"model": "\\ud800"}']  # fmt: skip
    async with running_manager(make_config(tmp_path, models, max_body_bytes=4096)) as mgr:
        statuses: list[int] = []
        failures: list[Any] = []
        for _ in range(300):
            method = rng.choice(["GET", "POST", "PUT", "DELETE", "PATCH"])
            path = rng.choice(paths)
            query = rng.choice(["", "?model=chat", "?since=abc", "?limit=-5", "?keep_minutes=x",
                                "?model=" + "%zz"])  # fmt: skip
            body = rng.choice(bodies) + bytes(rng.randrange(256) for _ in range(rng.randrange(8)))
            headers = {"Content-Type": rng.choice(["application/json", "text/plain", "x/y"])}
            async with mgr.http.request(
                method, mgr.url + path + query, data=body, headers=headers
            ) as resp:
                await resp.read()
                statuses.append(resp.status)
                if resp.status >= 500:
                    failures.append((method, path[:40], query, body[:40], await resp.text()))
        assert not failures, failures
        assert 500 not in statuses and all(s < 600 for s in statuses)
        assert (await mgr.get("/health"))[0] == 200
        await mgr.post("/api/models/stop-all")


async def test_unwritable_database_keeps_serving_and_health_says_so(
    tmp_path: Path, spawn_log: Path
) -> None:
    loaded = make_config(tmp_path, {"m": {"schemes": {"CPU": {"command": fake_command()}}}})
    db_path = tmp_path / "data" / "llm-manager.db"
    db_path.mkdir(parents=True)  # a directory where the database file should be
    async with running_manager(loaded) as mgr:
        status, body = await mgr.post("/v1/chat/completions", json={"model": "m"})
        assert status == 200 and body["choices"]
        status, health = await mgr.get("/health")
        assert status == 200 and health["status"] == "healthy"
        assert health["storage"]["ok"] is False and "cannot open" in health["storage"]["error"]
        assert health["storage"]["dropped"] >= 1
        status, logs = await mgr.get("/api/logs/stats")
        assert status == 200 and logs["stats"]["models"]["m"] > 0  # answered from memory
        status, body = await mgr.get("/api/requests")
        assert status == 503 and body["message"] == "the database is not available"
        status, body = await mgr.post("/api/logs/m/clear")
        assert status == 200 and body["deleted"] > 0
        await mgr.post("/api/models/m/stop")


def _background_requests(url: str, done: list[float], stop: threading.Event) -> None:
    body = json.dumps({"model": "m", "messages": []}).encode()
    while not stop.is_set():
        req = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                resp.read()
        except (OSError, http.client.HTTPException):
            return  # the manager was killed, possibly between an answer's head and body
        done.append(time.monotonic())


def test_kill_9_mid_load_loses_at_most_the_last_moments_and_never_corrupts(
    tmp_path: Path, spawn_log: Path
) -> None:
    models = {"m": {"schemes": {"CPU": {"command": fake_command("--spawn-log", str(spawn_log))}}}}
    m = launch(write_config(tmp_path, models), tmp_path)
    try:
        m.post("/api/models/m/start")
        done: list[float] = []
        stop = threading.Event()
        workers = [
            threading.Thread(target=_background_requests, args=(m.url, done, stop))
            for _ in range(4)
        ]
        for w in workers:
            w.start()
        time.sleep(3)
        killed_at = time.monotonic()
        m.proc.kill()
        m.proc.wait()
        stop.set()
        for w in workers:
            w.join(10)
    finally:
        if m.proc.poll() is None:
            m.proc.kill()
    answered = [t for t in done if t <= killed_at]
    recent = [t for t in answered if t > killed_at - 1.0]
    db = sqlite3.connect(tmp_path / "data" / "llm-manager.db")
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = db.execute("SELECT COUNT(*) FROM requests").fetchone()[0]
    finally:
        db.close()
    assert len(answered) > 50
    # Rows are committed every 0.2 s: what can be lost is the last batch, bounded here by
    # the requests answered in the last second before the kill.
    assert len(answered) - len(recent) <= rows <= len(answered) + 4, (rows, len(answered))
    # The model process went with the manager (parent-death signal).
    deadline = time.monotonic() + 10
    while any(alive(p) for p in read_pids(spawn_log)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(p) for p in read_pids(spawn_log))


@pytest.mark.parametrize("moment", ["during a start", "during a stream"])
def test_sigterm_at_a_bad_moment_exits_zero_and_leaves_nothing(
    tmp_path: Path, spawn_log: Path, moment: str
) -> None:
    switches = (
        ["--slow-start", "30"]
        if moment == "during a start"
        else ["--chunks", "1000", "--chunk-delay", "0.05"]
    )
    models = {
        "m": {
            "schemes": {"CPU": {"command": fake_command("--spawn-log", str(spawn_log), *switches)}}
        }
    }
    m: Manager = launch(write_config(tmp_path, models), tmp_path)
    outcome: dict[str, Any] = {}

    def client() -> None:
        body = json.dumps({"model": "m", "messages": [], "stream": True}).encode()
        req = urllib.request.Request(m.url + "/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                outcome["status"] = resp.status
                outcome["body"] = resp.read()
        except Exception as exc:  # the stream may be cut: that is an answer too
            outcome["error"] = repr(exc)

    thread = threading.Thread(target=client)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            pids = read_pids(spawn_log)
            if pids and (moment == "during a start" or "status" in outcome or _streaming(m)):
                break
            time.sleep(0.05)
        assert read_pids(spawn_log), "the model never started"
        time.sleep(0.3)
        began = time.monotonic()
        m.proc.send_signal(signal.SIGTERM)
        assert m.proc.wait(timeout=30) == 0, m.log.read_text()
        assert time.monotonic() - began < 20
    finally:
        if m.proc.poll() is None:
            m.proc.kill()
        thread.join(30)
    assert not thread.is_alive()  # the client got an answer or an error, not a hang
    assert outcome, "the client saw nothing"
    assert not any(alive(p) for p in read_pids(spawn_log))


def _streaming(m: Manager) -> bool:
    try:
        return bool(m.get("/api/models/m/info")["model"]["pending_requests"])
    except Exception:
        return False


async def test_model_crashing_during_health_check_and_closing_early(
    tmp_path: Path, spawn_log: Path
) -> None:
    models = {
        # Serves /health with 503 for 30 s, then dies at 0.5 s: a crash during health check.
        "dies": {
            "schemes": {
                "CPU": {"command": fake_command("--slow-start", "30", "--exit-after", "0.5")}
            }
        },
        # Closes the connection after 2 chunks: the crash-mid-stream variant, seen by the client.
        "cuts": {"schemes": {"CPU": {"command": fake_command("--crash-after-chunks", "2")}}},
    }
    async with running_manager(make_config(tmp_path, models)) as mgr:
        began = time.monotonic()
        status, body = await mgr.post("/api/models/dies/start")
        assert status == 503 and "exited with code 3 during start" in body["message"]
        assert time.monotonic() - began < 10
        async with mgr.http.post(
            mgr.url + "/v1/chat/completions", json={"model": "cuts", "stream": True}
        ) as resp:
            text = (await resp.read()).decode()
        assert text.count("tok") == 2 and '"type": "upstream_error"' in text
        await asyncio.sleep(0)
        assert os.getpid()  # the manager (this process) is fine
        assert (await mgr.get("/health"))[0] == 200


@pytest.mark.parametrize(
    "event",
    [
        b'data: {"usage": ' + b"[" * 50_000 + b"]" * 50_000 + b"}\n\n",
        b'data: {"usage": {"prompt_tokens": ' + b"9" * 400 + b"}}\n\n",
        b'data: {"usage": {"prompt_tokens": 1e400, "completion_tokens": -5}}\n\n',
        b'data: {"response": ' * 3000 + b'{"usage": {}}' + b"}" * 3000 + b"\n\n",
        b'data: {"timings": {"predicted_n": 1e308}}\n\n',
    ],
)
def test_pathological_usage_events_never_raise(event: bytes) -> None:
    scanner = SSEUsageScanner()
    scanner.feed(b'data: {"x": 1}\n\n' + event)
    scanner.feed(b'data: {"usage": {"prompt_tokens": 3, "completion_tokens": 4}}\n\n')
    assert scanner.finish() == Usage(3, 4)  # the good event still counts
    body = event[len(b"data: ") :].strip()
    usage = from_json_bytes(body)
    assert all(
        v is None or 0 <= v <= 1 << 53
        for v in (usage.prompt_tokens, usage.completion_tokens, usage.predicted_n)
    )
