"""A fake engine whose memory is known: a real child process that holds (and touches) a
given number of MiB, so that its resident set grows by that much, before it serves.

``--hold-mib N`` is held from the start (before /health answers), ``--grow-on-request-mib M``
more at the first chat request (serving then takes more than loading did). With
``--oom-if-listening PORT`` it stands in for a GPU engine that finds its memory taken: if
something accepts a connection on 127.0.0.1:PORT when it starts, it prints llama.cpp's
out-of-memory line to stderr and exits 1 (or, with ``--oom-by sigkill``, is killed by
SIGKILL without a word, as the kernel's out-of-memory killer does); else it serves normally.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
import time

from aiohttp import web

MIB = 1024 * 1024
PAGE = 4096
OOM_LINE = (
    "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 6144.00 MiB on device 0: "
    "cudaMalloc failed: out of memory"
)
_held: list[bytearray] = []  # kept alive for the life of the process


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--name", default="memory-engine")
    p.add_argument("--hold-mib", type=int, default=0)
    p.add_argument("--grow-on-request-mib", type=int, default=0)
    p.add_argument("--oom-if-listening", type=int, default=None)
    p.add_argument("--oom-by", choices=("print", "sigkill"), default="print")
    p.add_argument("--spawn-log", default=None, help="append 'pid' lines here")
    return p.parse_args()


def hold(mib: int) -> None:
    """Allocate ``mib`` MiB and write one byte in every page, so all of it is resident."""
    if mib <= 0:
        return
    buf = bytearray(mib * MIB)
    buf[::PAGE] = b"\x01" * len(range(0, len(buf), PAGE))
    _held.append(buf)


def someone_listens(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def main() -> None:
    args = parse_args()
    if args.spawn_log:
        with open(args.spawn_log, "a") as f:
            f.write(f"{os.getpid()}\n")
    print(f"memory engine {args.name} starting on port {args.port}", flush=True)
    if args.oom_if_listening is not None and someone_listens(args.oom_if_listening):
        if args.oom_by == "sigkill":
            os.kill(os.getpid(), signal.SIGKILL)
        print(OOM_LINE, file=sys.stderr, flush=True)
        sys.exit(1)
    hold(args.hold_mib)
    print(f"holding {args.hold_mib} MiB", flush=True)
    asyncio.run(serve(args))


async def serve(args: argparse.Namespace) -> None:
    grown = False

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def models(_: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": args.name, "object": "model", "owned_by": "fake"}]}
        )

    async def chat(request: web.Request) -> web.Response:
        nonlocal grown
        body = await request.json()
        if not grown:
            grown = True
            hold(args.grow_on_request_mib)
            print(f"grew by {args.grow_on_request_mib} MiB", flush=True)
        return web.json_response(
            {
                "id": "chatcmpl-memory",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", args.name),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "hello"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
            }
        )

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.port).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    main()
