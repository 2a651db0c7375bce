"""Gateway replicas behind nginx (docs/replicas.md): requests per second and CPU per request
with one, two and three replicas on this machine.

    .venv/bin/python benchmarks/replicas.py [--replicas 1,2,3] [--seconds 10] [--clients 16]

Everything is real and local: a Ray head (ray.cluster_utils.Cluster), a throwaway
PostgreSQL (tests/postgres_server.py) as the shared store, N `llm-manager serve` processes
with ``cluster.replicas``, nginx in front of them (tests/balancer.py, the configuration of
docs/replicas.md), and as the engine nginx answering a fixed chat completion
(benchmarks/backend.py). wrk (one thread) sends small non-streamed chat requests through
the balancer. CPU is read from /proc before and after each run: the replicas' processes,
the balancer, the controller (the Ray worker named ray::Controller) and the engine; Ray's
own daemons (raylet, GCS) are not counted. Needs nginx, wrk, Ray and PostgreSQL's server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import aiohttp  # noqa: E402
import load as loadgen  # noqa: E402
import procs  # noqa: E402
import psutil  # noqa: E402
from tests.balancer import Balancer  # noqa: E402
from tests.postgres_server import PostgresServer, binaries  # noqa: E402


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def controller_pid() -> int | None:
    for p in psutil.process_iter(["cmdline"]):
        cmdline = p.info["cmdline"] or []
        if cmdline and cmdline[0].startswith("ray::Controller"):
            return int(p.pid)
    return None


def cpu_of(pids: dict[str, list[int]]) -> dict[str, float]:
    out = {}
    for role, group in pids.items():
        total = 0.0
        for pid in group:
            with contextlib.suppress(OSError, psutil.Error):  # ended meanwhile
                total += procs.cpu_seconds(pid, tree=role == "replicas")
        out[role] = total
    return out


async def run_one(
    n: int, args: argparse.Namespace, workdir: Path, cluster: Any, pg: PostgresServer
) -> dict[str, Any]:
    processes = procs.Processes(workdir)
    nginx = procs.find_nginx(None)
    assert nginx is not None
    engine = [sys.executable, str(HERE / "backend.py"), "json", "{port}", "--host", "{host}"]
    engine += ["--nginx", nginx, "--workdir", str(workdir / f"engine-{n}")]
    config = {
        "server": {"data_dir": str(workdir / f"data-{n}"), "idle_timeout": 0},
        "models": {"fast": {"schemes": {"cpu": {"command": engine}}}},
        "cluster": {
            "address": cluster.address,
            "namespace": f"bench{n}-{time.monotonic_ns()}",
            "replicas": True,
        },
        "store": pg.new_database(),
    }
    path = workdir / f"replicas-{n}.yaml"
    path.write_text(json.dumps(config))
    started = [
        await procs.start_manager(processes, path, name=f"replica-{n}-{i}", timeout=120)
        for i in range(n)
    ]
    front = Balancer(
        nginx, workdir / f"balancer-{n}", [u.removeprefix("http://") for _, u in started]
    )
    try:
        async with aiohttp.ClientSession() as http:
            url = started[0][1]
            async with http.post(f"{url}/api/models/fast/start") as resp:
                assert resp.status == 200, await resp.text()
            async with http.get(f"{url}/api/models/fast/info") as resp:
                engine_pid = (await resp.json())["model"]["pid"]
        req = loadgen.chat_request(front.url, "fast", {})
        script = loadgen.wrk_script(workdir, req)
        wrk = procs.find_wrk(None)
        assert wrk is not None
        await loadgen.wrk(wrk, script, req.url, args.clients, 2.0)  # warm-up
        pids = {
            "replicas": [p.pid for p, _ in started],
            "balancer": [front.proc.pid],
            "controller": [pid for pid in [controller_pid()] if pid is not None],
            "engine": [engine_pid],
        }
        quiet = cpu_of(pids)
        await asyncio.sleep(args.idle)  # no requests: what the replicas' reports cost
        before = cpu_of(pids)
        idle = {k: (before[k] - quiet[k]) / args.idle * 1000 for k in before}
        result = await loadgen.wrk(wrk, script, req.url, args.clients, args.seconds)
        after = cpu_of(pids)
        served = result.requests
        per_request = {k: (after[k] - before[k]) / served * 1000 for k in after}
        return {
            "replicas": n,
            "rps": round(result.rps),
            "p50_ms": result.p50_ms,
            "p99_ms": result.p99_ms,
            "statuses": result.statuses,
            "errors": result.errors,
            "cpu_ms_per_request": {k: round(v, 4) for k, v in per_request.items()},
            "idle_cpu_ms_per_second": {k: round(v, 2) for k, v in idle.items()},
            "found_controller": bool(pids["controller"]),
        }
    finally:
        front.stop()
        processes.stop_all()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--replicas", default="1,2,3")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--idle", type=float, default=5.0, help="seconds measured unloaded")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    bindir = binaries()
    if bindir is None or procs.find_nginx(None) is None or procs.find_wrk(None) is None:
        raise SystemExit("needs PostgreSQL's server binaries, nginx and wrk")
    workdir = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    raytmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    os.environ["RAY_TMPDIR"] = raytmp
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    pg = PostgresServer(bindir)
    pg.start()
    results = []
    try:
        for n in (int(x) for x in args.replicas.split(",")):
            log(f"{n} replica(s): {args.seconds:g} s of wrk -c{args.clients} through nginx")
            results.append(await run_one(n, args, workdir, cluster, pg))
            log(json.dumps(results[-1]))
    finally:
        pg.stop()
        cluster.shutdown()
        shutil.rmtree(raytmp, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"{'replicas':>8} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7}  CPU ms/request")
    for r in results:
        cpu = r["cpu_ms_per_request"]
        parts = ", ".join(f"{k} {v:.3f}" for k, v in cpu.items())
        print(f"{r['replicas']:>8} {r['rps']:>7} {r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f}  {parts}")
    print("unloaded, CPU ms per second:")
    for r in results:
        idle = ", ".join(f"{k} {v:.2f}" for k, v in r["idle_cpu_ms_per_second"].items())
        print(f"{r['replicas']:>8}  {idle}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    asyncio.run(main())
