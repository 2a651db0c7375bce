"""CPU per relayed request of two LLM-Manager checkouts side by side (A/B), and of the Go
reverse proxy, in alternated runs on the same backend: how a change to the relay is
measured before it lands (docs/performance.md, "A leaner relay").

    .venv/bin/python benchmarks/ab.py --a OLD/src --b src [--rounds 5] [--seconds 4]
        [--clients 8] [--body small|64k|1m|stream|llama] [--go none] [--alias]

Each side is a whole ``llm-manager serve`` with one model. ``small``, ``64k`` and ``1m``
send non-streamed chat requests (the run.py bodies) to nginx answering a fixed chat
completion; ``stream`` sends 64-token streamed chat requests, ``llama`` non-streamed 16-token
ones, to a real llama.cpp server
(the tiny random GGUF of tests/models/gguf_factory.py; needs the llama extra), one per
side. wrk (one thread) runs A, then B, then Go, for ``--rounds`` rounds; CPU is utime +
stime of each manager's own process (not its model server) and of the Go proxy's, read
from /proc before and after each run. Printed: each run, then the mean and the range per
side. Identical checkouts differ by up to about 6% on the 2-core VM: compare means over
several rounds. Needs nginx and wrk; go for the Go column.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import aiohttp  # noqa: E402
import load as loadgen  # noqa: E402
import procs  # noqa: E402
from run import LLAMA_FLAGS  # noqa: E402 - the engine as the full benchmark runs it

BODIES = {"small": 0, "64k": 64 << 10, "1m": 1 << 20}
ALIAS = "m-alias"


def model_command(kind: str, workdir: Path, nginx: str, gguf: Path | None) -> list[str]:
    if gguf is not None:
        argv = ["llm-manager", "llama-server", "-m", str(gguf), "--port", "{port}"]
        return argv + LLAMA_FLAGS
    backend = [sys.executable, str(HERE / "backend.py"), kind, "{port}"]
    return backend + ["--nginx", nginx, "--workdir", str(workdir)]


def request(base: str, body: str, model: str = "m") -> loadgen.Request:
    if body == "stream":
        return loadgen.chat_request(base, model, {}, stream=True, max_tokens=64)
    if body == "llama":
        return loadgen.chat_request(base, model, {}, max_tokens=16)
    if BODIES[body]:
        return loadgen.history_request(base, model, {}, BODIES[body])
    return loadgen.chat_request(base, model, {})


async def start_side(
    processes: procs.Processes, name: str, src: Path, workdir: Path, command: list[str]
) -> tuple[int, str, int]:
    """A manager serving ``src`` with the model ``m`` (alias ``ALIAS``) started: (pid, url,
    model port)."""
    folder = workdir / name
    folder.mkdir()
    port = procs.free_port()
    config = {
        "server": {"data_dir": str(folder / "data"), "idle_timeout": 0},
        "models": {
            "m": {"port": port, "aliases": [ALIAS], "schemes": {"cpu": {"command": command}}}
        },
    }
    path = folder / "llm-manager.yaml"
    path.write_text(json.dumps(config))
    proc, url = await procs.start_manager(processes, path, procs.manager_env(src), name=name)
    async with aiohttp.ClientSession() as http, http.post(url + "/api/models/m/start") as resp:
        if resp.status != 200:
            raise RuntimeError(f"{name}: model m did not start: {await resp.text()}")
    return proc.pid, url, port


async def run(args: argparse.Namespace) -> dict[str, list[float]]:
    nginx = procs.find_nginx(None)
    wrk = procs.find_wrk(None)
    if nginx is None or wrk is None:
        raise SystemExit("ab.py needs nginx and wrk on PATH")
    workdir = Path(tempfile.mkdtemp(prefix="llm-manager-ab-"))
    processes = procs.Processes(workdir)
    gguf = None
    if args.body in ("stream", "llama"):
        from tests.models.gguf_factory import write_chat_model

        gguf = write_chat_model(workdir / "tiny-chat.gguf", context_length=4096)
    command = model_command("json", workdir, nginx, gguf)
    try:
        sides: dict[str, tuple[int, str]] = {}
        engine_port = 0
        for name, src in (("A", args.a), ("B", args.b)):
            pid, url, engine_port = await start_side(processes, name, src, workdir, command)
            sides[name] = (pid, url)
        go = procs.find_go(args.go)
        if go is not None:
            exe = await asyncio.to_thread(procs.build_goproxy, go)
            listen = procs.free_port()
            proxy = procs.start_goproxy(processes, exe, {listen: engine_port})  # B's engine
            url = f"http://127.0.0.1:{listen}"
            await procs.wait_http(url + "/health", proxy, processes.log_path("go-proxy"), 30)
            sides["Go"] = (proxy.pid, url)
        scripts = {
            name: loadgen.wrk_script(workdir, request(url, args.body, ALIAS if args.alias else "m"))
            for name, (_, url) in sides.items()
        }
        per_request: dict[str, list[float]] = {name: [] for name in sides}
        for round_ in range(args.rounds):
            for name, (pid, url) in sides.items():
                target = url + "/v1/chat/completions"
                await loadgen.wrk(wrk, scripts[name], target, args.clients, 1)  # warm up
                before = procs.cpu_seconds(pid)
                result = await loadgen.wrk(wrk, scripts[name], target, args.clients, args.seconds)
                used = procs.cpu_seconds(pid) - before
                bad = sum(n for code, n in result.statuses.items() if code != "200")
                bad += result.errors
                ms = used * 1000 / max(result.requests, 1)
                per_request[name].append(ms)
                print(
                    f"round {round_ + 1} {name:>2}: {ms:.4f} ms CPU/request, "
                    f"{result.requests} requests, {bad} not 200",
                    flush=True,
                )
        return per_request
    finally:
        processes.stop_all()
        procs.remove_tree(workdir)


def summary(per_request: dict[str, list[float]]) -> list[str]:
    lines = []
    for name, values in per_request.items():
        mean = statistics.fmean(values)
        lines.append(
            f"{name:>2}: mean {mean:.4f} ms CPU/request ({min(values):.4f}-{max(values):.4f})"
        )
    if "A" in per_request and "B" in per_request:
        ratio = statistics.fmean(per_request["B"]) / statistics.fmean(per_request["A"])
        lines.append(f"B / A: {ratio:.3f}")
    if "Go" in per_request:
        go = statistics.fmean(per_request["Go"])
        lines += [f"{n} / Go: {statistics.fmean(per_request[n]) / go:.2f}" for n in ("A", "B")]
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--a", type=Path, required=True, help="side A's src/ folder")
    p.add_argument("--b", type=Path, required=True, help="side B's src/ folder")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--body", choices=[*BODIES, "stream", "llama"], default="small")
    p.add_argument("--go", help="the go executable, or 'none' (default: found on PATH)")
    p.add_argument(
        "--alias",
        action="store_true",
        help=f"name the model by its alias {ALIAS!r} (the manager renames it in the body)",
    )
    args = p.parse_args(argv)
    per_request = procs.run_interruptible(run(args))
    for line in summary(per_request):
        print(line)
    return per_request


if __name__ == "__main__":
    main()
