"""Load generators: wrk (non-streamed, when installed), an aiohttp client (streams, and
non-streamed without wrk), and raw malformed requests."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import os
import random
import re
import signal
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from llm_manager.models.process import dies_with_parent


@dataclass
class Load:
    """The result of one timed run against one URL."""

    tool: str
    requests: int  # answers completed (any status)
    seconds: float
    p50_ms: float | None
    p99_ms: float | None
    ttfb_p50_ms: float | None = None
    events: int = 0  # SSE events received, all answers together
    statuses: dict[str, int] = field(default_factory=dict)
    errors: int = 0  # connection errors, timeouts
    retries: int = 0  # requests sent again: the server had closed the kept-alive connection

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rps": self.rps}


@dataclass(frozen=True)
class Request:
    url: str
    body: bytes
    headers: dict[str, str]
    stream: bool = False


def chat_request(
    base: str, model: str, headers: dict[str, str], stream: bool = False, **extra: Any
) -> Request:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    if stream:
        body["stream"] = True
    return _chat_post(base, json.dumps(body).encode(), headers, stream)


def _chat_post(base: str, body: bytes, headers: dict[str, str], stream: bool = False) -> Request:
    return Request(
        base + "/v1/chat/completions", body, {"Content-Type": "application/json", **headers}, stream
    )


# --------------------------------------------------------------------------- large bodies

_VOCABULARY = (
    "the a of to and in is that for it with as on be this are by or from at an which model "
    "request answer server token context window cache latency memory process thread queue "
    "function value error result file line test build change config user client system data "
    "should would could because when then there their these those about after before while "
    "measure relay engine proxy stream record header body field string number list table "
    "first second last next other same different small large fast slow simple clear"
)
_WORDS = _VOCABULARY.split()
_ODD = ("café", "naïve", "“quoted”", "—", "→", "ü", "日本語", "🙂")  # sent as \u escapes
_CODE = (
    "\n\n```python\ndef handler(request):\n    body = json.loads(request.body)\n"
    '    path = "C:\\\\models\\\\" + body["model"]\n'
    '    return {"model": body["model"], "path": path, "ok": True}\n```\n\n'
)


def _prose(rng: random.Random, length: int, odd: bool = True) -> str:
    """At least ``length`` characters of sentences and paragraphs; ``odd``: a tenth of the
    sentences with a non-ASCII word."""
    parts: list[str] = []
    size = 0
    while size < length:
        words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 24))]
        if odd and rng.random() < 0.1:
            words.insert(rng.randrange(len(words)), rng.choice(_ODD))
        sentence = " ".join(words).capitalize() + rng.choice((". ", ". ", "? ", ".\n\n"))
        parts.append(sentence)
        size += len(sentence)
    return "".join(parts)


@functools.lru_cache(maxsize=4)
def chat_history(size: int) -> tuple[dict[str, str], ...]:
    """A chat history of user and assistant turns whose JSON is a little under ``size``
    bytes: a system prompt, then messages of 200-4,000 characters of prose, a fifth of the
    assistant's with a code block (quotes, newlines, backslashes), a tenth of the sentences
    with a non-ASCII word (``\\u`` escapes in the JSON). The same for the same size."""
    rng = random.Random(size)
    messages = [{"role": "system", "content": "You are a helpful assistant. " + _prose(rng, 400)}]
    total = len(json.dumps(messages))
    while True:
        role = "user" if len(messages) % 2 else "assistant"
        content = _prose(rng, rng.randint(200, 4000))
        if role == "assistant" and rng.random() < 0.2:
            content += _CODE + _prose(rng, 300)
        message = {"role": role, "content": content}
        grown = total + 2 + len(json.dumps(message))
        if grown > size - 512:
            return tuple(messages)
        messages.append(message)
        total = grown


def history_request(base: str, model: str, headers: dict[str, str], size: int) -> Request:
    """A non-streamed chat completion whose body is exactly ``size`` bytes: ``chat_history``
    and a last user message of ASCII prose cut to fit. The model comes after the messages,
    in the order OpenAI's Python SDK writes them."""
    messages = [*chat_history(size), {"role": "user", "content": ""}]
    room = size - len(json.dumps({"messages": messages, "model": model}))
    messages[-1]["content"] = _prose(random.Random(room), room, odd=False).replace("\n", " ")[:room]
    body = json.dumps({"messages": messages, "model": model}).encode()
    if len(body) != size:
        raise ValueError(f"chat history of {len(body)} bytes, not {size}")
    return _chat_post(base, body, headers)


