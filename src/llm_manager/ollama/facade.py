"""The Ollama API as an ASGI app (docs/api.md, "Ollama API").

Chat, generate and embed requests are translated to the model's OpenAI endpoint and run
through the gateway in-process (an ASGI call with its own receive and send), so that the
relay, the turn-taking scheduler, request records, usage and metrics apply unchanged; the
gateway's answer is translated back chunk by chunk. Token counts come from the same scan
of the same bytes as the request record's (gateway/usage.py), so they are equal.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from llm_manager.errors import ManagerError
from llm_manager.gateway.forward import ClientGone, Message, Receive, Scope, Send, read_body
from llm_manager.gateway.usage import SSEUsageScanner, Usage, from_json_bytes
from llm_manager.models.runtime import ModelRuntime, State
from llm_manager.models.supervisor import Supervisor
from llm_manager.ollama import keepalive, names, paths, translate
from llm_manager.ollama.translate import Answer, Invalid

log = logging.getLogger(__name__)

# What /api/version reports: the Ollama API version whose shapes this facade follows
# (clients compare it to enable features); LLM-Manager's own version comes beside it.
OLLAMA_VERSION = "0.12.0"
_NDJSON = [(b"content-type", b"application/x-ndjson"), (b"x-accel-buffering", b"no")]
_JSON = [(b"content-type", b"application/json; charset=utf-8")]
_MODES = {"chat": ["completion", "tools"], "base": ["completion"], "embedding": ["embedding"]}


async def send_error(
    send: Send, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    """An error in Ollama's shape: ``{"error": "..."}``."""
    await send_json(send, status, {"error": message}, headers)


