"""Models taking turns on one full device: agents send requests to models that do not fit
together, through LLM-Manager; the figures against the ideal schedule, and with ``--old PATH``
against another checkout's code (for instance the behaviour before turns, 63cb302).

    .venv/bin/python benchmarks/turns.py                  # the three default scenarios
    .venv/bin/python benchmarks/turns.py --quick          # a seconds-long smoke run
    .venv/bin/python benchmarks/turns.py --old /tmp/old   # also with /tmp/old/src serving
    .venv/bin/python benchmarks/turns.py --scenarios alt-4x3 --requests 8 --json out.json

A scenario is PATTERN-AxM: A agents, M models; each agent sends R requests (--requests), one
after the other. ``alt``: agent i starts at model i % M and moves to the next model at each
request; ``stick``: agent i sends all its requests to model i % M. One device is declared
(8,000 MiB) and every model needs 6,000 MiB of it, so one model is loaded at a time. A model
is the fake model server (tests/fakes/fake_model_server.py) with a load time (--slow-start:
its /health answers 503 that long) and a service time (a streamed chat answer of 4 chunks,
--chunk-delay = service / 4). Each scenario gets a fresh manager, started with
``python -m llm_manager serve``; with ``--old PATH`` a second one runs it with
``PYTHONPATH=PATH/src`` (checked: ``llm_manager`` must import from there) and a config
without the keys the old code does not know (server.queue_timeout, turn_time, turn_linger).

Figures per scenario: answers by status and client errors; model starts (the increase of
start_count over all models in /api/models/all-models/info; the processes spawned, from the
fake servers' spawn log, beside it); wall time from the first request sent to the last
answer; the ideal time; each request's wait, taken by the client as the time to the first
byte of its streamed answer (the fake server writes its first chunk at once, so this is the
wait for the model's turn and start plus the relay; stream_keepalive is left off), p50, p95
and max of the answers with 200; and the server's mean wait from the
llm_manager_queue_wait_seconds histogram (sum / count) where the code has it.

Ideal time: the best schedule that holds one model at a time, takes the models in cyclic
order and in each model's phase serves every agent waiting for it at once (alt: one request
each; stick: all R of them).
With D = min(A, M) (the models agents start at), L the load time, S the service time:
  alt:    P = R + D - 1 phases, ideal = P * (L + S), P loads;
  stick:  P = D phases,         ideal = D * (L + R * S), D loads.
It leaves out what a swap costs beyond the load: turn_linger, stopping the process, the
health poll.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

import load as loadgen  # noqa: E402
import procs  # noqa: E402

FAKE = procs.ROOT / "tests" / "fakes" / "fake_model_server.py"
DEVICE = "bench gpu"
DEVICE_MIB = 8000
MODEL_MIB = 6000
CHUNKS = 4
DEFAULT_SCENARIOS = "alt-2x2,stick-2x2,alt-4x3"
_SCENARIO = re.compile(r"(alt|stick)-(\d+)x(\d+)")
_WAIT_METRIC = re.compile(
    r'^llm_manager_queue_wait_seconds_(sum|count)\{model="([^"]+)"\} (\S+)$', re.M
)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Scenario:
    pattern: str  # alt | stick
    agents: int
    models: int

    @property
    def name(self) -> str:
        return f"{self.pattern}-{self.agents}x{self.models}"

    def model_of(self, agent: int, n: int) -> str:
        step = n if self.pattern == "alt" else 0
        return f"m{(agent + step) % self.models}"

    def ideal(self, s: Settings) -> tuple[int, float]:
        """(loads, seconds) of the ideal schedule (see the module's docstring)."""
        starting = min(self.agents, self.models)
        if self.pattern == "alt":
            phases = s.requests + starting - 1
            return phases, phases * (s.load + s.service)
        return starting, starting * (s.load + s.requests * s.service)


def parse_scenario(text: str) -> Scenario:
    found = _SCENARIO.fullmatch(text.strip())
    if found is None or int(found.group(2)) < 1 or int(found.group(3)) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: write alt-AxM or stick-AxM, e.g. alt-2x2")
    return Scenario(found.group(1), int(found.group(2)), int(found.group(3)))


@dataclass(frozen=True)
class Settings:
    requests: int  # per agent
    load: float  # the model's load time, s
    service: float  # one request's service time, s
    turn_time: float
    turn_linger: float | None  # None: the server's default
    queue_timeout: float
    limit: float  # the longest one scenario's requests may take, s

    @property
    def client_timeout(self) -> float:
        return self.queue_timeout + self.load + self.service + 30


def settings(args: argparse.Namespace) -> Settings:
    quick = args.quick
    return Settings(
        requests=args.requests or (4 if quick else 8),
        load=args.load_time if args.load_time is not None else (0.3 if quick else 1.0),
        service=args.service_time if args.service_time is not None else (0.1 if quick else 0.2),
        turn_time=args.turn_time if args.turn_time is not None else (2.0 if quick else 5.0),
        turn_linger=args.turn_linger,
        queue_timeout=args.queue_timeout or (20.0 if quick else 120.0),
        limit=args.limit or (40.0 if quick else 600.0),
    )


# --------------------------------------------------------------------------- the manager


def manager_config(sc: Scenario, s: Settings, folder: Path, old: bool) -> dict[str, Any]:
    command = [sys.executable, str(FAKE), "--port", "{port}", "--name", "{name}"]
    command += ["--slow-start", f"{s.load:g}", "--chunks", str(CHUNKS)]
    command += ["--chunk-delay", f"{s.service / CHUNKS:g}"]
    command += ["--spawn-log", str(folder / "spawns.log")]
    scheme = {"devices": {DEVICE: MODEL_MIB}, "command": command}
    models = {f"m{k}": {"schemes": {"gpu": scheme}} for k in range(sc.models)}
    server: dict[str, Any] = {"data_dir": str(folder / "data"), "idle_timeout": 0}
    if not old:  # keys the code before turns rejects
        server.update(queue_timeout=s.queue_timeout, turn_time=s.turn_time)
        if s.turn_linger is not None:
            server["turn_linger"] = s.turn_linger
    device = {"name": DEVICE, "kind": "cuda", "memory_total_mib": DEVICE_MIB}
    return {"server": server, "devices": [device], "models": models}


def code_env(old: Path | None) -> dict[str, str]:
    return {"PYTHONPATH": str(old / "src")} if old else {}


def imported_from(old: Path | None) -> str:
    """Where ``python -m llm_manager`` takes its code from with this environment; for
    ``--old`` it must be the other checkout."""
    argv = [sys.executable, "-c", "import llm_manager; print(llm_manager.__file__)"]
    env = {**os.environ, **code_env(old)}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=True)
    path = done.stdout.strip()
    if old and not Path(path).resolve().is_relative_to((old / "src").resolve()):
        raise RuntimeError(f"PYTHONPATH={old / 'src'} still imports llm_manager from {path}")
    return path


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with http.get(url, timeout=aiohttp.ClientTimeout(total=30)) as resp:
        return resp.status, await resp.text()