# --------------------------------------------------------------------------- wrk

WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = {body}
{headers}
local threads = {{}}
function setup(thread) table.insert(threads, thread) end
function init(args) statuses = {{}} end
function response(status, headers, body) statuses[status] = (statuses[status] or 0) + 1 end
function done(summary, latency, requests)
  local total = {{}}
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("statuses")) do total[k] = (total[k] or 0) + v end
  end
  for k, v in pairs(total) do io.write(string.format("status %d %d\\n", k, v)) end
end
"""

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _lua_string(text: str) -> str:
    return "[==[" + text + "]==]"


def wrk_script(folder: Path, req: Request) -> Path:
    headers = "\n".join(
        f"wrk.headers[ {_lua_string(k)} ] = {_lua_string(v)}" for k, v in req.headers.items()
    )
    text = WRK_SCRIPT.format(body=_lua_string(req.body.decode()), headers=headers)
    path = folder / f"wrk-{hashlib.sha1(text.encode() + req.url.encode()).hexdigest()[:12]}.lua"
    path.write_text(text)
    return path


def _ms(value: str, unit: str) -> float:
    return float(value) * _UNITS[unit]


def parse_wrk(out: str) -> Load:
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)\b", out)
    if done is None:
        raise RuntimeError("cannot read wrk's output:\n" + out)
    pct = {
        p: _ms(v, u) for p, v, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s|m)\b", out, re.M)
    }
    statuses = {code: int(n) for code, n in re.findall(r"^status (\d+) (\d+)$", out, re.M)}
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    return Load(
        tool="wrk",
        requests=int(done.group(1)),
        seconds=_ms(done.group(2), done.group(3)) / 1000,
        p50_ms=pct.get("50"),
        p99_ms=pct.get("99"),
        statuses=statuses,
        errors=errors,
    )


async def wrk(exe: str, script: Path, url: str, clients: int, seconds: float) -> Load:
    """One wrk thread, ``clients`` connections, for ``seconds``. wrk's ``-d`` takes whole
    seconds only, so it is given more and stopped with SIGINT, on which it prints its report
    (for the time it really ran)."""
    argv = [exe, "-t1", f"-c{clients}", f"-d{int(seconds) + 30}s", "--timeout", "30s"]
    argv += ["--latency", "-s", str(script), url]
    # wrk dies with the harness: an interrupt (Ctrl-C, SIGTERM) that lands while wrk is
    # being spawned, before there is a process to stop below, leaves no wrk running.
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        preexec_fn=dies_with_parent(os.getpid()),
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), seconds)
    except TimeoutError:
        proc.send_signal(signal.SIGINT)
        out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:  # cancelled (Ctrl-C): leave no wrk behind
            proc.kill()
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}):\n{out.decode(errors='replace')}")
    return parse_wrk(out.decode(errors="replace"))


# --------------------------------------------------------------------------- aiohttp


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


# A kept-alive connection that the server closed meanwhile (llama.cpp's HTTP server closes
# each connection after a few requests): the request never reached it and is sent again.
STALE_CONNECTION = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)


async def _one(http: aiohttp.ClientSession, req: Request) -> tuple[int, float, float, int]:
    """(status, latency s, time to first body byte s, SSE events) of one request."""
    began = time.perf_counter()
    first = 0.0
    events = 0
    carry = b""
    async with http.post(req.url, data=req.body, headers=req.headers) as resp:
        async for chunk in resp.content.iter_any():
            if not first:
                first = time.perf_counter() - began
            if req.stream:
                data = carry + chunk
                events += data.count(b"data:")
                carry = data[-4:]  # a marker split across chunks is still counted once
        status = resp.status
    latency = time.perf_counter() - began
    return status, latency, first or latency, events


async def _retried(
    http: aiohttp.ClientSession, req: Request, counts: dict[str, int]
) -> tuple[int, float, float, int]:
    for _ in range(4):  # every pooled connection may be stale: try a few
        try:
            return await _one(http, req)
        except STALE_CONNECTION:
            counts["retries"] += 1
    return await _one(http, req)


async def http_load(req: Request, clients: int, seconds: float) -> Load:
    """``clients`` workers send ``req`` back to back for ``seconds``; answers are read whole."""
    latencies: list[float] = []
    ttfbs: list[float] = []
    statuses: dict[str, int] = {}
    counts = {"events": 0, "errors": 0, "retries": 0}
    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        began = time.perf_counter()
        deadline = began + seconds

        async def worker() -> None:
            while time.perf_counter() < deadline:
                try:
                    status, latency, ttfb, events = await _retried(http, req, counts)
                except (TimeoutError, aiohttp.ClientError, OSError):
                    counts["errors"] += 1
                    await asyncio.sleep(0.01)
                    continue
                statuses[str(status)] = statuses.get(str(status), 0) + 1
                latencies.append(latency * 1000)
                ttfbs.append(ttfb * 1000)
                counts["events"] += events

        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - began
    return Load(
        tool="aiohttp",
        requests=len(latencies),
        seconds=wall,
        p50_ms=_percentile(latencies, 0.5),
        p99_ms=_percentile(latencies, 0.99),
        ttfb_p50_ms=statistics.median(ttfbs) if ttfbs else None,
        events=counts["events"],
        statuses=statuses,
        errors=counts["errors"],
        retries=counts["retries"],
    )


async def first_byte(req: Request) -> float:
    """Seconds from sending ``req`` to the first byte of its answer's body (fresh connection)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as http:
        began = time.perf_counter()
        async with http.post(req.url, data=req.body, headers=req.headers) as resp:
            if resp.status != 200:
                raise RuntimeError(f"{req.url} answered {resp.status}: {await resp.text()}")
            await resp.content.readany()
            took = time.perf_counter() - began
            await resp.read()
    return took


