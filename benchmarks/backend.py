"""A very fast OpenAI-style backend for the benchmarks: a fixed JSON answer or an SSE burst.

    python benchmarks/backend.py json|sse PORT [--nginx PATH --workdir DIR] [--chunks 200]

Every request (any path, any method) gets the same answer: a small chat completion with
usage (``json``), or a stream of ``--chunks`` chat-completion chunks, a usage event and
``[DONE]``, written in one burst (``sse``).

With ``--nginx`` the script writes an nginx configuration into ``--workdir`` and replaces
itself with nginx (``exec``: one process, so the PID that LLM-Manager watches is nginx's).
The JSON answer is a ``return 200``; the SSE body, too long for an nginx configuration
token, is a static file (reached through ``error_page``, which serves it for any method).
Without nginx, aiohttp.web serves the same bytes.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

ANSWER = {
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "created": 0,
    "model": "m",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "hi"},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
}


def json_body() -> bytes:
    return json.dumps(ANSWER, separators=(",", ":")).encode()


def _chunk(delta: dict[str, str], finish: str | None) -> bytes:
    event = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


def sse_body(chunks: int) -> bytes:
    """``chunks`` content events (the last one with finish_reason), usage, ``[DONE]``."""
    events = [_chunk({"content": "tok"}, None) for _ in range(chunks - 1)]
    events.append(_chunk({"content": "tok"}, "stop"))
    usage = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "m",
        "choices": [],
        "usage": {"prompt_tokens": 5, "completion_tokens": chunks, "total_tokens": chunks + 5},
    }
    events.append(b"data: " + json.dumps(usage, separators=(",", ":")).encode() + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return b"".join(events)


# One nginx process (its CPU is one PID's), everything under {dir}; shared with procs.py.
NGINX_PREAMBLE = """
daemon off;
master_process off;
worker_processes 1;
error_log {dir}/error.log;
pid {dir}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 100000000;
    # The bodies group's 1 MiB chat histories: accepted, and kept in memory, not in a file.
    client_max_body_size 64m;
    client_body_buffer_size 2m;"""

NGINX_CONF = (
    NGINX_PREAMBLE
    + """
    open_file_cache max=16;
    server {{
        listen {host}:{port};
        {location}
    }}
}}
"""
)

JSON_LOCATION = "location / {{ default_type application/json; return 200 '{body}'; }}"

# The static module answers POST with 405; error_page turns that into a GET of the file.
SSE_LOCATION = """location / {{ error_page 405 =200 /answer.sse; return 405; }}
        location = /answer.sse {{ internal; root {dir}; default_type text/event-stream; }}"""


def exec_nginx(
    nginx: str, workdir: Path, kind: str, port: int, chunks: int, host: str = "127.0.0.1"
) -> None:
    folder = workdir / f"backend-{kind}-{port}"
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "json":
        location = JSON_LOCATION.format(body=json_body().decode())
    else:
        (folder / "answer.sse").write_bytes(sse_body(chunks))
        location = SSE_LOCATION.format(dir=folder)
    conf = folder / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=folder, host=host, port=port, location=location))
    os.execv(nginx, [nginx, "-p", str(folder), "-c", str(conf)])


def serve_aiohttp(kind: str, port: int, chunks: int, host: str = "127.0.0.1") -> None:
    from aiohttp import web

    body = json_body() if kind == "json" else sse_body(chunks)
    content_type = "application/json" if kind == "json" else "text/event-stream"

    async def answer(request: web.Request) -> web.StreamResponse:
        await request.read()
        if kind == "json":
            return web.Response(body=body, content_type=content_type)
        resp = web.StreamResponse(headers={"Content-Type": content_type})
        await resp.prepare(request)
        await resp.write(body)
        return resp

    app = web.Application(client_max_size=64 << 20)  # the bodies group sends 1 MiB
    app.router.add_route("*", "/{tail:.*}", answer)
    web.run_app(app, host=host, port=port, print=None, access_log=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("kind", choices=("json", "sse"))
    parser.add_argument("port", type=int)
    parser.add_argument("--chunks", type=int, default=200)
    parser.add_argument("--nginx", help="nginx executable: serve with nginx")
    parser.add_argument("--workdir", type=Path, help="where the nginx configuration goes")
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    args = parser.parse_args()
    if args.nginx:
        exec_nginx(args.nginx, args.workdir, args.kind, args.port, args.chunks, args.host)
    else:
        serve_aiohttp(args.kind, args.port, args.chunks, args.host)


if __name__ == "__main__":
    main()
