"""Gateway cost per relayed request: LLM-Manager in front of a very fast backend vs direct.

Starts a minimal OpenAI-style backend (aiohttp.web) and LLM-Manager on loopback, runs the
same fixed load against each in alternation (A B A B ...) to cancel machine drift, and
reports medians: requests/s, p50/p99 latency, and the gateway's CPU time per request read
from /proc/<pid>/stat before and after each run (robust on a shared machine).

    .venv/bin/python benchmarks/relay_cpu.py [--requests 3000] [--concurrency 8] [--rounds 3]
    .venv/bin/python benchmarks/relay_cpu.py --stream-chunks 200   # SSE: CPU per chunk
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

CLK_TCK = os.sysconf("SC_CLK_TCK")

BACKEND = r"""
import json, sys
from aiohttp import web

chunks = int(sys.argv[2])
body = json.dumps({
    "id": "x", "object": "chat.completion", "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
}).encode()
event = b'data: {"choices":[{"index":0,"delta":{"content":"tok"}}]}\n\n'
final = (b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":%d}}\n\n'
         b'data: [DONE]\n\n' % chunks)

async def chat(request):
    await request.read()
    if not chunks:
        return web.Response(body=body, content_type="application/json")
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(event * chunks + final)
    return resp

async def health(request):
    return web.json_response({"status": "ok"})

app = web.Application()
app.router.add_post("/v1/chat/completions", chat)
app.router.add_get("/health", health)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


# The floor for a Python relay: raw ASGI on uvicorn (uvloop, httptools) + an aiohttp client,
# no routing, no checks, no records.
MINIMAL_RELAY = r"""
import sys, aiohttp, uvicorn
backend, port = sys.argv[1], int(sys.argv[2])
state = {}

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                state["http"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    headers = {"Content-Type": "application/json"}
    async with state["http"].post(backend + scope["path"], data=body, headers=headers) as r:
        out = [(k.lower(), v) for k, v in r.raw_headers if k.lower() != b"transfer-encoding"]
        await send({"type": "http.response.start", "status": r.status, "headers": out})
        async for chunk in r.content.iter_any():
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools",
            log_level="warning", access_log=False)
"""


