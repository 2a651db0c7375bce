"""The whole gateway in front of an engine that breaks the rules of an HTTP/1.1 exchange
(tests/fakes/raw_engine.py, launched by the manager as a model). Each test checks both
sides: what the client received, and what the engine received (how often, byte for byte).
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RunningManager, make_config, running_manager, wait_until
from tests.fakes.raw_engine import NOT_CHUNKED_BODY

RAW_ENGINE = Path(__file__).parent / "fakes" / "raw_engine.py"
CHAT = "/v1/chat/completions"


def raw_model(tmp_path: Path, scenario: str) -> tuple[dict[str, Any], Path]:
    log = tmp_path / "engine.log"
    command = [sys.executable, str(RAW_ENGINE), "{port}", str(log), scenario]
    return {"m": {"schemes": {"CPU": {"command": command}}}}, log


def events(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line]


def received(log: Path) -> list[dict[str, Any]]:
    """The model requests the engine read, in order."""
    return [e for e in events(log) if e["event"] == "request"]


def chat_body(ident: str) -> bytes:
    """A request body with exact bytes: the gateway forwards it unchanged."""
    return b'{"model": "m", "id": "%s", "messages": []}' % ident.encode()


async def post(mgr: RunningManager, body: bytes, **headers: str) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json", **headers}
    async with mgr.http.post(mgr.url + CHAT, data=body, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None)


async def post_each(mgr: RunningManager, idents: tuple[str, ...]) -> list[Any]:
    """One request after another, each answered 200 by the engine, to its own request."""
    answers = []
    for ident in idents:
        status, body = await post(mgr, chat_body(ident))
        assert status == 200 and body["answer_to"] == ident
        answers.append(body)
    return answers


async def statuses(mgr: RunningManager) -> list[int]:
    await asyncio.to_thread(mgr.app.db.flush)
    _, body = await mgr.get("/api/requests?limit=100")
    return [row["status"] for row in reversed(body["requests"])]


async def test_unsolicited_bytes_on_an_idle_connection_are_never_an_answer(
    tmp_path: Path,
) -> None:
    models, log = raw_model(tmp_path, "unsolicited")
    async with running_manager(make_config(tmp_path, models)) as mgr:
        status, first = await post(mgr, chat_body("one"))
        assert status == 200 and first == {"answer_to": "one", "conn": first["conn"], "seq": 0}
        # 0.2 s later the engine writes an answer nobody asked for on that idle connection:
        # the gateway closes it (the engine sees the end of the connection).
        closed = {"event": "eof", "conn": first["conn"]}
        await wait_until(lambda: closed in events(log))
        assert mgr.app.upstream.open_connections == 0
        status, second = await post(mgr, chat_body("two"))
        assert status == 200
        assert second == {"answer_to": "two", "conn": second["conn"], "seq": 0}
        assert second["conn"] != first["conn"]
        assert [bytes.fromhex(r["body"]) for r in received(log)] == [
            chat_body("one"),
            chat_body("two"),
        ]


async def test_two_answers_in_one_write_give_the_first_only(tmp_path: Path) -> None:
    models, log = raw_model(tmp_path, "two-in-one")
    async with running_manager(make_config(tmp_path, models)) as mgr:
        answers = await post_each(mgr, ("one", "two", "three"))
        assert [a["answer_to"] for a in answers] == ["one", "two", "three"]
        assert all("extra" not in a and a["seq"] == 0 for a in answers)
        # No connection carried a second request: each was closed after its answer.
        assert len({a["conn"] for a in answers}) == 3
        requests = received(log)
        assert [(r["conn"], r["seq"]) for r in requests] == [(a["conn"], 0) for a in answers]
        assert [bytes.fromhex(r["body"]) for r in requests] == [
            chat_body(i) for i in ("one", "two", "three")
        ]


@pytest.mark.parametrize("scenario", ["close-after-read", "reset-after-read"])
async def test_a_post_read_by_the_engine_is_never_sent_twice(tmp_path: Path, scenario: str) -> None:
    models, log = raw_model(tmp_path, scenario)
    async with running_manager(make_config(tmp_path, models)) as mgr:
        status, first = await post(mgr, chat_body("one"))
        assert status == 200 and first["answer_to"] == "one"
        # The next POST goes on the pooled connection; the engine reads it whole and closes
        # the connection without answering: it may have started work, so no second send.
        status, second = await post(mgr, chat_body("two"))
        assert status == 502
        assert second["error"]["type"] == "upstream_error"
        assert "not sent again" in second["error"]["message"]
        requests = received(log)
        assert [(r["method"], r["conn"], r["seq"]) for r in requests] == [
            ("POST", first["conn"], 0),
            ("POST", first["conn"], 1),
        ]
        assert [bytes.fromhex(r["body"]) for r in requests] == [
            chat_body("one"),
            chat_body("two"),
        ]
        # The gateway works on: the next request gets a new connection.
        status, third = await post(mgr, chat_body("three"))
        assert status == 200 and third["answer_to"] == "three" and third["seq"] == 0
        assert len(received(log)) == 3
        assert await statuses(mgr) == [200, 502, 200]


@pytest.mark.parametrize("scenario", ["close-after-read", "reset-after-read"])
async def test_an_idempotent_request_is_sent_again_once(tmp_path: Path, scenario: str) -> None:
    models, log = raw_model(tmp_path, scenario)
    async with running_manager(make_config(tmp_path, models)) as mgr:
        path = "/v1/echo?model=m"
        for _ in range(2):  # the second meets the pooled connection the engine closes
            status, body = await mgr.get(path)
            assert status == 200 and body["answer_to"] == f"GET {path}"
        requests = received(log)
        assert [(r["method"], r["path"], r["seq"]) for r in requests] == [
            ("GET", path, 0),
            ("GET", path, 1),  # read, then the connection closed without an answer
            ("GET", path, 0),  # sent again, once, on a new connection
        ]
        assert requests[0]["conn"] == requests[1]["conn"] != requests[2]["conn"]
        assert body["conn"] == requests[2]["conn"]
        # A POST that says it is idempotent (Idempotency-Key) is sent again the same way.
        status, body = await post(mgr, chat_body("keyed"), **{"Idempotency-Key": "k1"})
        assert status == 200 and body["answer_to"] == "keyed"
        keyed = [r for r in received(log) if r["method"] == "POST"]
        assert [r["seq"] for r in keyed] == [1, 0]
        assert all(bytes.fromhex(r["body"]) == chat_body("keyed") for r in keyed)


async def test_connection_close_is_honoured(tmp_path: Path) -> None:
    models, log = raw_model(tmp_path, "connection-close")
    async with running_manager(make_config(tmp_path, models)) as mgr:
        answers = await post_each(mgr, ("a", "b", "c"))
        assert all(a["seq"] == 0 for a in answers)
        conns = [a["conn"] for a in answers]
        assert len(set(conns)) == 3
        # The engine kept each connection open; the gateway closed each after its answer.
        await wait_until(lambda: all({"event": "eof", "conn": c} in events(log) for c in conns))
        assert mgr.app.upstream.open_connections == 0
        assert len(received(log)) == 3


async def test_keep_alive_timeout_and_max_are_honoured(tmp_path: Path) -> None:
    models, log = raw_model(tmp_path, "keep-alive-limits")  # timeout=1, max=2
    async with running_manager(make_config(tmp_path, models)) as mgr:
        seen = [(a["conn"], a["seq"]) for a in await post_each(mgr, ("1", "2", "3", "4", "5"))]
        await asyncio.sleep(0.9)  # past timeout=1 less its margin: the passing time counts
        status, body = await post(mgr, chat_body("6"))
        assert status == 200
        seen.append((body["conn"], body["seq"]))
        a, b, c, d = sorted({conn for conn, _ in seen})
        # max=2: two requests per connection; timeout=1: the idle one is not reused.
        assert seen == [(a, 0), (a, 1), (b, 0), (b, 1), (c, 0), (d, 0)]
        for conn in (a, b, c):
            await wait_until(lambda conn=conn: {"event": "eof", "conn": conn} in events(log))
        assert len(received(log)) == 6


async def test_an_idle_connection_closed_by_the_engine_leaves_the_pool_at_once(
    tmp_path: Path,
) -> None:
    models, log = raw_model(tmp_path, "idle-close")  # closes 0.2 s after each answer
    async with running_manager(make_config(tmp_path, models)) as mgr:
        pool = mgr.app.upstream
        status, first = await post(mgr, chat_body("one"))
        assert status == 200
        assert pool.open_connections == 1
        closed = {"event": "closed", "conn": first["conn"]}
        await wait_until(lambda: closed in events(log))
        await wait_until(lambda: pool.open_connections == 0)  # with no request to find out
        status, second = await post(mgr, chat_body("two"))
        assert status == 200 and second["answer_to"] == "two"
        assert second["conn"] != first["conn"] and second["seq"] == 0
        assert [r["seq"] for r in received(log)] == [0, 0]
        assert await statuses(mgr) == [200, 200]


async def test_a_transfer_encoding_not_ending_in_chunked_is_not_chunked(
    tmp_path: Path,
) -> None:
    models, log = raw_model(tmp_path, "te-notchunked")
    async with running_manager(make_config(tmp_path, models)) as mgr:
        async with mgr.http.post(
            mgr.url + CHAT, data=chat_body("one"), headers={"Content-Type": "application/json"}
        ) as resp:
            assert resp.status == 200
            assert resp.headers["X-Accel-Buffering"] == "no"  # no length: it may trickle
            # Its body ends with the connection, relayed byte for byte: not de-chunked.
            assert await resp.read() == NOT_CHUNKED_BODY
        assert await statuses(mgr) == [200]
        assert len(received(log)) == 1


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/status/204", 204), ("GET", "/status/304", 304), ("HEAD", "/anything", 200)],
)
async def test_answers_without_a_body_are_relayed_without_one(
    tmp_path: Path, method: str, path: str, status: int
) -> None:
    models, log = raw_model(tmp_path, "bodiless")
    async with running_manager(make_config(tmp_path, models)) as mgr:
        for _ in range(3):  # and the connection stays usable, for the client and upstream
            async with mgr.http.request(method, f"{mgr.url}{path}?model=m") as resp:
                assert resp.status == status
                assert await resp.read() == b""
                assert resp.headers["x-kept"] == "kept"
                assert "x-hop" not in resp.headers  # named by Connection: hop-by-hop
        assert len(received(log)) == 3
        assert await statuses(mgr) == [status] * 3
