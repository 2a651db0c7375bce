"""What a streamed answer from real llama.cpp costs a gateway, split into a cost per stream
and a cost per token event, each split into user and kernel time: how the CPU per token
event of issue 19 is taken apart (docs/performance.md, "Where a token event's CPU goes").

    .venv/bin/python benchmarks/stream_cost.py [--tokens 4,64,256] [--rounds 3]
        [--seconds 5] [--clients 1] [--src src] [--go none] [--no-pipe] [--base OTHER/src]

One llama.cpp engine (the tiny random GGUF of tests/models/gguf_factory.py; needs the llama
extra) is started by an ``llm-manager serve`` (model ``m``); nginx, the Go proxy and
``uvloop-pipe`` (benchmarks/pipe_relay.py: Python on uvloop copying bytes, no HTTP, the
floor of any Python relay) relay to the same engine. For each answer length
(``max_tokens``) and each target, wrk (one thread, ``--clients`` connections) sends
streamed chat requests for ``--seconds``; the gateway's CPU is read from /proc as user and
system time apart (utime, stime; nginx: all its processes). The events per answer are the
mean over eight answers per length. A least-squares line through (events per answer, CPU
per answer) gives each target's cost per stream (the intercept: the request, the engine
connection, the record, the engine's log lines) and per event (the slope). Needs nginx and
wrk; go for the Go target. ``--base`` runs a second manager from another checkout, with
its own engine, as the target ``base``: two versions' costs per event side by side.
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
from ab import model_command, start_side  # noqa: E402


def cpu_split(pid: int, children: bool) -> tuple[float, float]:
    """(user, system) seconds of ``pid``, all threads (and of its children: nginx's
    workers; not the manager's, which are its model servers)."""
    pids = [pid]
    if children:
        for line in Path(f"/proc/{pid}/task").glob("*/children"):
            pids += [int(child) for child in line.read_text().split()]
    user = system = 0.0
    for each in pids:
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        user += int(fields[11]) / procs.CLK_TCK
        system += int(fields[12]) / procs.CLK_TCK
    return user, system


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through ``points``."""
    xs = [x for x, _ in points]
    ys = [y for _, y in points]
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / spread
    return mean_y - slope * mean_x, slope


async def events_per_answer(url: str, tokens: int, answers: int = 8) -> float:
    """The mean events per answer over ``answers`` answers (llama.cpp sends a token that
    ends inside a UTF-8 character with the next one, so the count varies a little)."""
    req = loadgen.chat_request(url, "m", {}, stream=True, max_tokens=tokens, ignore_eos=True)
    counts = []
    async with aiohttp.ClientSession() as http:
        for _ in range(answers):
            status, _, _, events = await loadgen._one(http, req)
            if status != 200:
                raise RuntimeError(f"a streamed request through {url} answered {status}")
            counts.append(events - 1)  # the closing "data: [DONE]" carries no token
    return statistics.fmean(counts)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    nginx = procs.find_nginx(None)
    wrk = procs.find_wrk(None)
    if nginx is None or wrk is None:
        raise SystemExit("stream_cost.py needs nginx and wrk on PATH")
    from tests.models.gguf_factory import write_chat_model

    workdir = Path(tempfile.mkdtemp(prefix="llm-manager-stream-cost-"))
    processes = procs.Processes(workdir)
    gguf = write_chat_model(workdir / "tiny-chat.gguf", context_length=4096)
    tokens = [int(n) for n in args.tokens.split(",")]
    try:
        command = model_command("json", workdir, nginx, gguf)
        pid, url, engine = await start_side(processes, "llm-manager", args.src, workdir, command)
        targets: dict[str, tuple[int, str]] = {"llm-manager": (pid, url)}
        if args.base is not None:  # a second checkout side by side, with its own engine
            base_pid, base_url, _ = await start_side(processes, "base", args.base, workdir, command)
            targets["base"] = (base_pid, base_url)
        listen = procs.free_port()
        proxy = procs.start_nginx_proxy(processes, nginx, workdir, {listen: engine})
        await procs.wait_http(
            f"http://127.0.0.1:{listen}/health", proxy, processes.log_path("nginx"), 30
        )
        targets["nginx"] = (proxy.pid, f"http://127.0.0.1:{listen}")
        if args.pipe:
            listen = procs.free_port()
            pipe = procs.start_pipe_relay(processes, {listen: engine})
            await procs.wait_http(
                f"http://127.0.0.1:{listen}/health", pipe, processes.log_path("uvloop-pipe"), 30
            )
            targets["uvloop-pipe"] = (pipe.pid, f"http://127.0.0.1:{listen}")
        go = procs.find_go(args.go)
        if go is not None:
            exe = await asyncio.to_thread(procs.build_goproxy, go)
            listen = procs.free_port()
            proxy = procs.start_goproxy(processes, exe, {listen: engine})
            await procs.wait_http(
                f"http://127.0.0.1:{listen}/health", proxy, processes.log_path("go-proxy"), 30
            )
            targets["go-proxy"] = (proxy.pid, f"http://127.0.0.1:{listen}")
        events = {n: await events_per_answer(url, n) for n in tokens}
        runs: dict[str, dict[int, list[tuple[float, float]]]] = {
            name: {n: [] for n in tokens} for name in targets
        }
        for round_ in range(args.rounds):
            for n in tokens:
                for name, (target_pid, base) in targets.items():
                    req = loadgen.chat_request(
                        base, "m", {}, stream=True, max_tokens=n, ignore_eos=True
                    )
                    script = loadgen.wrk_script(workdir, req)
                    target = base + "/v1/chat/completions"
                    await loadgen.wrk(wrk, script, target, args.clients, 1)  # warm up
                    user, system = cpu_split(target_pid, name == "nginx")
                    result = await loadgen.wrk(wrk, script, target, args.clients, args.seconds)
                    user2, system2 = cpu_split(target_pid, name == "nginx")
                    done = max(result.requests, 1)
                    per = ((user2 - user) * 1000 / done, (system2 - system) * 1000 / done)
                    runs[name][n].append(per)
                    bad = sum(c for code, c in result.statuses.items() if code != "200")
                    # Socket errors apart: uvloop-pipe closes the client's connection when
                    # llama.cpp closes its own after a stream, which wrk counts as one.
                    print(
                        f"round {round_ + 1} tokens {n:>4} {name:>11}: user {per[0]:.3f} "
                        f"+ system {per[1]:.3f} ms/answer, {result.requests} answers, "
                        f"{bad} not 200, {result.errors} socket errors",
                        flush=True,
                    )
        return {"events": events, "runs": runs}
    finally:
        processes.stop_all()
        procs.remove_tree(workdir)


def summary(result: dict[str, Any]) -> list[str]:
    events: dict[int, float] = result["events"]
    lines = ["events per answer: " + ", ".join(f"{n} tokens: {e:.1f}" for n, e in events.items())]
    lines.append(
        "| target | part | per stream, ms | per event, µs | per event ÷ nginx's | ÷ Go's |"
    )
    lines.append("|---|---|---|---|---|---|")
    slopes: dict[tuple[str, str], float] = {}
    rows = []
    for name, per_tokens in result["runs"].items():
        for part, pick in (("user", 0), ("system", 1), ("all", 2)):
            points = [
                (events[n], v[0] + v[1] if pick == 2 else v[pick])
                for n, values in per_tokens.items()
                for v in values
            ]
            fixed, slope = fit(points)
            slopes[name, part] = slope
            rows.append((name, part, fixed, slope))
    for name, part, fixed, slope in rows:
        nginx = slopes.get(("nginx", part))
        go = slopes.get(("go-proxy", part))
        vs_nginx = f"{slope / nginx:.2f}x" if nginx else "-"
        vs_go = f"{slope / go:.2f}x" if go else "-"
        lines.append(
            f"| {name} | {part} | {fixed:.3f} | {slope * 1000:.1f} | {vs_nginx} | {vs_go} |"
        )
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", default="4,64,256", help="answer lengths (max_tokens)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--clients", type=int, default=1)
    p.add_argument("--src", type=Path, default=HERE.parent / "src", help="the manager's src/")
    p.add_argument(
        "--base", type=Path, help="another checkout's src/, run side by side as target 'base'"
    )
    p.add_argument("--go", help="the go executable, or 'none' (default: found on PATH)")
    p.add_argument(
        "--no-pipe",
        dest="pipe",
        action="store_false",
        help="without the uvloop-pipe target (benchmarks/pipe_relay.py: bytes copied, no HTTP)",
    )
    p.add_argument("--json", type=Path, help="write the readings here")
    args = p.parse_args(argv)
    result = procs.run_interruptible(run(args))
    for line in summary(result):
        print(line)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