async def poll_healthy(url: str, every: float = 0.005, timeout: float = 300) -> tuple[float, float]:
    """``time.perf_counter()`` and ``time.time()`` when ``url`` first answers 200, polling
    every ``every`` seconds (a fresh connection each time)."""
    deadline = time.perf_counter() + timeout
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        while time.perf_counter() < deadline:
            with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                async with http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    if resp.status == 200:
                        return time.perf_counter(), time.time()
            await asyncio.sleep(every)
    raise RuntimeError(f"{url} did not turn healthy in {timeout:g} s")


# --------------------------------------------------------------------------- bad input


def _raw(
    method: str,
    path: str,
    body: bytes = b"",
    content_type: str = "application/json",
    length: int | None = None,
) -> bytes:
    head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    if method != "GET":
        head.append(f"Content-Type: {content_type}")
        head.append(f"Content-Length: {len(body) if length is None else length}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def malformed_requests(model: str) -> dict[str, bytes]:
    """Each kind of bad request, as raw bytes (one connection each)."""
    chat = "/v1/chat/completions"
    msgs = '"messages": [{"role": "user", "content": "hi"}]'
    return {
        "invalid JSON": _raw("POST", chat, b'{"model": "' + model.encode() + b'", "messages": ['),
        "missing model": _raw("POST", chat, ("{" + msgs + "}").encode()),
        "unknown model": _raw("POST", chat, ('{"model": "no-such-model", ' + msgs + "}").encode()),
        "model not a string": _raw("POST", chat, ('{"model": 42, ' + msgs + "}").encode()),
        "wrong method": _raw("GET", chat),
        "oversized body (Content-Length 64 MiB)": _raw("POST", chat, b"", length=64 << 20),
        "non-JSON content": _raw("POST", chat, b"model=x&prompt=hi", "text/plain"),
    }


async def _send_raw(port: int, data: bytes) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 30)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    parts = line.split()
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0  # 0: no answer


async def malformed_burst(
    port: int, model: str, per_kind: int, spread: float, senders: int = 4
) -> dict[str, dict[str, int]]:
    """Sends ``per_kind`` of each malformed request, spread over ``spread`` seconds from
    ``senders`` connections at a time; returns the statuses seen per kind."""
    kinds = malformed_requests(model)
    queue = [kind for _ in range(per_kind) for kind in kinds]
    pause = spread * senders / max(1, len(queue))
    seen: dict[str, dict[str, int]] = {kind: {} for kind in kinds}

    async def sender(share: list[str]) -> None:
        for kind in share:
            try:
                status = str(await _send_raw(port, kinds[kind]))
            except (TimeoutError, OSError) as exc:
                status = type(exc).__name__
            seen[kind][status] = seen[kind].get(status, 0) + 1
            await asyncio.sleep(pause)

    await asyncio.gather(*(sender(queue[i::senders]) for i in range(senders)))
    return seen