async def send_json(
    send: Send, status: int, body: object, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    data = json.dumps(body).encode()
    head = [*_JSON, (b"content-length", str(len(data)).encode()), *(headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": data})


def _line(obj: object) -> Message:
    data = json.dumps(obj).encode() + b"\n"
    return {"type": "http.response.body", "body": data, "more_body": True}


class _Exchange:
    """One request through the gateway: its status, then its body chunk by chunk."""

    def __init__(self, task: asyncio.Task[None], queue: asyncio.Queue[Message | None]) -> None:
        self.task = task
        self.queue = queue
        self.status = 502
        self.content_type = b""

    async def begin(self) -> None:
        message = await self.queue.get()
        if message is None or message["type"] != "http.response.start":
            raise RuntimeError("the gateway ended without an answer")
        self.status = message["status"]
        for name, value in message.get("headers", []):
            if name.lower() == b"content-type":
                self.content_type = value.lower()

    async def chunks(self) -> AsyncIterator[bytes]:
        while True:
            message = await self.queue.get()
            if message is None:
                return
            chunk = message.get("body", b"")
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                return

    async def body(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    async def close(self) -> None:
        if not self.task.done():
            self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.task


def _error_text(status: int, body: bytes) -> str:
    try:
        obj = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip() or f"HTTP {status}"
    return _error_of(obj, status)


def _error_of(obj: object, status: int) -> str:
    """The message of an error answer or event (OpenAI's or FastAPI's shape)."""
    if isinstance(obj, dict):
        err = obj.get("error", obj.get("detail"))
        if isinstance(err, dict):
            return str(err.get("message") or err)
        if err is not None:
            return str(err)
    return f"HTTP {status}"


def _events(buffer: bytearray, chunk: bytes) -> list[dict[str, Any]]:
    """Complete SSE ``data:`` events of a stream; the rest stays in ``buffer``."""
    buffer += chunk
    out: list[dict[str, Any]] = []
    while True:
        end = buffer.find(b"\n")
        if end < 0:
            return out
        line = bytes(buffer[:end]).strip()
        del buffer[: end + 1]
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if not data or data == b"[DONE]":
            continue
        with contextlib.suppress(ValueError):
            obj = json.loads(data)
            if isinstance(obj, dict):
                out.append(obj)


class OllamaFacade:
    """ASGI app for the paths in ``paths.py``. Auth and the web guard ran before it."""

    def __init__(
        self,
        supervisor: Supervisor,
        gateway: object,
        version: str,
        keep_alive: tuple[float, float],
        max_body_bytes: int,
    ) -> None:
        """``keep_alive``: the floor and ceiling (0 = none) of a request's keep_alive; with
        ``max_body_bytes``, the start-up configuration's (a reload of them needs a restart)."""
        self._supervisor = supervisor
        self._gateway = gateway
        self._version = version
        self._keep_alive_limits = keep_alive
        self._max_body = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        try:
            if path not in paths.SERVED:
                await send_error(
                    send,
                    501,
                    f"{path} is not supported by LLM-Manager: models are configured in its "
                    "config file, not pulled, pushed, created, copied or deleted over the API",
                )
                return
            wants = "GET" if path in ("/api/tags", "/api/ps", "/api/version") else "POST"
            if method != wants and not (wants == "GET" and method == "HEAD"):
                await send_error(send, 405, f"{method} is not allowed on {path}; use {wants}")
                return
            if path == "/api/version":
                version = {"version": OLLAMA_VERSION, "llm_manager": self._version}
                await send_json(send, 200, version)
            elif path == "/api/tags":
                await send_json(send, 200, {"models": [self._entry(r) for r in self._listed()]})
            elif path == "/api/ps":
                await send_json(send, 200, {"models": self._loaded()})
            else:
                body = await self._body(scope, receive)
                if path == "/api/show":
                    await self._show(send, body)
                elif path in ("/api/embed", "/api/embeddings"):
                    await self._embed(scope, receive, send, body, legacy=path == "/api/embeddings")
                else:
                    await self._complete(scope, receive, send, body, chat=path == "/api/chat")
        except ClientGone:
            return
        except Invalid as exc:
            await send_error(send, 400, str(exc))
        except ManagerError as exc:
            await send_error(send, exc.status, exc.message, _encoded(exc.headers))

    # --- listing ----------------------------------------------------------------------------

    def _listed(self) -> list[ModelRuntime]:
        return [r for r in self._supervisor.runtimes if r.spec.mode in _MODES]

    def _entry(self, runtime: ModelRuntime) -> dict[str, Any]:
        model_file = _model_file(runtime)
        size = 0
        modified = time.time()
        if model_file is not None:
            with contextlib.suppress(OSError):
                stat = model_file.stat()
                size, modified = stat.st_size, stat.st_mtime
        name = runtime.name
        return {
            "name": name,
            "model": name,
            "modified_at": translate.iso(modified),
            "size": size,
            "digest": hashlib.sha256(name.encode()).hexdigest(),
            "details": {
                "parent_model": "",
                "format": "gguf" if model_file and model_file.suffix == ".gguf" else "",
                "family": "",
                "families": None,
                "parameter_size": "",
                "quantization_level": "",
            },
        }

    def _loaded(self) -> list[dict[str, Any]]:
        out = []
        now = time.monotonic()
        for runtime in self._listed():
            if runtime.state is not State.ROUTING:
                continue
            entry = self._entry(runtime)
            timeout = runtime.idle_timeout
            if timeout > 0 and not runtime.spec.pinned:
                left = max(0.0, timeout - runtime.idle_seconds(now))
                entry["expires_at"] = translate.iso(time.time() + left)
            else:
                entry["expires_at"] = "2318-11-13T00:00:00Z"  # never (Ollama's "forever" shape)
            booked = self._supervisor.booked(runtime.name)
            entry["size"] = sum(booked.values()) * 1024 * 1024
            entry["size_vram"] = (
                sum(mib for key, mib in booked.items() if not str(key).startswith("cpu"))
                * 1024
                * 1024
            )
            out.append(entry)
        return out

    async def _show(self, send: Send, body: dict[str, Any]) -> None:
        runtime = names.resolve(self._supervisor, _model(body))
        entry = self._entry(runtime)
        await send_json(
            send,
            200,
            {
                "modelfile": "",
                "parameters": "",
                "template": "",
                "details": entry["details"],
                "model_info": {"general.basename": runtime.name},
                "capabilities": _MODES.get(runtime.spec.mode, []),
                "modified_at": entry["modified_at"],
            },
        )

    # --- requests through the gateway -------------------------------------------------------

    async def _body(self, scope: Scope, receive: Receive) -> dict[str, Any]:
        raw = await read_body(scope["headers"], receive, self._max_body)
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            raise Invalid("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise Invalid("the request body must be a JSON object")
        return body

    def _target(self, body: dict[str, Any]) -> tuple[str, ModelRuntime, float | None]:
        """The model as asked, its runtime, and the idle timeout its keep_alive asks for."""
        asked = _model(body)
        return asked, names.resolve(self._supervisor, asked), self._keep_alive(body)

    def _keep_alive(self, body: dict[str, Any]) -> float | None:
        """The idle timeout the request's keep_alive asks for, clamped; None = not given."""
        value = body.get("keep_alive")
        if value is None:
            return None
        try:
            seconds = keepalive.parse(value)
        except ValueError as exc:
            raise Invalid(str(exc)) from None
        return keepalive.idle_timeout(seconds, *self._keep_alive_limits)

    def _settle(self, runtime: ModelRuntime, timeout: float | None) -> None:
        """After a request: its keep_alive becomes the model's idle timeout for this run;
        a request without one returns the model to its configured timeout."""
        if runtime.state is State.ROUTING:
            runtime.keep_alive = None if timeout is None else (timeout, runtime.start_count)

    async def _start(
        self, scope: Scope, receive: Receive, path: str, payload: dict[str, Any]
    ) -> _Exchange:
        data = json.dumps(payload).encode()
        inner = dict(scope)
        inner.update(
            method="POST",
            path=path,
            raw_path=path.encode(),
            query_string=b"",
            headers=[
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
            ],
        )
        given = False

        async def inner_receive() -> Message:
            nonlocal given
            if not given:
                given = True
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()  # the client's own: tells the gateway when it leaves

        queue: asyncio.Queue[Message | None] = asyncio.Queue(maxsize=64)

        async def run() -> None:
            try:
                await self._gateway(inner, inner_receive, queue.put)  # type: ignore[operator]
            except BaseException:
                with contextlib.suppress(asyncio.QueueFull):
                    queue.put_nowait(None)  # the reader, if any, is not left waiting
                raise
            await queue.put(None)

        exchange = _Exchange(asyncio.create_task(run(), name=f"ollama {path}"), queue)
        try:
            await exchange.begin()
        except BaseException:
            await exchange.close()
            raise
        return exchange

    async def _embed(
        self, scope: Scope, receive: Receive, send: Send, body: dict[str, Any], legacy: bool
    ) -> None:
        began = time.perf_counter()
        asked, runtime, timeout = self._target(body)
        cold = runtime.state is not State.ROUTING
        payload: dict[str, Any] = {
            "model": runtime.name,
            "input": translate.embed_input(body, legacy),
        }
        if isinstance(body.get("dimensions"), int):
            payload["dimensions"] = body["dimensions"]
        exchange = await self._start(scope, receive, "/v1/embeddings", payload)
        try:
            raw = await exchange.body()
        finally:
            await exchange.close()
            self._settle(runtime, timeout)
        if exchange.status >= 400:
            await send_error(send, exchange.status, _error_text(exchange.status, raw))
            return
        try:
            answer = json.loads(raw)
            vectors = [item["embedding"] for item in answer["data"]]
        except (ValueError, KeyError, TypeError):
            await send_error(send, 502, "the model server's embedding answer is not understood")
            return
        if legacy:
            await send_json(send, 200, {"embedding": vectors[0] if vectors else []})
            return
        usage = from_json_bytes(raw).completed()
        out: dict[str, Any] = {
            "model": asked,
            "embeddings": vectors,
            "total_duration": int((time.perf_counter() - began) * 1e9),
            "load_duration": _load_ns(runtime, cold),
        }
        if usage.prompt_tokens is not None:
            out["prompt_eval_count"] = usage.prompt_tokens
        await send_json(send, 200, out)

    async def _complete(
        self, scope: Scope, receive: Receive, send: Send, body: dict[str, Any], chat: bool
    ) -> None:
        began = time.perf_counter()
        asked, runtime, timeout = self._target(body)
        stream = body.get("stream", True) is not False  # Ollama streams unless told not to
        if chat:
            empty = not body.get("messages")
        else:
            empty = not body.get("prompt") and not body.get("images")
        if empty:  # Ollama's way to load (or, with keep_alive 0, unload) a model
            await self._load(runtime, send, asked, chat, timeout)
            return
        if runtime.spec.mode not in ("chat", "base"):
            raise Invalid(f"model {runtime.name!r} is an {runtime.spec.mode} model: use /api/embed")
        cold = runtime.state is not State.ROUTING
        if chat:
            path = "/v1/chat/completions"
            payload = translate.chat_request(body, runtime.name, stream)
        else:
            path, payload = translate.generate_request(body, runtime.name, stream)
        exchange = await self._start(scope, receive, path, payload)
        try:
            if exchange.status >= 400:
                raw = await exchange.body()
                await send_error(send, exchange.status, _error_text(exchange.status, raw))
                return
            if stream and exchange.content_type.startswith(b"text/event-stream"):
                await self._stream(exchange, send, asked, chat, began, runtime, cold)
            else:
                raw = await exchange.body()
                await self._whole(raw, send, asked, chat, stream, began, runtime, cold)
        finally:
            await exchange.close()
            self._settle(runtime, timeout)

    async def _load(
        self, runtime: ModelRuntime, send: Send, asked: str, chat: bool, timeout: float | None
    ) -> None:
        head: dict[str, Any] = {"model": asked, "created_at": translate.now_iso()}
        if chat:
            head["message"] = {"role": "assistant", "content": ""}
        else:
            head["response"] = ""
        if timeout == keepalive.UNLOAD:
            if runtime.state is not State.STOPPED and runtime.pending == 0:
                await runtime.stop("unloaded by an Ollama request (keep_alive 0)")
            else:
                self._settle(runtime, timeout)
            await send_json(send, 200, {**head, "done": True, "done_reason": "unload"})
            return
        runtime.acquire()
        try:
            await runtime.ensure_ready()
        finally:
            runtime.release()
        self._settle(runtime, timeout)
        await send_json(send, 200, {**head, "done": True, "done_reason": "load"})

    async def _whole(
        self,
        raw: bytes,
        send: Send,
        asked: str,
        chat: bool,
        stream: bool,
        began: float,
        runtime: ModelRuntime,
        cold: bool,
    ) -> None:
        try:
            event = json.loads(raw)
        except ValueError:
            event = None
        if not isinstance(event, dict):
            await send_error(send, 502, "the model server's answer is not understood")
            return
        answer = Answer()
        answer.take(event, "message")
        usage = from_json_bytes(raw).completed()
        out = {"model": asked, "created_at": translate.now_iso(), **_payload(answer, chat)}
        out.update(translate.final_fields(usage, answer, began, _load_s(runtime, cold)))
        if stream:  # asked for a stream, answered whole: one NDJSON line
            await send({"type": "http.response.start", "status": 200, "headers": _NDJSON})
            await send(_line(out))
            await send({"type": "http.response.body", "body": b""})
        else:
            await send_json(send, 200, out)

    async def _stream(
        self,
        exchange: _Exchange,
        send: Send,
        asked: str,
        chat: bool,
        began: float,
        runtime: ModelRuntime,
        cold: bool,
    ) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": _NDJSON})
        scanner = SSEUsageScanner()
        buffer = bytearray()
        answer = Answer()
        failed: str | None = None
        async for chunk in exchange.chunks():
            scanner.feed(chunk)
            for event in _events(buffer, chunk):
                if "error" in event:
                    failed = _error_of(event, 502)
                    continue
                text, thinking = answer.take(event, "delta")
                if text or thinking:
                    part: dict[str, Any] = {"model": asked, "created_at": translate.now_iso()}
                    part.update(_delta(text, thinking, chat))
                    part["done"] = False
                    await send(_line(part))
        if failed is not None:
            await send(_line({"error": failed}))
        else:
            usage: Usage = scanner.finish().completed()
            last: dict[str, Any] = {"model": asked, "created_at": translate.now_iso()}
            last.update(_delta("", "", chat))
            if chat and answer.tool_calls:
                last["message"]["tool_calls"] = answer.ollama_tool_calls()
            last.update(translate.final_fields(usage, answer, began, _load_s(runtime, cold)))
            await send(_line(last))
        await send({"type": "http.response.body", "body": b""})


def _encoded(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode(), v.encode()) for k, v in headers.items()]


def _model(body: dict[str, Any]) -> str:
    name = body.get("model") or body.get("name")
    if not isinstance(name, str) or not name:
        raise Invalid("the request names no model: set 'model'")
    return name


def _model_file(runtime: ModelRuntime) -> Path | None:
    """The model file named by ``-m``/``--model`` in a scheme's command, if any."""
    for scheme in runtime.spec.schemes.values():
        command = scheme.command
        words = command.split() if isinstance(command, str) else list(command or [])
        for flag, value in zip(words, words[1:], strict=False):
            if flag in ("-m", "--model"):
                return Path(value)
    return None


def _load_s(runtime: ModelRuntime, cold: bool) -> float:
    return (runtime.last_start_seconds or 0.0) if cold else 0.0


def _load_ns(runtime: ModelRuntime, cold: bool) -> int:
    return int(_load_s(runtime, cold) * 1e9)


def _delta(text: str, thinking: str, chat: bool) -> dict[str, Any]:
    if not chat:
        out: dict[str, Any] = {"response": text}
        if thinking:
            out["thinking"] = thinking
        return out
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if thinking:
        message["thinking"] = thinking
    return {"message": message}


def _payload(answer: Answer, chat: bool) -> dict[str, Any]:
    out = _delta(answer.text, answer.thinking, chat)
    if chat and answer.tool_calls:
        out["message"]["tool_calls"] = answer.ollama_tool_calls()
    return out
