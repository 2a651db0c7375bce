"""Reproducible gateway benchmark: LLM-Manager against direct access, nginx, a Go
reverse proxy, a minimal Python relay and LiteLLM, on loopback, on fast fake backends and a
real llama.cpp server.

    .venv/bin/python benchmarks/run.py                 # full run (5 rounds, several minutes)
    .venv/bin/python benchmarks/run.py --quick         # seconds-long smoke run
    .venv/bin/python benchmarks/run.py --json out.json # also write every figure as JSON
    .venv/bin/python benchmarks/run.py --report out.json  # the tables of a saved run again

Every target is started here on free loopback ports and stopped at the end (also on an error
or Ctrl-C). Absent tools are skipped with a note: nginx (the fast backends then run on
aiohttp.web, and there is no nginx proxy), Go (``go`` builds benchmarks/goproxy, the
``go-proxy`` target), wrk (the aiohttp load generator is used instead), LiteLLM (``--litellm
PATH``, $LITELLM_BIN or /work/bench-venvs/litellm/bin/litellm), and the bundled llama.cpp
engine (the ``llama`` extra) with the ``gguf`` package for the test model.

``--only bodies`` sends the small chat request and chat histories of 64 KiB and 1 MiB (runs
of half the length with --quick).
``--manager-src OLD/src`` serves LLM-Manager from another checkout (PYTHONPATH), to compare
an older commit's gateway with the same harness, backends and load.

Each scenario runs every target once per round, in turn (A B A B ...), and reports medians.
The gateway's CPU time is read from /proc/<pid>/stat (utime + stime) before and after each
run: LLM-Manager's own PID only (its children are the model servers), nginx's single process,
the Go proxy's process, the minimal relay's process, LiteLLM's whole process tree.
LLM-Manager runs with its normal configuration (usage scanning, SQLite records, metrics),
with 10 models and 1,000 aliases.
The markdown printed at the end is meant to be pasted into docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

import load as loadgen  # noqa: E402
import procs  # noqa: E402
import report  # noqa: E402

ALIASES_PER_MODEL = 100
SPARE_MODELS = 6  # configured, never started: 10 models in all
LLAMA_FLAGS = ["-t", "1", "-c", "4096", "-np", "16"]
GROUPS = ("json", "sse", "llama", "aliases", "bad-input", "cold-start", "bodies")
# The bodies group's request bodies: "small" is json-c8's request; the others chat histories.
BODY_SIZES = {"small": 0, "64 KiB": 64 << 10, "1 MiB": 1 << 20}
BODY_ALIAS = "fast-a000"  # LLM-Manager's second variant: the model named by an alias
PROXIES = ("nginx", "go-proxy", "minimal-relay")  # the reference relays, in table order


@dataclass
class Target:
    name: str
    base: str  # http://127.0.0.1:PORT
    pid: int | None  # the gateway's process; None for direct access
    tree: bool = False  # count the whole process tree's CPU (LiteLLM)
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Settings:
    rounds: int
    seconds: float  # one timed run on a fast backend
    llama_seconds: float  # one timed run on llama.cpp
    warmup: float
    # The CPU reading after a run waits this long, so that work a gateway does just after
    # the last answer counts too (LLM-Manager commits its request records every 0.2 s).
    deferred: float
    max_tokens: int
    bad_per_kind: int
    cold_reps: int


def settings(args: argparse.Namespace) -> Settings:
    quick = args.quick
    return Settings(
        rounds=args.rounds or (1 if quick else 5),
        seconds=args.seconds or (0.3 if quick else 2.0),
        llama_seconds=args.llama_seconds or (0.5 if quick else 3.0),
        warmup=0.15 if quick else 0.5,
        deferred=0.05 if quick else 0.25,
        max_tokens=16 if quick else 64,
        bad_per_kind=4 if quick else 40,
        cold_reps=args.rounds or (1 if quick else 5),
    )


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of the numeric figures of the runs that did not fail; statuses summed."""
    ok = [r for r in runs if "error" not in r]
    out: dict[str, Any] = {"runs": len(ok), "failed_runs": len(runs) - len(ok)}
    if not ok:
        return out
    for key in dict.fromkeys(k for r in ok for k in r):
        values = [r[key] for r in ok if isinstance(r.get(key), int | float)]
        if values and not isinstance(values[0], bool):
            out[key] = statistics.median(values)
    statuses: dict[str, int] = {}
    for r in ok:
        for code, n in r["statuses"].items():
            statuses[code] = statuses.get(code, 0) + n
    out["statuses"] = statuses
    out["non_200"] = sum(n for code, n in statuses.items() if code != "200")
    out["errors"] = sum(r["errors"] for r in ok)
    out["retries"] = sum(r["retries"] for r in ok)
    out["tool"] = ok[0]["tool"]
    return out