async def start_counts(http: aiohttp.ClientSession, base: str) -> dict[str, int]:
    status, text = await get(http, base + "/api/models/all-models/info")
    if status != 200:
        raise RuntimeError(f"all-models/info answered {status}: {text[:500]}")
    return {name: m["start_count"] for name, m in json.loads(text)["models"].items()}


async def server_waits(http: aiohttp.ClientSession, base: str) -> dict[str, float] | None:
    """(sum, count) of llm_manager_queue_wait_seconds over the models; None without it."""
    status, text = await get(http, base + "/metrics")
    found = _WAIT_METRIC.findall(text) if status == 200 else []
    if not found:
        return None
    totals = {"sum": 0.0, "count": 0.0}
    for kind, _model, value in found:
        totals[kind] += float(value)
    return totals


# --------------------------------------------------------------------------- the agents


async def agent(
    http: aiohttp.ClientSession,
    base: str,
    sc: Scenario,
    index: int,
    requests: int,
    began: float,
    rows: list[dict[str, Any]],
) -> None:
    """``requests`` streamed chat requests, one after the other, each read to its end."""
    for n in range(requests):
        model = sc.model_of(index, n)
        req = loadgen.chat_request(base, model, {}, stream=True)
        row: dict[str, Any] = {"agent": index, "n": n, "model": model}
        row["sent_s"] = time.perf_counter() - began
        try:
            # the load generator's one request: (status, latency, first body byte, events)
            status, latency, first, _ = await loadgen._one(http, req)
            row.update(status=status, latency_s=latency, wait_s=first)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            row["error"] = type(exc).__name__
        row["done_s"] = time.perf_counter() - began
        rows.append(row)


def quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def summary(
    sc: Scenario, s: Settings, rows: list[dict[str, Any]], starts: int, spawns: int
) -> dict[str, Any]:
    sent = sc.agents * s.requests
    statuses: dict[str, int] = {}
    errors: dict[str, int] = {}
    for r in rows:
        if "status" in r:
            statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
        else:
            errors[r["error"]] = errors.get(r["error"], 0) + 1
    if len(rows) < sent:
        errors["not answered in the time limit"] = sent - len(rows)
    served = statuses.get("200", 0)
    waits = [r["wait_s"] for r in rows if r.get("status") == 200]
    loads, ideal = sc.ideal(s)
    wall = max((r["done_s"] for r in rows), default=0.0) - min(
        (r["sent_s"] for r in rows), default=0.0
    )
    return {
        "requests": sent,
        "served": served,
        "statuses": statuses,
        "errors": errors,
        "failed": sent - served,
        "failed_share": (sent - served) / sent,
        "starts": starts,
        "spawns": spawns,
        "min_loads": loads,
        "wall_s": wall,
        "ideal_s": ideal,
        "wait_p50_s": quantile(waits, 0.5),
        "wait_p95_s": quantile(waits, 0.95),
        "wait_max_s": max(waits, default=None),
        "latency_p50_s": quantile([r["latency_s"] for r in rows if r.get("status") == 200], 0.5),
    }


async def run_scenario(
    sc: Scenario, s: Settings, folder: Path, processes: procs.Processes, old: Path | None
) -> dict[str, Any]:
    """One fresh manager, every agent at once, the figures; the manager is stopped after."""
    config = folder / "llm-manager.yaml"
    config.write_text(json.dumps(manager_config(sc, s, folder, old is not None), indent=1))
    manager, base = await procs.start_manager(processes, config, code_env(old))
    rows: list[dict[str, Any]] = []
    timed_out = False
    try:
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=s.client_timeout)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
            before = await start_counts(http, base)
            began = time.perf_counter()
            agents = (agent(http, base, sc, i, s.requests, began, rows) for i in range(sc.agents))
            try:
                async with asyncio.timeout(s.limit):
                    await asyncio.gather(*agents)
            except TimeoutError:
                timed_out = True
                log(f"  {sc.name}: requests not done after {s.limit:g} s (--limit)")
            after = await start_counts(http, base)
            waits = await server_waits(http, base)
    finally:
        processes.stop(manager)
    spawns = stop_leftovers(folder / "spawns.log")
    starts = sum(after[m] - before.get(m, 0) for m in after)
    out = summary(sc, s, rows, starts, spawns)
    out["timed_out"] = timed_out
    if waits is not None and waits["count"]:
        out["server_wait_mean_s"] = waits["sum"] / waits["count"]
    if out["failed"] or timed_out:
        out["manager_log_tail"] = procs.tail(processes.log_path("llm-manager"), 40)
    out["rows"] = sorted(rows, key=lambda r: (r["agent"], r["n"]))
    return out


def stop_leftovers(spawn_log: Path) -> int:
    """The model processes started (from their spawn log); any still alive after the manager
    stopped is killed by its PID and reported."""
    pids = [int(x) for x in spawn_log.read_text().split()] if spawn_log.exists() else []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if proc.status() != psutil.STATUS_ZOMBIE and str(spawn_log) in proc.cmdline():
                log(f"  model process {pid} outlived the manager: killed")
                proc.kill()
        except psutil.Error:
            continue
    return len(pids)


# --------------------------------------------------------------------------- the report


