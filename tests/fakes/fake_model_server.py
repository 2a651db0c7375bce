"""A fake OpenAI-compatible model server, run as a real child process by the tests.

Switches provoke the faults a real engine shows: slow start, never healthy, exit at
start, crash after N streamed chunks, ignore SIGTERM, fork a grandchild, flood the log.
Every spawn can be recorded (``--spawn-log``) so tests count processes exactly.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import hashlib
import json
import os
import signal
import sys
import time

from aiohttp import BodyPartReader, web


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--name", default="fake")
    p.add_argument("--slow-start", type=float, default=0.0, help="health 503 for N seconds")
    p.add_argument("--never-healthy", action="store_true")
    p.add_argument("--exit-at-start", type=int, default=None, help="exit with this code")
    p.add_argument("--exit-after", type=float, default=None, help="exit 3 after N seconds")
    p.add_argument("--crash-after-chunks", type=int, default=None)
    p.add_argument("--ignore-sigterm", action="store_true")
    p.add_argument("--fork-grandchild", action="store_true")
    p.add_argument("--spawn-log", default=None, help="append 'pid' lines here")
    p.add_argument("--no-health", action="store_true", help="/health answers 404")
    p.add_argument("--chunks", type=int, default=5, help="streamed chunks per response")
    p.add_argument("--chunk-delay", type=float, default=0.0)
    p.add_argument("--print-lines", type=int, default=0, help="print N log lines at start")
    p.add_argument("--tick", type=float, default=0.0, help="print 'tick N TIME' this often")
    p.add_argument("--print-odd", action="store_true", help="print invalid UTF-8, a long line")
    p.add_argument("--api-key", default=None, help="401 without 'Authorization: Bearer KEY'")
    return p.parse_args()


async def _json(request: web.Request) -> dict:
    """The request's JSON object; anything else is a 400, as real engines answer."""
    try:
        body = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(text='{"error": "invalid JSON"}', content_type="application/json")  # noqa: B904
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text='{"error": "not an object"}', content_type="application/json")
    return body