class Bench:
    """The running targets and everything measured on them."""

    def __init__(self, args: argparse.Namespace, workdir: Path, processes: procs.Processes):
        self.args = args
        self.s = settings(args)
        self.workdir = workdir
        self.procs = processes
        self.began = time.monotonic()
        self.nginx = procs.find_nginx(args.nginx)
        self.go = procs.find_go(args.go)
        self.wrk = procs.find_wrk(args.wrk)
        self.litellm_exe = procs.find_litellm(args.litellm)
        self.groups = [g for g in (args.only.split(",") if args.only else GROUPS) if g]
        self.notes: list[str] = []
        names = ("fast", "sse", "llama", "tail")
        self.ports = dict(zip(names, procs.free_ports(len(names)), strict=True))
        self.backend_pids: dict[str, int] = {}
        self.gateways: dict[str, tuple[Any, dict[str, int]]] = {}  # name -> (proc, ports)
        self.manager_url = ""
        self.manager_pid = 0
        self.manager_requests = 0
        self.gguf: Path | None = None
        self.results: dict[str, Any] = {"scenarios": {}, "rss": []}

    # --- setup ------------------------------------------------------------------------------

    def note(self, text: str) -> None:
        self.notes.append(text)
        log("note: " + text)

    def prepare_llama(self) -> None:
        wanted = {"llama", "cold-start"} & set(self.groups)
        if not wanted:
            return
        try:
            import xllamacpp  # noqa: F401

            sys.path.insert(0, str(procs.ROOT))
            from tests.models.gguf_factory import write_chat_model
        except ImportError as exc:
            self.note(f"llama.cpp scenarios skipped: {exc} (install the 'llama' and test extras)")
            self.groups = [g for g in self.groups if g not in wanted]
            return
        self.gguf = write_chat_model(self.workdir / "tiny-chat.gguf", context_length=4096)

    def backend_command(self, kind: str) -> list[str]:
        argv = [sys.executable, str(procs.HERE / "backend.py"), kind, "{port}"]
        if self.nginx:
            argv += ["--nginx", self.nginx, "--workdir", str(self.workdir)]
        return argv

    def llama_command(self, port: str = "{port}") -> list[str]:
        model = str(self.gguf or self.workdir / "tiny-chat.gguf")
        argv = ["llm-manager", "llama-server", "-m", model, "--port", port, "-a", "llama"]
        return argv + LLAMA_FLAGS

    def manager_config(self) -> dict[str, Any]:
        models: dict[str, Any] = {}

        def add(name: str, command: list[str], port: int | None = None) -> None:
            aliases = [f"{name}-a{i:03d}" for i in range(ALIASES_PER_MODEL)]
            spec: dict[str, Any] = {"aliases": aliases, "schemes": {"cpu": {"command": command}}}
            if port is not None:
                spec["port"] = port
            models[name] = spec

        add("fast", self.backend_command("json"), self.ports["fast"])
        add("sse", self.backend_command("sse"), self.ports["sse"])
        add("llama", self.llama_command(), self.ports["llama"])
        for i in range(1, SPARE_MODELS + 1):
            add(f"spare-{i}", self.backend_command("json"))
        add("tail", self.backend_command("json"), self.ports["tail"])
        server = {"data_dir": str(self.workdir / "data"), "idle_timeout": 0}
        return {"server": server, "models": models}

    async def start(self) -> None:
        self.prepare_llama()
        # go build (seconds, a minute on a cold build cache) while the others start
        goproxy = asyncio.create_task(self.build_goproxy())
        backends = ["fast", "sse"] + (["llama"] if self.gguf else [])
        litellm = None
        if self.litellm_exe is None:
            self.note(
                "LiteLLM not found (--litellm PATH, $LITELLM_BIN; or --litellm none): skipped"
            )
        else:  # slow to start: begin first, the backends' ports are fixed already
            port = procs.free_port()
            routes = {b: self.ports[b] for b in backends}
            proc = procs.start_litellm(self.procs, self.litellm_exe, self.workdir, port, routes)
            litellm = proc, port
        config = self.workdir / "llm-manager.yaml"
        config.write_text(json.dumps(self.manager_config(), indent=1))
        manager, self.manager_url = await procs.start_manager(
            self.procs, config, procs.manager_env(self.args.manager_src)
        )
        self.manager_pid = manager.pid
        await asyncio.gather(*(self.start_model(m) for m in [*backends, "tail"]))
        self.start_proxies(backends, await goproxy)
        await self.wait_proxies()
        if litellm is not None:
            await self.wait_litellm(*litellm, backends)
        await asyncio.sleep(0.5)
        log(f"[{self.elapsed()}] all targets up: {', '.join(self.target_names('fast'))}")

    async def start_model(self, name: str) -> None:
        status, body = await self.api("POST", f"/api/models/{name}/start")
        if status != 200:
            raise RuntimeError(f"model {name} did not start: {body}")
        await self.refresh_pid(name)

    async def api(self, method: str, path: str) -> tuple[int, Any]:
        """One management call to LLM-Manager: (status, decoded JSON body)."""
        async with (
            aiohttp.ClientSession() as http,
            http.request(method, self.manager_url + path) as resp,
        ):
            return resp.status, await resp.json(content_type=None)

    async def refresh_pid(self, name: str) -> None:
        _, body = await self.api("GET", f"/api/models/{name}/info")
        info = body["model"]
        if info["port"] != self.ports[name]:
            raise RuntimeError(f"model {name} runs on port {info['port']}, not {self.ports[name]}")
        self.backend_pids[name] = info["pid"]

    async def build_goproxy(self) -> Path | None:
        if self.go is None:
            self.note("go not found (or --go none): no Go reverse proxy target")
            return None
        try:
            return await asyncio.to_thread(procs.build_goproxy, self.go)
        except RuntimeError as exc:
            self.note(f"the Go reverse proxy did not build, target skipped: {exc}")
            return None

    def start_proxies(self, backends: list[str], goproxy: Path | None) -> None:
        # Every proxy's listening ports chosen at once, so all are distinct (one at a time,
        # the kernel may hand a port out twice).
        free = iter(procs.free_ports(3 * len(backends)))

        def take() -> dict[int, int]:  # listening port -> backend port
            return {next(free): self.ports[b] for b in backends}

        if goproxy is not None:
            routes = take()
            proc = procs.start_goproxy(self.procs, goproxy, routes)
            self.gateways["go-proxy"] = proc, dict(zip(backends, routes, strict=True))
        if self.nginx is None:
            self.note(
                "nginx not found (or --nginx none): no nginx target; fast backends on aiohttp.web"
            )
        else:
            routes = take()
            proc = procs.start_nginx_proxy(self.procs, self.nginx, self.workdir, routes)
            self.gateways["nginx"] = proc, dict(zip(backends, routes, strict=True))
        routes = take()
        proc = procs.start_minimal_relay(self.procs, routes)
        self.gateways["minimal-relay"] = proc, dict(zip(backends, routes, strict=True))

    async def wait_litellm(self, proc: Any, port: int, backends: list[str]) -> None:
        url = f"http://127.0.0.1:{port}"
        try:
            await procs.wait_http(
                url + "/health/liveliness", proc, self.log_of("litellm"), 180, 0.2
            )
        except RuntimeError as exc:
            self.note(f"LiteLLM did not start, target skipped: {exc}")
            return
        self.gateways["litellm"] = proc, dict.fromkeys(backends, port)

    def log_of(self, name: str) -> Path:
        return self.procs.log_path(name)

    async def wait_proxies(self) -> None:
        """Until nginx, the Go proxy and the minimal relay answer on every port (any status)."""
        for name in PROXIES:
            proc, ports = self.gateways.get(name, (None, {}))
            for port in ports.values():
                await self.wait_port(f"http://127.0.0.1:{port}/v1/chat/completions", proc, name)

    async def wait_port(self, url: str, proc: Any, name: str) -> None:
        deadline = time.monotonic() + 30
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited:\n{procs.tail(self.log_of(name))}")
                try:
                    async with http.get(url) as resp:
                        await resp.read()
                        return
                except (aiohttp.ClientError, OSError):
                    await asyncio.sleep(0.05)
        raise RuntimeError(f"{name} did not listen: {url}")

    # --- targets and measuring ----------------------------------------------------------------

    def elapsed(self) -> str:
        return f"{time.monotonic() - self.began:5.0f}s"

    def target_names(self, backend: str) -> list[str]:
        return [t.name for t in self.targets(backend)]

    def targets(self, backend: str) -> list[Target]:
        out = [Target("direct", f"http://127.0.0.1:{self.ports[backend]}", None)]
        for name in PROXIES:
            if name in self.gateways:
                proc, ports = self.gateways[name]
                out.append(Target(name, f"http://127.0.0.1:{ports[backend]}", proc.pid))
        out.append(Target("llm-manager", self.manager_url, self.manager_pid))
        if "litellm" in self.gateways:
            proc, ports = self.gateways["litellm"]
            auth = {"Authorization": f"Bearer {procs.LITELLM_KEY}"}
            out.append(
                Target("litellm", f"http://127.0.0.1:{ports[backend]}", proc.pid, True, auth)
            )
        wanted = self.args.targets.split(",") if self.args.targets else None
        return [t for t in out if wanted is None or t.name in wanted or t.name == "direct"]

    async def measure(
        self, target: Target, backend: str | None, run: Callable[[], Awaitable[loadgen.Load]]
    ) -> dict[str, Any]:
        """One timed run with the gateway's and the backend's CPU read around it."""
        backend_pid = self.backend_pids.get(backend) if backend else None
        g0 = procs.cpu_seconds(target.pid, target.tree) if target.pid else 0.0
        b0 = procs.cpu_seconds(backend_pid) if backend_pid else 0.0
        try:
            result = await run()
        except Exception as exc:  # one failed run is reported, the others go on
            log(f"  {target.name}: run failed: {exc!r}")
            return {"error": repr(exc)}
        await asyncio.sleep(self.s.deferred)
        g1 = procs.cpu_seconds(target.pid, target.tree) if target.pid else 0.0
        b1 = procs.cpu_seconds(backend_pid) if backend_pid else 0.0
        await self.settle(target)
        out = result.as_dict()
        if target.pid:
            out["gateway_cpu_s"] = g1 - g0
            if result.requests:
                out["gateway_cpu_ms_per_request"] = (g1 - g0) * 1e3 / result.requests
            if result.events:
                out["gateway_cpu_us_per_event"] = (g1 - g0) * 1e6 / result.events
        if backend_pid and result.requests:
            out["backend_cpu_ms_per_request"] = (b1 - b0) * 1e3 / result.requests
        if result.requests and result.events:
            out["events_per_answer"] = result.events / result.requests
        if target.name == "llm-manager":
            self.manager_requests += result.requests
        return out

    async def warm_up(self, target: Target, load: Callable[[float], Awaitable[Any]]) -> None:
        """A short unmeasured run (connections opened, caches filled)."""
        try:
            await load(self.s.warmup)
        except Exception as exc:
            log(f"  {target.name}: warm-up failed: {exc!r}")
        await self.settle(target)

    async def settle(self, target: Target) -> None:
        """Until the gateway is idle (under 10 % of a core for 0.1 s; 5 s at most), so that
        work left from one run (LiteLLM's) does not slow the next target's."""
        if not target.pid:
            return
        for _ in range(50):
            before = procs.cpu_seconds(target.pid, target.tree)
            await asyncio.sleep(0.1)
            if procs.cpu_seconds(target.pid, target.tree) - before <= 0.01:
                return

    def json_load(
        self, target: Target, model: str, clients: int
    ) -> Callable[[float], Awaitable[loadgen.Load]]:
        return self.post_load(loadgen.chat_request(target.base, model, target.headers), clients)

    def post_load(
        self, req: loadgen.Request, clients: int
    ) -> Callable[[float], Awaitable[loadgen.Load]]:
        """Non-streamed load: wrk when installed, else the aiohttp client."""
        if self.wrk is None:
            return lambda seconds: loadgen.http_load(req, clients, seconds)
        script = loadgen.wrk_script(self.workdir, req)
        wrk = self.wrk
        return lambda seconds: loadgen.wrk(wrk, script, req.url, clients, seconds)

    def stream_load(
        self, target: Target, model: str, clients: int, **extra: Any
    ) -> Callable[[float], Awaitable[loadgen.Load]]:
        req = loadgen.chat_request(target.base, model, target.headers, stream=True, **extra)
        return lambda seconds: loadgen.http_load(req, clients, seconds)

    async def scenario(
        self,
        key: str,
        backend: str,
        clients: int,
        seconds: float,
        make: Callable[[Target], Callable[[float], Awaitable[loadgen.Load]]],
        description: str,
        targets: list[Target] | None = None,
        **about: Any,
    ) -> None:
        """Every target (by default ``self.targets(backend)``) once per round, in turn;
        warm-up first; medians at the end. ``about`` is kept with the figures."""
        targets = targets or self.targets(backend)
        loads = {t.name: make(t) for t in targets}
        for t in targets:
            await self.warm_up(t, loads[t.name])
        runs: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
        for n in range(self.s.rounds):
            for t in targets:
                r = await self.measure(t, backend, lambda t=t: loads[t.name](seconds))
                runs[t.name].append(r)
                done = f"{n + 1}/{self.s.rounds}"
                log(f"[{self.elapsed()}] {key} round {done} {t.name}: {r.get('rps', 0):.0f} req/s")
        self.results["scenarios"][key] = {
            "description": description,
            "backend": backend,
            "clients": clients,
            "seconds": seconds,
            **about,
            "runs": runs,
            "median": {name: median_of(rs) for name, rs in runs.items()},
        }

    def rss(self, point: str) -> None:
        mem = procs.memory_mib(self.manager_pid)
        self.results["rss"].append({"point": point, "requests": self.manager_requests, **mem})

    # --- scenarios ------------------------------------------------------------------------------

    async def run_json(self) -> None:
        for clients in (1, 8, 64):
            await self.scenario(
                f"json-c{clients}",
                "fast",
                clients,
                self.s.seconds,
                lambda t, c=clients: self.json_load(t, "fast", c),
                f"non-streamed JSON, fast backend, {clients} client(s)",
            )

    async def run_sse(self) -> None:
        for clients in (1, 16):
            await self.scenario(
                f"sse-c{clients}",
                "sse",
                clients,
                self.s.seconds,
                lambda t, c=clients: self.stream_load(t, "sse", c),
                f"SSE burst (200 chunks + usage + [DONE]), {clients} client(s)",
            )

    def llama_extra(self) -> dict[str, Any]:
        return {"max_tokens": self.s.max_tokens, "temperature": 0}

    async def run_llama(self) -> None:
        for clients in (1, 16):
            await self.scenario(
                f"llama-stream-c{clients}",
                "llama",
                clients,
                self.s.llama_seconds,
                lambda t, c=clients: self.stream_load(t, "llama", c, **self.llama_extra()),
                f"llama.cpp streamed, max_tokens {self.s.max_tokens}, {clients} client(s)",
            )
        await self.scenario(
            "llama-json-c8",
            "llama",
            8,
            self.s.llama_seconds,
            lambda t: self.aiohttp_json(t, "llama", 8),
            f"llama.cpp non-streamed, max_tokens {self.s.max_tokens}, 8 clients",
        )

    def aiohttp_json(
        self, target: Target, model: str, clients: int
    ) -> Callable[[float], Awaitable[loadgen.Load]]:
        req = loadgen.chat_request(target.base, model, target.headers, **self.llama_extra())
        return lambda seconds: loadgen.http_load(req, clients, seconds)

    async def run_aliases(self) -> None:
        """The same request by the first model's name, the file's first alias, its last alias
        and the last model's name: resolution must not grow with the alias count."""
        names = {
            "fast": "name of the first model",
            "fast-a000": "first alias in the file",
            f"tail-a{ALIASES_PER_MODEL - 1:03d}": "last alias in the file, the 1,000th",
            "tail": "name of the last model, the 10th",
        }
        manager = Target("llm-manager", self.manager_url, self.manager_pid)
        loads = {name: self.json_load(manager, name, 1) for name in names}
        for name in names:  # warm-up
            await self.warm_up(manager, loads[name])
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for n in range(self.s.rounds):
            for name in names:
                runs[name].append(
                    await self.measure(manager, None, lambda n=name: loads[n](self.s.seconds))
                )
            log(f"[{self.elapsed()}] aliases round {n + 1}/{self.s.rounds}")
        self.results["aliases"] = {
            "clients": 1,
            "seconds": self.s.seconds,
            "called_by": names,
            "runs": runs,
            "median": {name: median_of(rs) for name, rs in runs.items()},
        }

    async def run_bodies(self) -> None:
        """Non-streamed at 8 clients: the small chat request (json-c8's), chat histories of 64
        KiB and 1 MiB; LLM-Manager twice: the model named by its name, and by an alias (the
        body is renamed on its way). Runs after the RSS point "end": megabyte bodies in
        flight are not the peak-RSS goal's. --quick: runs of half the length."""
        targets = []
        for t in self.targets("fast"):
            targets.append(t)
            if t.name == "llm-manager":
                targets.append(Target("llm-manager (alias)", t.base, t.pid))
        seconds = self.s.seconds / 2 if self.args.quick else self.s.seconds
        for label, size in BODY_SIZES.items():

            def make(t: Target, size: int = size) -> Callable[[float], Awaitable[loadgen.Load]]:
                model = BODY_ALIAS if t.name == "llm-manager (alias)" else "fast"
                if size == 0:
                    return self.json_load(t, model, 8)
                return self.post_load(loadgen.history_request(t.base, model, t.headers, size), 8)

            await self.scenario(
                "bodies-" + label.replace(" ", ""),
                "fast",
                8,
                seconds,
                make,
                f"non-streamed chat history of {label} ({size:,} B), fast backend, 8 clients"
                if size
                else "non-streamed small chat request (json-c8's), fast backend, 8 clients",
                targets,
                body=label,
                body_bytes=size or len(loadgen.chat_request("", "fast", {}).body),
            )

    async def run_bad_input(self) -> None:
        """Well-formed load at 8 clients, with and without a burst of malformed requests."""
        manager = Target("llm-manager", self.manager_url, self.manager_pid)
        port = int(self.manager_url.rsplit(":", 1)[1])
        seconds = self.s.seconds * 1.5
        make = self.json_load(manager, "fast", 8)
        bursts: list[dict[str, dict[str, int]]] = []

        async def with_burst() -> loadgen.Load:
            async def burst() -> None:
                await asyncio.sleep(seconds * 0.1)
                spread = seconds * 0.7
                bursts.append(
                    await loadgen.malformed_burst(port, "fast", self.s.bad_per_kind, spread)
                )

            load, _ = await asyncio.gather(make(seconds), burst())
            return load

        async def burst_alone() -> loadgen.Load:
            # The burst's own CPU cost, to tell it apart from any slowing of the others.
            began = time.perf_counter()
            seen = await loadgen.malformed_burst(port, "fast", self.s.bad_per_kind, seconds * 0.7)
            bursts.append(seen)
            sent = sum(sum(statuses.values()) for statuses in seen.values())
            return loadgen.Load("raw sockets", sent, time.perf_counter() - began, None, None)

        variants: dict[str, Callable[[], Awaitable[loadgen.Load]]] = {
            "without burst": lambda: make(seconds),
            "with malformed burst": with_burst,
            "malformed burst alone": burst_alone,
        }
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        for n in range(self.s.rounds):
            for name, run in variants.items():
                runs[name].append(await self.measure(manager, "fast", run))
            log(f"[{self.elapsed()}] bad input round {n + 1}/{self.s.rounds}")
        malformed: dict[str, dict[str, int]] = {}
        for seen in bursts:
            for kind, statuses in seen.items():
                for code, count in statuses.items():
                    malformed.setdefault(kind, {})
                    malformed[kind][code] = malformed[kind].get(code, 0) + count
        self.results["bad_input"] = {
            "clients": 8,
            "seconds": seconds,
            "per_kind_per_run": self.s.bad_per_kind,
            "malformed_statuses": malformed,
            "runs": runs,
            "median": {name: median_of(rs) for name, rs in runs.items()},
        }

    async def run_cold_start(self) -> None:
        """The engine's own start-to-healthy time (standalone) against a first request through
        LLM-Manager to a stopped model; A B A B."""
        req = loadgen.chat_request(self.manager_url, "llama", {}, stream=True, max_tokens=4)
        warm = statistics.median([await loadgen.first_byte(req) for _ in range(5)]) * 1e3
        reps: list[dict[str, Any]] = []
        for n in range(self.s.cold_reps):
            rep = {"engine_start_to_healthy_ms": await self.engine_start_to_healthy()}
            rep.update(await self.manager_cold_request(req, warm))
            rep["cold_minus_engine_ms"] = (
                rep["manager_cold_ttfb_ms"] - rep["engine_start_to_healthy_ms"]
            )
            reps.append(rep)
            log(
                f"[{self.elapsed()}] cold start {n + 1}/{self.s.cold_reps}: engine alone "
                f"{rep['engine_start_to_healthy_ms']:.0f} ms to healthy, first byte through "
                f"LLM-Manager {rep['manager_cold_ttfb_ms']:.0f} ms"
            )
        await self.refresh_pid("llama")
        keys = reps[0].keys()
        self.results["cold_start"] = {
            "warm_ttfb_ms": warm,
            "reps": reps,
            "median": {
                k: statistics.median(r[k] for r in reps if r[k] is not None)
                for k in keys
                if any(r[k] is not None for r in reps)
            },
        }

    async def engine_start_to_healthy(self) -> float:
        port = procs.free_port()
        argv = [sys.executable, "-m", "llm_manager", *self.llama_command(str(port))[1:]]
        began = time.perf_counter()
        proc = self.procs.start("engine-standalone", argv)
        try:
            healthy, _ = await loadgen.poll_healthy(f"http://127.0.0.1:{port}/health")
        finally:
            self.procs.stop(proc)
        return (healthy - began) * 1e3

    async def manager_cold_request(self, req: loadgen.Request, warm_ms: float) -> dict[str, Any]:
        await self.api("POST", "/api/models/llama/stop")
        health = f"http://127.0.0.1:{self.ports['llama']}/health"
        poller = asyncio.create_task(loadgen.poll_healthy(health))
        await asyncio.sleep(0)
        began, began_wall = time.perf_counter(), time.time()
        ttfb = await loadgen.first_byte(req)
        healthy, healthy_wall = await poller
        starting, ready = await self.start_events()
        after_healthy = (began + ttfb - healthy) * 1e3
        return {
            "manager_cold_ttfb_ms": ttfb * 1e3,
            "engine_healthy_ms": (healthy - began) * 1e3,
            "first_byte_after_healthy_ms": after_healthy,
            "forwarded_after_healthy_ms": after_healthy - warm_ms,
            "spawn_after_request_ms": (starting - began_wall) * 1e3 if starting else None,
            "ready_after_healthy_ms": (ready - healthy_wall) * 1e3 if ready else None,
        }

    async def start_events(self) -> tuple[float | None, float | None]:
        """Timestamps of the last 'starting with scheme' and 'ready after' log events."""
        url = f"{self.manager_url}/api/models/llama/logs/stream?follow=false&history=50"
        starting = ready = None
        async with aiohttp.ClientSession() as http, http.get(url) as resp:
            text = await resp.text()
        for line in text.splitlines():
            if not line.startswith("data: "):
                continue
            entry = json.loads(line[6:]).get("log") or {}
            message = entry.get("message", "")
            if message.startswith("starting with scheme"):
                starting = entry["timestamp"]
            elif message.startswith("ready after"):
                ready = entry["timestamp"]
        return starting, ready

    # --- the whole run -------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        machine = procs.machine(
            self.nginx, self.wrk, self.litellm_exe, self.args.manager_src, self.go
        )
        await self.start()
        if self.wrk is None:
            self.note("wrk not found (or --wrk none): non-streamed load from the aiohttp client")
        self.rss("start (models started, no requests yet)")
        steps = {
            "json": self.run_json,
            "sse": self.run_sse,
            "llama": self.run_llama,
            "aliases": self.run_aliases,
            "bad-input": self.run_bad_input,
            "cold-start": self.run_cold_start,
            "bodies": self.run_bodies,
        }
        chosen = [g for g in GROUPS if g in self.groups]
        small = [g for g in chosen if g != "bodies"]
        for i, group in enumerate(small):
            await steps[group]()
            if i == len(small) // 2 - 1:
                self.rss(f"middle (after {group})")
        # The peak RSS goal is for small requests: megabyte bodies in flight come after it.
        self.rss("end")
        if "bodies" in chosen:
            await steps["bodies"]()
            self.rss("after the small, 64 KiB and 1 MiB bodies")
        self.results.update(
            machine=machine,
            settings={**self.s.__dict__, "quick": self.args.quick, "groups": chosen},
            load_generator="wrk" if self.wrk else "aiohttp",
            notes=self.notes,
            targets=self.target_names("fast"),
            wall_seconds=time.monotonic() - self.began,
            workdir=str(self.workdir),
        )
        self.results["goals"] = report.goals(self.results)
        return self.results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    p.add_argument("--json", type=Path, help="write every figure to this file")
    p.add_argument("--rounds", type=int, help="rounds per scenario (default 5, quick 1)")
    p.add_argument("--seconds", type=float, help="one run on a fast backend (default 2)")
    p.add_argument("--llama-seconds", type=float, help="one run on llama.cpp (default 3)")
    p.add_argument("--litellm", help="LiteLLM's `litellm` executable, or 'none'")
    p.add_argument("--nginx", help="the nginx executable, or 'none' (default: found on PATH)")
    p.add_argument("--wrk", help="the wrk executable, or 'none' (default: found on PATH)")
    p.add_argument("--go", help="the go executable, or 'none' (default: found on PATH)")
    p.add_argument("--only", help=f"comma-separated scenario groups: {','.join(GROUPS)}")
    p.add_argument("--targets", help="comma-separated targets (direct is always run)")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs, configs)")
    p.add_argument(
        "--manager-src",
        type=Path,
        help="serve LLM-Manager from this checkout's src/ (PYTHONPATH), e.g. an older commit's",
    )
    p.add_argument("--report", type=Path, help="print the tables of a saved --json file only")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:  # the tables again, from a saved run; nothing is measured
        results = json.loads(args.report.read_text())
        results["goals"] = report.goals(results)
        print(report.markdown(results))
        return 0
    procs.interrupt_on_sigterm()
    workdir = Path(tempfile.mkdtemp(prefix="llm-manager-bench-"))
    processes = procs.Processes(workdir)
    try:
        results = asyncio.run(Bench(args, workdir, processes).run())
    except KeyboardInterrupt:
        log("interrupted: stopping every process")
        return 130
    finally:
        processes.stop_all()
        if args.keep:
            log(f"work folder kept: {workdir}")
        else:
            procs.remove_tree(workdir)
    print(report.markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, sort_keys=False))
        log(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