def _s(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [
        f"Requests per agent R = {s['requests']}, load time L = {s['load']:g} s, service time "
        f"S = {s['service']:g} s, turn_time {s['turn_time']:g} s, turn_linger "
        f"{'default' if s['turn_linger'] is None else format(s['turn_linger'], 'g')}, "
        f"queue_timeout {s['queue_timeout']:g} s (new code only).",
        "",
        "| scenario | code | requests | 200 | failed (share) | other statuses, errors "
        "| model starts (ideal) | wall s | ideal s | wall / ideal | wait p50 / p95 / max s "
        "| server mean wait s |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for run in results["runs"]:
        other = {k: v for k, v in run["statuses"].items() if k != "200"} | run["errors"]
        lines.append(
            f"| {run['scenario']} | {run['code']} | {run['requests']} | {run['served']} "
            f"| {run['failed']} ({run['failed_share']:.0%}) "
            f"| {', '.join(f'{k}: {v}' for k, v in other.items()) or '–'} "
            f"| {run['starts']} ({run['min_loads']}) | {_s(run['wall_s'], 1)} "
            f"| {_s(run['ideal_s'], 1)} | {_s(run['wall_s'] / run['ideal_s'])} "
            f"| {_s(run['wait_p50_s'])} / {_s(run['wait_p95_s'])} / {_s(run['wait_max_s'])} "
            f"| {_s(run.get('server_wait_mean_s'))} |"
        )
    m = results["machine"]
    lines += [
        "",
        "Wait: time to the first byte of each streamed answer with 200, at the client. "
        "Ideal: alt P = R + min(A, M) - 1 phases of L + S; stick min(A, M) phases of "
        "L + R * S (one load per phase).",
        f"Machine: {m['nproc']} cores, {m['cpu']}, Python {m['python']}, new code "
        f"{m['git']}" + (f", old code {results['old']['commit']}" if results.get("old") else ""),
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- the whole run


async def run(args: argparse.Namespace, workdir: Path, made: list[procs.Processes]) -> Any:
    s = settings(args)
    scenarios = args.scenarios or [parse_scenario(x) for x in DEFAULT_SCENARIOS.split(",")]
    if args.quick and not args.scenarios:
        scenarios = scenarios[:1]
    codes: dict[str, Path | None] = {"new": None}
    results: dict[str, Any] = {"machine": procs.machine(None, None, None)}
    results["imports_from"] = {"new": imported_from(None)}
    if args.old:
        old = args.old.resolve()
        codes["old"] = old
        results["imports_from"]["old"] = imported_from(old)
        commit = procs._first_line(["git", "-C", str(old), "rev-parse", "--short", "HEAD"])
        results["old"] = {"path": str(old), "commit": commit}
    runs = []
    for sc in scenarios:
        for code, path in codes.items():
            folder = workdir / f"{sc.name}-{code}"  # its config, logs, data_dir, spawn log
            folder.mkdir()
            processes = procs.Processes(folder)
            made.append(processes)
            began = time.monotonic()
            run = await run_scenario(sc, s, folder, processes, path)
            runs.append({"scenario": sc.name, "code": code, **run})
            log(
                f"{sc.name} {code}: {run['served']}/{run['requests']} served, "
                f"{run['starts']} starts, {run['wall_s']:.1f} s "
                f"(ideal {run['ideal_s']:.1f} s), scenario took {time.monotonic() - began:.0f} s"
            )
    results.update(
        settings={**asdict(s), "quick": args.quick, "scenarios": [x.name for x in scenarios]},
        runs=runs,
        workdir=str(workdir),
    )
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run (alt-2x2)")
    p.add_argument("--json", type=Path, help="write every figure to this file")
    p.add_argument(
        "--scenarios",
        type=lambda text: [parse_scenario(x) for x in text.split(",") if x],
        help=f"comma-separated alt-AxM / stick-AxM (default {DEFAULT_SCENARIOS})",
    )
    p.add_argument("--requests", type=int, help="requests per agent (default 8, quick 4)")
    p.add_argument("--load-time", type=float, help="model load time, s (default 1, quick 0.3)")
    p.add_argument("--service-time", type=float, help="per request, s (default 0.2, quick 0.1)")
    p.add_argument("--turn-time", type=float, help="server.turn_time (default 5, quick 2)")
    p.add_argument("--turn-linger", type=float, help="server.turn_linger (default: the server's)")
    p.add_argument("--queue-timeout", type=float, help="server.queue_timeout (default 120)")
    p.add_argument("--limit", type=float, help="longest a scenario's requests may take, s")
    p.add_argument("--old", type=Path, help="also run with the code of this checkout (its src/)")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs, configs)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    procs.interrupt_on_sigterm()
    workdir = Path(tempfile.mkdtemp(prefix="llm-manager-turns-"))
    made: list[procs.Processes] = []
    try:
        results = asyncio.run(run(args, workdir, made))
    except KeyboardInterrupt:
        log("interrupted: stopping every process")
        return 130
    finally:
        for processes in made:
            processes.stop_all()
        if args.keep:
            log(f"work folder kept: {workdir}")
        else:
            procs.remove_tree(workdir)
    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
        log(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
