"""The Host and Origin checks (web_guard.py, docs/security.md): the rules on their own, then
every route family x origin x Host against a real manager with fake models, asserting the
status and that a refused request starts or stops nothing."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from llm_manager.config import ConfigError, load_file, parse_text
from llm_manager.web_guard import (
    WebGuard,
    host_name,
    is_loopback,
    normalize_host_entry,
    startup_warnings,
)
from tests.conftest import fake_command, make_config, read_pids, running_manager, wait_until

# --- the rules ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "name"),
    [
        ("localhost:8080", "localhost"),
        ("LocalHost", "localhost"),
        ("127.0.0.1:1", "127.0.0.1"),
        ("[::1]:8080", "::1"),
        ("[::1]", "::1"),
        ("llm.lan", "llm.lan"),
        ("::1", "::1"),  # not a valid Host: kept whole, matches nothing but itself
        ("[::1]x", "[::1]x"),
        ("a:b", "a:b"),
    ],
)
def test_host_name(value: str, name: str) -> None:
    assert host_name(value) == name


@pytest.mark.parametrize(
    ("name", "loopback"),
    [
        ("localhost", True),
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("[::1]", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("127.evil.example", False),
        ("localhost.evil.example", False),
        ("evil-localhost", False),
        ("0.0.0.0", False),
        ("10.0.0.1", False),
        ("", False),
    ],
)
def test_is_loopback(name: str, loopback: bool) -> None:
    assert is_loopback(name) is loopback


def test_default_guard_allows_loopback_hosts_only() -> None:
    guard = WebGuard()
    for host in (b"localhost:8080", b"127.0.0.1:8080", b"127.9.9.9", b"[::1]:80", b"LOCALHOST"):
        assert guard.host_allowed(host), host
    for host in (
        b"evil.example:8080",
        b"127.0.0.1.evil.example",
        b"0.0.0.0:8080",
        b"192.168.1.10:8080",
        b"",
        b"localhost:8080:1",
        b"[::1",
    ):
        assert not guard.host_allowed(host), host
    assert guard.check([], writes=True) is None  # HTTP/1.0 without Host: allowed


def test_bind_address_and_allowed_hosts() -> None:
    lan = WebGuard("192.168.1.10", ["llm.lan", "[fe80::1]", "*.home.arpa"])
    for host in (
        b"192.168.1.10:8080",
        b"LLM.lan:1234",
        b"[fe80::1]:8080",
        b"box.home.arpa",
        b"localhost",
    ):
        assert lan.host_allowed(host), host
    for host in (b"192.168.1.11", b"home.arpa", b"evilhome.arpa", b"llm.lan.evil.example"):
        assert not lan.host_allowed(host), host
    # Bound to every address: the logged URL (http://0.0.0.0:PORT) works, no other address.
    assert WebGuard("0.0.0.0").host_allowed(b"0.0.0.0:8080")
    assert not WebGuard("0.0.0.0").host_allowed(b"192.168.1.10:8080")
    assert WebGuard("::").host_allowed(b"[::]:8080")
    assert not WebGuard("::").host_allowed(b"0.0.0.0:8080")
    assert not WebGuard("127.0.0.1").host_allowed(b"0.0.0.0:8080")
    assert WebGuard("::", ["*"]).host_allowed(b"anything.example")
    assert WebGuard("fd00::5").host_allowed(b"[fd00::5]:8080")


def test_origin_rules() -> None:
    guard = WebGuard("127.0.0.1", [], ["http://app.example", "HTTP://Upper.Example/"])
    host = b"localhost:8080"
    assert guard.origin_allowed(b"http://localhost:8080", host)
    assert guard.origin_allowed(b"https://localhost:8080", host)  # a TLS proxy in front
    assert guard.origin_allowed(b"HTTP://LOCALHOST:8080", host)
    assert guard.origin_allowed(b"http://app.example", host)
    assert guard.origin_allowed(b"http://upper.example", host)
    for origin in (
        b"http://localhost:8081",
        b"http://127.0.0.1:8080",  # another origin, though the same server
        b"http://evil.example",
        b"null",
        b"file://",
        b"http://localhost:8080.evil.example",
        b"",
    ):
        assert not guard.origin_allowed(origin, host), origin
    assert not guard.origin_allowed(b"http://localhost:8080", None)  # no Host: no own origin
    anyone = WebGuard(cors_origins=["*"])
    assert anyone.origin_allowed(b"http://evil.example", host)
    assert anyone.origin_allowed(b"null", host)


def test_check_reads_and_writes() -> None:
    guard = WebGuard(cors_origins=["http://app.example"])

    def check(writes: bool, **headers: str) -> str | None:
        raw = [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
        refusal = guard.check(raw, writes)
        return None if refusal is None else refusal.message

    assert check(True, host="localhost:1") is None
    assert check(True, host="localhost:1", origin="http://localhost:1") is None
    assert check(True, host="localhost:1", origin="http://app.example") is None
    assert check(True, host="localhost:1", sec_fetch_site="same-origin") is None
    assert check(True, host="localhost:1", sec_fetch_site="none") is None
    assert "cross-origin" in (check(True, host="localhost:1", origin="http://evil") or "")
    assert "cross-origin" in (check(True, host="localhost:1", origin="null") or "")
    assert "cross-site" in (check(True, host="localhost:1", sec_fetch_site="cross-site") or "")
    assert "cross-site" in (check(True, host="localhost:1", sec_fetch_site="same-site") or "")
    # Origin decides when both are present.
    both = {"origin": "http://localhost:1", "sec_fetch_site": "cross-site"}
    assert check(True, host="localhost:1", **both) is None
    # Reads get the Host check only.
    assert check(False, host="localhost:1", origin="http://evil") is None
    assert check(False, host="localhost:1", sec_fetch_site="cross-site") is None
    assert check(False, host="evil:1") == "host 'evil:1' is not allowed"
    assert "host" in (check(True, host="evil:1", origin="http://evil:1") or "")
    long = check(False, host="x" * 5000) or ""
    assert len(long) < 200  # what a client sent is quoted back, shortened


def test_host_verdicts_are_cached_within_a_bound() -> None:
    guard = WebGuard()
    for i in range(1000):
        assert not guard.host_allowed(f"h{i}.example".encode())
    assert guard.host_allowed(b"localhost:1")
    assert len(guard._hosts) <= 256


@given(st.binary(max_size=80))
def test_only_loopback_names_pass_by_default(host: bytes) -> None:
    if WebGuard().host_allowed(host):
        name = host_name(host.decode("latin-1"))
        assert name == "localhost" or is_loopback(name)
        assert not name.endswith(".example")


@given(st.text(max_size=40), st.text(max_size=40))
def test_check_never_fails(host: str, origin: str) -> None:
    headers = [(b"host", host.encode()), (b"origin", origin.encode())]
    WebGuard("0.0.0.0", ["llm.lan"], ["http://a.example"]).check(headers, True)


def test_allowed_hosts_setting() -> None:
    text = "server:\n  allowed_hosts: ['LLM.Lan', '[fd00::1]', '*.home.arpa', '*']\n"
    assert parse_text(text, "t").server.allowed_hosts == ["llm.lan", "fd00::1", "*.home.arpa", "*"]
    assert parse_text("server: {}\n", "t").server.allowed_hosts == []
    bad = "server:\n  allowed_hosts: ['llm.lan:8080', 'http://llm.lan', '', '*x']\n"
    with pytest.raises(ConfigError) as caught:
        parse_text(bad, "t")
    text = str(caught.value)
    assert "server.allowed_hosts" in text and "without a port" in text
    assert "not a host name" in text and "empty" in text and "wildcard" in text
    with pytest.raises(ValueError, match="without a port"):
        normalize_host_entry("localhost:80")


def _server(**values: Any) -> Any:
    return parse_text(json.dumps({"server": values}), "t").server


def test_startup_warnings() -> None:
    assert startup_warnings(_server()) == []
    assert startup_warnings(_server(host="127.0.0.2")) == []
    assert startup_warnings(_server(host="::1")) == []
    (line,) = startup_warnings(_server(host="0.0.0.0"))
    assert "binding to 0.0.0.0 with no api_keys" in line and "server.allowed_hosts" in line
    (line,) = startup_warnings(_server(host="0.0.0.0", allowed_hosts=["llm.lan"]))
    assert "binding to 0.0.0.0" in line and "allowed_hosts" not in line
    assert startup_warnings(_server(host="0.0.0.0", api_keys=["k"])) == []
    lines = startup_warnings(_server(allowed_hosts=["*"], cors_origins=["*"]))
    assert len(lines) == 2 and "DNS rebinding" in lines[0] and "cors_origins" in lines[1]


# --- against a real manager --------------------------------------------------------------

CORS = "http://app.example"
HOSTS = {"loopback": "localhost", "allowed": "llm.lan", "foreign": "evil.example"}
ORIGINS = ("none", "same", "cors", "foreign", "null", "cross-site", "same-site")
REFUSED_ORIGINS = frozenset({"foreign", "null", "cross-site", "same-site"})
CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
# family -> (method, path, body); the gateway's body is a cross-site form's: text/plain.
FAMILIES: dict[str, tuple[str, str, str | None]] = {
    "gateway": ("POST", "/v1/chat/completions", CHAT),
    "gateway-get": ("GET", "/v1/echo?model=m", None),  # what an <img> can send
    "start": ("POST", "/api/models/m/start", None),
    "stop-all": ("POST", "/api/models/stop-all", None),
    "reload": ("POST", "/api/config/reload", None),
    "clear-logs": ("POST", "/api/logs/m/clear?keep_minutes=0", None),
    "info": ("GET", "/api/models/all-models/info", None),
    "logs": ("GET", "/api/models/m/logs/stream?follow=false", None),
    "requests": ("GET", "/api/requests", None),
    "usage": ("GET", "/api/usage", None),
    "ui": ("GET", "/ui", None),
    "events": ("GET", "/api/events", None),
}
READS = frozenset({"info", "logs", "requests", "usage", "ui", "events"})
RUNS_OR_STOPS = frozenset({"gateway", "gateway-get", "start", "stop-all"})


def expected(family: str, host: str, origin: str) -> int:
    if host == "foreign":
        return 403
    if family in READS or origin not in REFUSED_ORIGINS:
        return 200
    return 403


def request_headers(host: str, origin: str, port: int) -> dict[str, str]:
    authority = f"{HOSTS[host]}:{port}"
    headers = {"Host": authority}
    if origin == "same":
        headers["Origin"] = f"http://{authority}"
    elif origin == "cors":
        headers["Origin"] = CORS
    elif origin == "foreign":
        headers["Origin"] = "http://evil.example"
    elif origin == "null":
        headers["Origin"] = "null"
    elif origin in ("cross-site", "same-site"):
        headers["Sec-Fetch-Site"] = origin
    return headers


async def send(
    http: aiohttp.ClientSession, url: str, family: str, headers: dict[str, str]
) -> tuple[int, Any]:
    method, path, body = FAMILIES[family]
    headers = dict(headers)
    if body is not None:
        headers["Content-Type"] = "text/plain"
    async with http.request(method, url + path, headers=headers, data=body) as resp:
        if family == "events" and resp.status == 200:
            return resp.status, None  # a stream: the status is enough
        raw = await resp.read()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw


def _models(spawn_log: Path) -> dict[str, Any]:
    command = fake_command("--spawn-log", str(spawn_log))
    return {"m": {"schemes": {"CPU": {"command": command}}}}


def _state(mgr: Any) -> str:
    return str(mgr.supervisor.resolve("m").state.value)


def _check_refusal(family: str, body: Any, problems: list[str], where: str) -> None:
    """403 in the envelope of its path: OpenAI's on the gateway, the API's elsewhere."""
    if family.startswith("gateway"):
        ok = isinstance(body, dict) and body.get("error", {}).get("type") == "permission_error"
        ok = ok and body["error"].get("code") == 403 and "refused" in body["error"]["message"]
        ok = ok or (isinstance(body, dict) and "is not allowed" in body["error"]["message"])
    else:
        ok = isinstance(body, dict) and body.get("success") is False
        ok = ok and isinstance(body.get("message"), str) and isinstance(body.get("error"), str)
    if not ok:
        problems.append(f"{where}: not a 403 body of its path: {body!r}")


async def test_every_route_family_origin_and_host(tmp_path: Path, spawn_log: Path) -> None:
    made = make_config(tmp_path, _models(spawn_log), allowed_hosts=["llm.lan"], cors_origins=[CORS])
    source = tmp_path / "llm-manager.yaml"  # a file, so that a reload can read it again
    source.write_text(yaml.safe_dump(made.config.model_dump(mode="json", exclude_unset=True)))
    loaded = load_file(source)
    combos = [(f, h, o) for f in FAMILIES for h in HOSTS for o in ORIGINS]
    async with running_manager(loaded) as mgr:
        port = int(mgr.url.rsplit(":", 1)[1])
        problems: list[str] = []

        async def run(family: str, host: str, origin: str) -> Any:
            status, body = await send(
                mgr.http, mgr.url, family, request_headers(host, origin, port)
            )
            where = f"{family} / Host {host} / Origin {origin}"
            want = expected(family, host, origin)
            if status != want:
                problems.append(f"{where}: {status}, expected {want}: {body!r}")
            elif status == 403:
                _check_refusal(family, body, problems, where)
            return body

        # 1. The model is stopped: everything refused is sent, and every read.
        for family, host, origin in combos:
            if expected(family, host, origin) == 403 or family in READS:
                await run(family, host, origin)
        assert not problems, "\n".join(problems)
        assert _state(mgr) == "stopped"
        assert read_pids(spawn_log) == [], "a refused request started a model"

        # 2. A running model: refused stop-all, start and gateway requests leave it as it is.
        status, _ = await mgr.post("/api/models/m/start")
        assert status == 200 and _state(mgr) == "routing"
        pid = mgr.supervisor.resolve("m").pid
        for family, host, origin in combos:
            if family in RUNS_OR_STOPS and expected(family, host, origin) == 403:
                await run(family, host, origin)
        assert not problems, "\n".join(problems)
        assert _state(mgr) == "routing" and mgr.supervisor.resolve("m").pid == pid
        assert len(read_pids(spawn_log)) == 1

        # 3. Every allowed write works: the dashboard, an allowed CORS origin, curl and SDKs.
        for family, host, origin in combos:
            if family in READS or expected(family, host, origin) != 200:
                continue
            if family == "stop-all":
                status, _ = await mgr.post("/api/models/m/start")
                assert status == 200 and _state(mgr) == "routing"
            body = await run(family, host, origin)
            where = f"{family} / Host {host} / Origin {origin}"
            if family == "stop-all" and _state(mgr) != "stopped":
                problems.append(f"{where}: the model was not stopped")
            if family in ("start", "gateway", "gateway-get") and _state(mgr) != "routing":
                problems.append(f"{where}: the model is not running: {body!r}")
        assert not problems, "\n".join(problems)
        await mgr.post("/api/models/stop-all")


async def test_keys_do_not_open_other_origins_or_hosts(tmp_path: Path, spawn_log: Path) -> None:
    loaded = make_config(tmp_path, _models(spawn_log), api_keys=["user"], admin_keys=["root"])
    async with running_manager(loaded) as mgr:
        port = int(mgr.url.rsplit(":", 1)[1])
        own = {"Host": f"127.0.0.1:{port}", "Origin": f"http://127.0.0.1:{port}"}
        admin = {"Authorization": "Bearer root"}
        foreign_origin = {**own, **admin, "Origin": "http://evil.example"}
        assert (await send(mgr.http, mgr.url, "start", foreign_origin))[0] == 403
        foreign_host = {**admin, "Host": f"evil.example:{port}"}
        assert (await send(mgr.http, mgr.url, "info", foreign_host))[0] == 403
        assert (await send(mgr.http, mgr.url, "ui", foreign_host))[0] == 403
        assert read_pids(spawn_log) == []
        # Keys are still needed where they were.
        assert (await send(mgr.http, mgr.url, "start", own))[0] == 401
        assert (await send(mgr.http, mgr.url, "logs", own))[0] == 401
        assert (await send(mgr.http, mgr.url, "start", {**own, **admin}))[0] == 200
        assert (await send(mgr.http, mgr.url, "stop-all", {**own, **admin}))[0] == 200


async def test_request_without_host(tmp_path: Path, spawn_log: Path) -> None:
    """HTTP/1.0 sends no Host: allowed, but without a Host it has no own origin."""
    async with running_manager(make_config(tmp_path, _models(spawn_log))) as mgr:
        port = int(mgr.url.rsplit(":", 1)[1])

        async def raw(request: bytes) -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            await writer.drain()
            answer = await reader.read()
            writer.close()
            return answer

        answer = await raw(b"GET /api/models/all-models/info HTTP/1.0\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        body = b'{"model": "m"}'
        request = (
            b"POST /v1/chat/completions HTTP/1.0\r\nOrigin: http://127.0.0.1:%d\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (port, len(body), body)
        )
        answer = await raw(request)
        assert answer.startswith(b"HTTP/1.1 403"), answer[:200]
        assert read_pids(spawn_log) == []


async def test_wildcards_open_it_deliberately(tmp_path: Path, spawn_log: Path) -> None:
    loaded = make_config(tmp_path, _models(spawn_log), allowed_hosts=["*"], cors_origins=["*"])
    async with running_manager(loaded) as mgr:
        headers = {"Host": "evil.example", "Origin": "http://evil.example"}
        status, _ = await send(mgr.http, mgr.url, "start", headers)
        assert status == 200
        await wait_until(lambda: _state(mgr) == "routing")
        status, _ = await send(mgr.http, mgr.url, "stop-all", headers)
        assert status == 200 and _state(mgr) == "stopped"