NGINX_CONF = """
daemon off;
master_process off;
worker_processes 1;
error_log {tmp}/nginx-error.log;
pid {tmp}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream backend {{ server 127.0.0.1:{backend}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""


def start_nginx(folder: Path, backend_port: int) -> tuple[subprocess.Popen[bytes], int] | None:
    """nginx as a plain proxy, one process (the C floor), when nginx is installed."""
    exe = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if exe is None:
        return None
    port = free_port()
    conf = folder / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=folder, backend=backend_port, port=port))
    proc = subprocess.Popen([exe, "-p", str(folder), "-c", str(conf)])
    return proc, port


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def load(url: str, requests: int, concurrency: int, stream: bool) -> dict[str, float]:
    payload = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                          "stream": stream}).encode()  # fmt: skip
    latencies: list[float] = []
    ttfbs: list[float] = []
    remaining = requests
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                began = time.perf_counter()
                async with http.post(
                    url, data=payload, headers={"Content-Type": "application/json"}
                ) as resp:
                    first = True
                    async for _ in resp.content.iter_any():
                        if first:
                            ttfbs.append(time.perf_counter() - began)
                            first = False
                    assert resp.status == 200, resp.status
                latencies.append(time.perf_counter() - began)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - began
    latencies.sort()
    return {
        "rps": requests / wall,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
        "ttfb_ms": statistics.median(ttfbs) * 1000,
    }


def start_manager(config: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llm_manager", "serve", "--config", str(config),
             "--port", "0", "--log-level", "info"],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = re.search(r"listening on (http://[\d.]+:\d+)", log.read_text())
        if found:
            return proc, found.group(1)
        time.sleep(0.05)
    proc.kill()
    raise SystemExit("LLM-Manager did not start:\n" + log.read_text())


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stream-chunks", type=int, default=0)
    args = parser.parse_args()
    stream = args.stream_chunks > 0
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        backend_py = folder / "backend.py"
        backend_py.write_text(BACKEND)
        command = [sys.executable, str(backend_py), "{port}", str(args.stream_chunks)]
        config = folder / "config.yaml"
        config.write_text(json.dumps({
            "server": {"data_dir": str(folder / "data"), "idle_timeout": 0},
            "models": {"m": {"schemes": {"CPU": {"command": command}}}},
        }))  # fmt: skip
        manager, url = start_manager(config, folder / "manager.log")
        try:
            async with aiohttp.ClientSession() as http:
                async with http.post(url + "/api/models/m/start") as resp:
                    assert resp.status == 200, await resp.text()
                async with http.get(url + "/api/models/m/info") as resp:
                    info = await resp.json()
            backend = f"http://127.0.0.1:{info['model']['port']}"
            relay_py = folder / "minimal_relay.py"
            relay_py.write_text(MINIMAL_RELAY)
            relay_port = free_port()
            relay = subprocess.Popen([sys.executable, str(relay_py), backend, str(relay_port)])
            targets: dict[str, tuple[str, subprocess.Popen[bytes] | None]] = {
                "direct": (backend + "/v1/chat/completions", None),
            }
            nginx = start_nginx(folder, int(info["model"]["port"]))
            if nginx is not None:
                targets["nginx"] = (f"http://127.0.0.1:{nginx[1]}/v1/chat/completions", nginx[0])
            targets["minimal-relay"] = (
                f"http://127.0.0.1:{relay_port}/v1/chat/completions",
                relay,
            )
            targets["llm-manager"] = (url + "/v1/chat/completions", manager)
            backend_pid = info["model"]["pid"]
            await asyncio.sleep(1.5)  # the minimal relay starting
            for target, _ in targets.values():  # warm-up
                await load(target, 200, args.concurrency, stream)
            results: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
            for _ in range(args.rounds):
                for name, (target, proc) in targets.items():
                    gw_pid = proc.pid if proc is not None else backend_pid
                    cpu0 = cpu_seconds(gw_pid), cpu_seconds(backend_pid)
                    r = await load(target, args.requests, args.concurrency, stream)
                    cpu1 = cpu_seconds(gw_pid), cpu_seconds(backend_pid)
                    r["gw_cpu_ms"] = (cpu1[0] - cpu0[0]) * 1000 / args.requests
                    r["backend_cpu_ms"] = (cpu1[1] - cpu0[1]) * 1000 / args.requests
                    results[name].append(r)
            kind = f"SSE, {args.stream_chunks} chunks" if stream else "non-streamed JSON"
            print(f"{args.requests} requests x {args.rounds} rounds, {args.concurrency} clients, "
                  f"{kind}; medians")  # fmt: skip
            head = f"{'target':<12}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'ttfb ms':>9}"
            print(head + f"{'gateway CPU ms/req':>20}{'backend CPU ms/req':>20}")
            for name, runs in results.items():
                med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                gw = f"{med['gw_cpu_ms']:.3f}" if name != "direct" else "-"
                print(
                    f"{name:<12}{med['rps']:>9.0f}{med['p50_ms']:>9.2f}{med['p99_ms']:>9.2f}"
                    f"{med['ttfb_ms']:>9.2f}{gw:>20}{med['backend_cpu_ms']:>20.3f}"
                )
            if stream:
                for name in [n for n in results if n != "direct"]:
                    per_chunk = statistics.median(r["gw_cpu_ms"] for r in results[name])
                    micros = per_chunk / args.stream_chunks * 1e3
                    print(f"{name} CPU per relayed chunk: {micros:.1f} µs")
            print(f"llm-manager peak RSS: {rss_mib(manager.pid):.0f} MiB")
            relay.terminate()
            relay.wait(30)
            if nginx is not None:
                nginx[0].terminate()
                nginx[0].wait(30)
        finally:
            manager.terminate()
            manager.wait(30)


if __name__ == "__main__":
    asyncio.run(main())