def main() -> None:
    args = parse_args()
    if args.spawn_log:
        with open(args.spawn_log, "a") as f:
            f.write(f"{os.getpid()}\n")
    print(f"fake model server {args.name} starting on port {args.port}", flush=True)
    print(f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')}", flush=True)
    if args.print_lines:
        sys.stdout.write("".join(f"log line {i}\n" for i in range(args.print_lines)))
        sys.stdout.flush()
    if args.print_odd:
        sys.stdout.buffer.write(b"bad bytes \xff\xfe end\n" + b"L" * 100_000 + b"\nafter long\n")
        sys.stdout.flush()
    if args.exit_at_start is not None:
        print("fatal: exiting at start as asked", file=sys.stderr, flush=True)
        sys.exit(args.exit_at_start)
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.fork_grandchild:
        pid = os.fork()
        if pid == 0:  # the grandchild: sleeps until killed, like an engine's worker
            if args.spawn_log:
                with open(args.spawn_log + ".grandchild", "a") as f:
                    f.write(f"{os.getpid()}\n")
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            while True:
                time.sleep(1)
    asyncio.run(serve(args))


async def serve(args: argparse.Namespace) -> None:
    started = time.monotonic()

    async def health(_: web.Request) -> web.Response:
        if args.no_health:
            return web.json_response({"error": "no such route"}, status=404)
        if args.never_healthy or time.monotonic() - started < args.slow_start:
            return web.json_response({"status": "loading"}, status=503)
        return web.json_response({"status": "ok"})

    async def models(_: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": args.name, "object": "model", "owned_by": "fake"}]}
        )

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await _json(request)
        usage = {
            "prompt_tokens": 7,
            "completion_tokens": args.chunks,
            "total_tokens": 7 + args.chunks,
        }
        if not body.get("stream"):
            return web.json_response(
                {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": body.get("model", args.name),
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "hello " * args.chunks},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": usage,
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for i in range(args.chunks):
                if args.crash_after_chunks is not None and i >= args.crash_after_chunks:
                    os._exit(7)
                chunk = {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion.chunk",
                    "choices": [
                        {"index": 0, "delta": {"content": f"tok{i} "}, "finish_reason": None}
                    ],
                }
                await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
                if args.chunk_delay:
                    await asyncio.sleep(args.chunk_delay)
        except (ConnectionError, asyncio.CancelledError):
            print("stream cancelled by client", flush=True)
            raise
        final = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "choices": [],
            "usage": usage,
        }
        await resp.write(f"data: {json.dumps(final)}\n\ndata: [DONE]\n\n".encode())
        await resp.write_eof()
        return resp

    async def embeddings(request: web.Request) -> web.Response:
        body = await _json(request)
        inputs = body.get("input", [])
        inputs = [inputs] if isinstance(inputs, str) else inputs
        data = [
            {"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]}
            for i in range(len(inputs))
        ]
        usage = {"prompt_tokens": len(inputs), "total_tokens": len(inputs)}
        return web.json_response({"object": "list", "data": data, "usage": usage})

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        if args.chunk_delay:
            try:
                await asyncio.sleep(args.chunk_delay)
            except asyncio.CancelledError:
                print("echo cancelled by client", flush=True)
                raise
        return web.json_response(
            {
                "method": request.method,
                "path": request.path,
                "query": request.query_string,
                "headers": dict(request.headers),
                "body": body.decode("utf-8", "replace"),
            },
            headers={"X-Fake": "yes"},
        )

    async def completions(request: web.Request) -> web.Response:
        await _json(request)
        return web.json_response(
            {
                "object": "text_completion",
                "choices": [{"index": 0, "text": "once upon", "finish_reason": "length"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
                "timings": {"cache_n": 1, "prompt_n": 2, "predicted_n": 2},
            }
        )

    async def rerank(request: web.Request) -> web.Response:
        body = await _json(request)
        docs = body.get("documents", [])
        results = [{"index": i, "relevance_score": 1.0 / (i + 1)} for i in range(len(docs))]
        return web.json_response(
            {
                "object": "rerank",
                "results": results,
                "usage": {"prompt_tokens": 9, "total_tokens": 9},
            }
        )

    async def messages(request: web.Request) -> web.StreamResponse:
        body = await _json(request)
        if not body.get("stream"):
            return web.json_response(
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "text", "text": "hi"}],
                    "usage": {"input_tokens": 11, "output_tokens": 4},
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        events = [
            (
                "message_start",
                {
                    "type": "message_start",
                    "message": {"usage": {"input_tokens": 11, "output_tokens": 1}},
                },
            ),
            (
                "content_block_delta",
                {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "hi"}},
            ),
            ("message_delta", {"type": "message_delta", "usage": {"output_tokens": 4}}),
            ("message_stop", {"type": "message_stop"}),
        ]
        for name, data in events:
            await resp.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
        await resp.write_eof()
        return resp

    async def form(request: web.Request) -> web.Response:
        """Audio transcriptions and image edits: a multipart form, read as a stream. The
        answer says what arrived: the form's fields, and each file's size and SHA-256."""
        fields: dict[str, str] = {}
        files: dict[str, dict[str, object]] = {}
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            assert isinstance(part, BodyPartReader)
            if part.filename is None:
                fields[part.name or ""] = (await part.read()).decode()
                continue
            digest = hashlib.sha256()
            size = 0
            while chunk := await part.read_chunk(1 << 20):
                digest.update(chunk)
                size += len(chunk)
            files[part.name or ""] = {"bytes": size, "sha256": digest.hexdigest()}
        seen = {"served_by": args.name, "path": request.path, "fields": fields, "files": files}
        if request.path.endswith("/transcriptions"):
            return web.json_response(
                {
                    "text": f"transcribed by {fields.get('model')}",
                    "seen": seen,
                    "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
                }
            )
        return web.json_response(
            {
                "created": int(time.time()),
                "data": [{"b64_json": "aGVsbG8=", "revised_prompt": fields.get("prompt")}],
                "seen": seen,
            }
        )

    async def props(request: web.Request) -> web.Response:
        return web.json_response(
            {"served_by": args.name, "query": request.rel_url.raw_query_string}
        )

    async def gzipped(request: web.Request) -> web.Response:
        """As llama.cpp serves its web UI: gzipped, and 415 to clients that do not accept
        gzip."""
        if "gzip" not in request.headers.get("Accept-Encoding", ""):
            return web.Response(status=415, text="gzip is not supported by this browser")
        page = f"<html><body>page of {args.name}</body></html>".encode()
        return web.Response(
            body=gzip.compress(page),
            headers={"Content-Encoding": "gzip", "Content-Type": "text/html"},
        )

    @web.middleware
    async def key_check(request: web.Request, handler):  # type: ignore[no-untyped-def]
        # As llama-server's --api-key: every path but /health needs the key.
        wanted = f"Bearer {args.api_key}"
        if (
            args.api_key
            and request.path != "/health"
            and request.headers.get("Authorization") != wanted
        ):
            return web.json_response({"error": "invalid api key"}, status=401)
        return await handler(request)

    app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[key_check])
    for path in ("/v1/audio/transcriptions", "/v1/audio/translations", "/v1/images/edits"):
        app.router.add_post(path, form)
    app.router.add_get("/props", props)
    app.router.add_get("/gz", gzipped)
    app.router.add_route("*", "/v1/echo", echo)
    app.router.add_post("/v1/completions", completions)
    for path in ("/v1/rerank", "/rerank", "/v1/reranking"):
        app.router.add_post(path, rerank)
    app.router.add_post("/v1/messages", messages)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/embeddings", embeddings)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port).start()
    print(f"fake model server {args.name} listening", flush=True)
    if args.slow_start and not args.never_healthy:
        # Say when /health turns 200, as engines print "listening"/"model loaded" lines.
        wait = max(0.0, args.slow_start - (time.monotonic() - started))
        asyncio.get_running_loop().call_later(
            wait, lambda: print(f"healthy at {time.time():.6f}", flush=True)
        )
    if args.tick:

        async def tick() -> None:
            n = 0
            while True:
                n += 1
                print(f"tick {n} {time.time()}", flush=True)
                await asyncio.sleep(args.tick)

        ticker = asyncio.create_task(tick())  # noqa: F841 - runs until the process ends
    if args.exit_after is not None:
        await asyncio.sleep(args.exit_after)
        print("crashing as asked", file=sys.stderr, flush=True)
        os._exit(3)
    await asyncio.Event().wait()


if __name__ == "__main__":
    main()
