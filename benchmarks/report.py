"""Markdown tables and the goals check, from the results that run.py collects."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

Row = list[str]
MB_PER_MIB = 1.048576


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    if round(value, digits) == 0:
        value = 0.0  # not "-0.0"
    return f"{value:.{digits}f}"


def fmt_ratio(value: float | None) -> str:
    """Ratios from 0.0001 to 10,000 with about three significant digits."""
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.2f}" if value >= 0.1 else f"{value:.2g}"


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def table(head: Row, rows: list[Row]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def med(results: dict[str, Any], scenario: str, target: str, key: str) -> float | None:
    value = results["scenarios"].get(scenario, {}).get("median", {}).get(target, {}).get(key)
    return value if isinstance(value, int | float) else None


# --------------------------------------------------------------------------- header


def header(results: dict[str, Any]) -> str:
    m = results["machine"]
    s = results["settings"]
    lines = [
        f"## Results ({m['date']}, {m['nproc']}-core {m['cpu']})",
        "",
        f"- machine: nproc {m['nproc']}, {m['cpu']}, Linux {m['kernel']}, "
        f"load average at start {m['loadavg_at_start']}",
        f"- Python {m['python']}, llm-manager {m['llm_manager']} (git {m['git']}), "
        f"aiohttp {m['aiohttp']}, xllamacpp {m['xllamacpp'] or 'not installed'}",
        f"- nginx: {m['nginx'] or 'not installed'}; Go: {m.get('go') or 'not installed'}; "
        f"wrk: {m['wrk'] or 'not installed'}; LiteLLM: {m['litellm'] or 'not found'}",
        f"- load generator: {results['load_generator']} for non-streamed runs on the fast "
        "backend; an aiohttp client, reading every answer to its end, for streams and "
        "llama.cpp",
        f"- {s['rounds']} round(s), every target once per round in turn; medians. Runs of "
        f"{s['seconds']:g} s (fast backends) and {s['llama_seconds']:g} s (llama.cpp)"
        + (" (--quick)" if s["quick"] else ""),
        f"- targets: {', '.join(results['targets'])}; total wall time "
        f"{results['wall_seconds']:.0f} s",
    ]
    if m.get("manager_src"):
        lines.append(f"- LLM-Manager served from {m['manager_src']} (--manager-src)")
    lines += [f"- note: {n}" for n in results["notes"]]
    return "\n".join(lines)


# --------------------------------------------------------------------------- scenario tables


# The targets that other targets are compared with, as the tables' columns name them.
REFERENCES = {"direct": "direct", "nginx": "nginx", "go-proxy": "Go", "litellm": "LiteLLM"}


def _references(results: dict[str, Any], direct: bool = True) -> list[str]:
    """The reference targets of this run (columns only for the targets that were run)."""
    present = set(results.get("targets", REFERENCES))
    return [t for t in REFERENCES if t in present and (direct or t != "direct")]


def _ratio_head(results: dict[str, Any], first: str, rest: str, direct: bool = True) -> list[str]:
    """Column names: ``first`` before the first reference's name, ``rest`` before the others'."""
    names = [REFERENCES[t] for t in _references(results, direct)]
    return [(first if i == 0 else rest) + name for i, name in enumerate(names)]


def _vs(results: dict[str, Any], key: str, target: str, figure: str) -> list[str]:
    """``figure`` of ``target`` as a ratio to each reference target in the same scenario."""
    value = med(results, key, target, figure)
    others = _references(results)
    return [fmt_ratio(ratio(value, med(results, key, other, figure))) for other in others]


def _cpu_vs(results: dict[str, Any], key: str, target: str, figure: str) -> list[str]:
    value = med(results, key, target, figure)
    others = _references(results, direct=False)
    return [fmt_ratio(ratio(value, med(results, key, other, figure))) for other in others]


def json_table(results: dict[str, Any], keys: list[str], by: str = "clients") -> str:
    """One row per scenario and target; the first column is the scenarios' ``by``."""
    head = [by, "target", "req/s", "p50 ms", "p99 ms", "gateway CPU ms/req"]
    head += _ratio_head(results, "req/s ÷ ", "÷ ")
    head += _ratio_head(results, "CPU ÷ ", "CPU ÷ ", direct=False) + ["non-200"]
    rows = [
        [
            clients,
            target,
            fmt(m.get("rps"), 0),
            fmt(m.get("p50_ms")),
            fmt(m.get("p99_ms")),
            fmt(m.get("gateway_cpu_ms_per_request"), 3),
            *_vs(results, key, target, "rps"),
            *_cpu_vs(results, key, target, "gateway_cpu_ms_per_request"),
            _bad(m),
        ]
        for key, clients, target, m in _medians(results, keys, by)
    ]
    return table(head, rows)


def _medians(
    results: dict[str, Any], keys: list[str], by: str = "clients"
) -> Iterator[tuple[str, str, str, dict[str, Any]]]:
    """(scenario key, its ``by``, target, medians) for the scenarios that ran, in order."""
    for key in keys:
        scenario = results["scenarios"].get(key)
        if scenario is None:
            continue
        for target, m in scenario["median"].items():
            yield key, str(scenario[by]), target, m


def stream_table(results: dict[str, Any], keys: list[str]) -> str:
    head = ["clients", "target", "req/s", "TTFB p50 ms", "events/answer", "CPU ms/req"]
    head += ["CPU µs/event", *_ratio_head(results, "req/s ÷ ", "÷ ")]
    head += _ratio_head(results, "CPU/event ÷ ", "CPU/event ÷ ", direct=False)
    head += ["non-200 (resent)"]
    rows = [
        [
            clients,
            target,
            fmt(m.get("rps"), 0),
            fmt(m.get("ttfb_p50_ms")),
            fmt(m.get("events_per_answer"), 0),
            fmt(m.get("gateway_cpu_ms_per_request"), 3),
            fmt(m.get("gateway_cpu_us_per_event"), 1),
            *_vs(results, key, target, "rps"),
            *_cpu_vs(results, key, target, "gateway_cpu_us_per_event"),
            _bad(m),
        ]
        for key, clients, target, m in _medians(results, keys)
    ]
    return table(head, rows)


def _bad(m: dict[str, Any]) -> str:
    if "non_200" not in m:
        return "run failed" if m.get("failed_runs") else "-"
    text = str(m["non_200"] + m["errors"])
    if m.get("retries"):
        text += f" ({m['retries']} resent)"
    if m.get("failed_runs"):
        text += f" ({m['failed_runs']} runs failed)"
    return text


def latency_table(results: dict[str, Any]) -> str:
    scenario = results["scenarios"].get("json-c1")
    if scenario is None:
        return "(not run)"
    direct = med(results, "json-c1", "direct", "p50_ms")
    go = med(results, "json-c1", "go-proxy", "p50_ms")
    go_added = go - direct if go is not None and direct is not None else None
    rows = []
    for target, m in scenario["median"].items():
        p50 = m.get("p50_ms")
        added = p50 - direct if p50 is not None and direct is not None else None
        row = [target, fmt(p50, 3), fmt(added, 3), *_vs(results, "json-c1", target, "p50_ms")]
        if go is not None:
            row.append(fmt_ratio(ratio(added, go_added)) if go_added and go_added > 0 else "-")
        rows.append(row)
    head = ["target", "p50 ms", "added over direct ms", *_ratio_head(results, "p50 ÷ ", "÷ ")]
    if go is not None:
        head.append("added ÷ Go's added")
    return table(head, rows)


def _rel(m: dict[str, Any], base: dict[str, Any], key: str) -> str:
    return fmt_ratio(ratio(m.get(key), base.get(key)))


def alias_table(results: dict[str, Any]) -> str:
    aliases = results.get("aliases")
    if aliases is None:
        return "(not run)"
    first = next(iter(aliases["median"].values()))
    rows = [
        _run_row(f"`{name}` ({aliases['called_by'][name]})", m, first)
        for name, m in aliases["median"].items()
    ]
    head = ["model called by", "req/s", "p50 ms", "p99 ms", "CPU ms/req"]
    head += ["p50 ÷ first row", "CPU ÷ first row", "non-200"]
    return table(head, rows)


def _run_row(label: str, m: dict[str, Any], base: dict[str, Any]) -> list[str]:
    """req/s, p50, p99 and CPU per request of one variant, and p50 and CPU against ``base``."""
    return [
        label,
        fmt(m.get("rps"), 0),
        fmt(m.get("p50_ms"), 3),
        fmt(m.get("p99_ms"), 3),
        fmt(m.get("gateway_cpu_ms_per_request"), 3),
        _rel(m, base, "p50_ms"),
        _rel(m, base, "gateway_cpu_ms_per_request"),
        _bad(m),
    ]


def rss_table(results: dict[str, Any]) -> str:
    rows = [
        [p["point"], str(p["requests"]), fmt(p.get("VmRSS"), 1), fmt(p.get("VmHWM"), 1)]
        for p in results["rss"]
    ]
    return table(["point", "requests served so far", "VmRSS MiB", "VmHWM MiB"], rows)


def bad_input_tables(results: dict[str, Any]) -> str:
    bad = results.get("bad_input")
    if bad is None:
        return "(not run)"
    kinds = [
        [
            kind,
            str(sum(seen.values())),
            ", ".join(f"{c}: {n}" for c, n in sorted(seen.items())),
            "yes" if all(_is_4xx(c) for c in seen) else "**no**",
        ]
        for kind, seen in bad["malformed_statuses"].items()
    ]
    base = bad["median"].get("without burst", {})
    runs = [
        _run_row(name, m, base)
        for name, m in bad["median"].items()
        if name != "malformed burst alone"
    ]
    head = ["well-formed load, 8 clients", "req/s", "p50 ms", "p99 ms"]
    head += ["CPU ms per well-formed req", "p50 ÷ without", "CPU ÷ without", "non-200"]
    kinds_head = ["malformed request", "sent", "statuses", "all 4xx"]
    return table(kinds_head, kinds) + "\n\n" + table(head, runs) + "\n\n" + _burst_cost(bad)


def _burst_cost(bad: dict[str, Any]) -> str:
    """Does the burst slow the well-formed requests beyond its own CPU cost?"""
    med = bad["median"]
    alone = med.get("malformed burst alone", {}).get("gateway_cpu_s")
    without = med.get("without burst", {})
    loaded = med.get("with malformed burst", {})
    if alone is None or not without.get("requests") or not loaded.get("requests"):
        return "(the burst's own CPU cost was not measured)"
    per_without = without["gateway_cpu_s"] / without["requests"] * 1e3
    per_with = (loaded["gateway_cpu_s"] - alone) / loaded["requests"] * 1e3
    return (
        f"The burst alone cost the manager {alone * 1e3:.0f} ms of CPU "
        f"({med['malformed burst alone'].get('requests', 0):.0f} malformed requests). "
        f"Per well-formed request, CPU with the burst minus the burst's own cost: "
        f"{per_with:.3f} ms, against {per_without:.3f} ms without the burst "
        f"({per_with / per_without:.2f}x)."
    )


def _is_4xx(code: str) -> bool:
    return code.isdigit() and 400 <= int(code) < 500


COLD_ROWS = [
    ("engine_start_to_healthy_ms", "engine start → healthy, standalone (A)"),
    ("manager_cold_ttfb_ms", "first byte through LLM-Manager, model stopped (B)"),
    ("cold_minus_engine_ms", "B − A, paired per repetition"),
    ("engine_healthy_ms", "engine healthy, counted from the request (5 ms polls)"),
    ("first_byte_after_healthy_ms", "first byte after the engine turned healthy"),
    ("forwarded_after_healthy_ms", "request forwarded after healthy (above − warm TTFB; ±5 ms)"),
    ("ready_after_healthy_ms", "manager's 'ready' log event after healthy"),
    ("spawn_after_request_ms", "engine spawned after the request (log event)"),
]


def cold_table(results: dict[str, Any]) -> str:
    cold = results.get("cold_start")
    if cold is None:
        return "(not run)"
    warm = ["warm TTFB through LLM-Manager (subtracted below)", fmt(cold["warm_ttfb_ms"], 1), "-"]
    rows = [warm]
    for key, label in COLD_ROWS:
        values = [r[key] for r in cold["reps"] if r.get(key) is not None]
        spread = ", ".join(fmt(v, 0) for v in values)
        rows.append([label, fmt(cold["median"].get(key), 1), spread])
    return table(["figure (ms)", "median", "each repetition"], rows)


# --------------------------------------------------------------------------- goals


def _worst(values: list[float | None], pick: Callable[[list[float]], float]) -> float | None:
    known = [v for v in values if v is not None]
    return pick(known) if known and len(known) == len(values) else None


def _failed(results: dict[str, Any], scenario: str, target: str) -> float | None:
    """Failed requests of every run of ``target`` in ``scenario``: non-200 answers,
    connection errors, failed runs (requests sent again are not failures)."""
    m = results["scenarios"].get(scenario, {}).get("median", {}).get(target)
    if not m or "non_200" not in m:
        return None
    return float(m["non_200"] + m["errors"] + m.get("failed_runs", 0))


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issues 7 and 19's goals, each with the measured value; ``met`` is None when not
    measured."""
    r = results

    def g(scenario: str, target: str, key: str) -> float | None:
        return med(r, scenario, target, key)

    cpu8 = g("json-c8", "llm-manager", "gateway_cpu_ms_per_request")
    llama_ev = [g(f"llama-stream-c{c}", "llm-manager", "gateway_cpu_us_per_event") for c in (1, 16)]
    llama_nginx = [
        ratio(v, g(f"llama-stream-c{c}", "nginx", "gateway_cpu_us_per_event"))
        for v, c in zip(llama_ev, (1, 16), strict=True)
    ]
    burst = [g(f"sse-c{c}", "llm-manager", "gateway_cpu_us_per_event") for c in (1, 16)]
    p50, direct = g("json-c1", "llm-manager", "p50_ms"), g("json-c1", "direct", "p50_ms")
    cold = r.get("cold_start", {}).get("median", {}).get("forwarded_after_healthy_ms")
    rss = {p["point"].split()[0]: p for p in r["rss"]}
    peak = rss["end"]["VmHWM"] * MB_PER_MIB if "end" in rss else None
    growth = (
        ratio(rss["end"]["VmRSS"], rss["middle"]["VmRSS"])
        if {"end", "middle"} <= set(rss)
        else None
    )
    rows = [
        ("gateway CPU per non-streamed request, 8 clients", "≤ 0.15 ms", cpu8, "ms", 3),
        ("  … as a multiple of nginx's", "≤ 6x",
         ratio(cpu8, g("json-c8", "nginx", "gateway_cpu_ms_per_request")), "x", 2),
        ("  … LiteLLM's CPU per request ÷ LLM-Manager's", "≥ 40x",
         ratio(g("json-c8", "litellm", "gateway_cpu_ms_per_request"), cpu8), "x", 1),
        ("CPU per relayed SSE event, llama.cpp token by token (worst of 1 and 16 clients)",
         "≤ 25 µs", _worst(llama_ev, max), "µs", 1),
        ("  … as a multiple of nginx's (worst of 1 and 16 clients)", "≤ 1.8x",
         _worst(llama_nginx, max), "x", 2),
        ("CPU per chunk on the SSE burst (worst of 1 and 16 clients)", "≤ 6 µs",
         _worst(burst, max), "µs", 1),
        ("added p50 latency at 1 client over direct, non-streamed", "≤ 0.25 ms",
         p50 - direct if p50 is not None and direct is not None else None, "ms", 3),
        ("llama.cpp non-streamed at 8 clients: throughput ÷ direct", "≥ 0.9x",
         ratio(g("llama-json-c8", "llm-manager", "rps"), g("llama-json-c8", "direct", "rps")),
         "x", 2),
        ("cold start: first request forwarded after the engine turned healthy", "≤ 50 ms",
         cold, "ms", 0),
        ("peak RSS (VmHWM) with 10 models and 1,000 aliases configured", "≤ 100 MB", peak,
         "MB", 1),
        ("RSS flat across the run: end ÷ middle", "≤ 1.05x", growth, "x", 3),
    ]  # fmt: skip
    rows19 = _goals19(r)
    limits = {"≤": "max", "≥": "min"}
    out = []
    for n, (goal, limit, value, unit, digits) in enumerate(rows + rows19):
        bound = float(limit.split()[1].rstrip("x").replace(",", ""))
        kind = limits[limit[0]]
        met = None if value is None else (value <= bound if kind == "max" else value >= bound)
        shown = "not measured" if value is None else f"{fmt(value, digits)} {unit}"
        issue = 7 if n < len(rows) else 19
        out.append(
            {"issue": issue, "goal": goal, "limit": limit, "value": value, "measured": shown,
             "met": met}
        )  # fmt: skip
    return out


def _goals19(r: dict[str, Any]) -> list[tuple[str, str, float | None, str, int]]:
    """Issue 19's goals: LLM-Manager against the Go ReverseProxy and nginx, side by side."""

    def g(scenario: str, target: str, key: str) -> float | None:
        return med(r, scenario, target, key)

    def cpu_vs_go(scenario: str) -> float | None:
        key = "gateway_cpu_ms_per_request"
        return ratio(g(scenario, "llm-manager", key), g(scenario, "go-proxy", key))

    small = "bodies-small" if "bodies-small" in r["scenarios"] else "json-c8"
    events = [
        ratio(
            g(f"llama-stream-c{c}", "llm-manager", "gateway_cpu_us_per_event"),
            g(f"llama-stream-c{c}", "nginx", "gateway_cpu_us_per_event"),
        )
        for c in (1, 16)
    ]

    def throughput_vs_nginx(scenario: str) -> float | None:
        """(LLM-Manager's req/s ÷ direct's) ÷ (nginx's ÷ direct's): direct cancels out."""
        return ratio(g(scenario, "llm-manager", "rps"), g(scenario, "nginx", "rps"))

    failed = [_failed(r, k, "llm-manager") for k in ("llama-json-c8", "llama-stream-c16")]
    p50 = {t: g("json-c1", t, "p50_ms") for t in ("llm-manager", "go-proxy")}
    return [
        (f"CPU per non-streamed request, 8 clients, small body ({small}): ÷ Go's", "≤ 1.0x",
         cpu_vs_go(small), "x", 2),
        ("CPU per non-streamed request, 8 clients, 64 KiB body: ÷ Go's", "≤ 1.0x",
         cpu_vs_go("bodies-64KiB"), "x", 2),
        ("CPU per non-streamed request, 8 clients, 1 MiB body: ÷ Go's", "≤ 1.0x",
         cpu_vs_go("bodies-1MiB"), "x", 2),
        ("CPU per llama.cpp token event ÷ nginx's (worst of 1 and 16 clients)", "≤ 1.5x",
         _worst(events, max), "x", 2),
        ("llama.cpp non-streamed, 8 clients: throughput ratio to direct ÷ nginx's", "≥ 0.95x",
         throughput_vs_nginx("llama-json-c8"), "x", 2),
        ("llama.cpp streamed, 16 clients: throughput ratio to direct ÷ nginx's", "≥ 0.95x",
         throughput_vs_nginx("llama-stream-c16"), "x", 2),
        ("failed requests through LLM-Manager on llama.cpp (non-streamed 8, streamed 16 "
         "clients)", "≤ 0", _worst(failed, sum), "", 0),
        ("p50 latency at 1 client (so: added p50) minus the Go proxy's, non-streamed", "≤ 0 ms",
         p50["llm-manager"] - p50["go-proxy"]
         if p50["llm-manager"] is not None and p50["go-proxy"] is not None else None, "ms", 3),
    ]  # fmt: skip


def goals_table(results: dict[str, Any]) -> str:
    verdict = {True: "met", False: "**not met**", None: "not measured"}
    rows = [
        [str(g.get("issue", 7)), g["goal"], g["limit"], g["measured"], verdict[g["met"]]]
        for g in results["goals"]
    ]
    return table(["issue", "goal", "target", "measured", "result"], rows)


# --------------------------------------------------------------------------- all of it


ABOUT = {
    "json": "Each run: the load generator's connections send the same small chat request "
    "back to back; the fixed answer carries usage. Gateway CPU is utime + stime of the "
    "gateway's process per completed request (LLM-Manager: its own PID, not its model "
    "servers; LiteLLM: its process tree). `go-proxy` is `net/http/httputil.ReverseProxy` "
    "(benchmarks/goproxy, as llama-swap relays: every write flushed, a keep-alive pool of 256 "
    "per backend). Ratios compare medians of the same run.",
    "sse": "Each answer: 200 chat-completion chunks, a usage event and `[DONE]`, written at "
    "once by the backend. CPU µs/event: the gateway's CPU per answer ÷ the SSE events the "
    "client received (a gateway that re-chunks the stream shows fewer events per answer).",
    "llama": "`llm-manager llama-server` (llama.cpp from xllamacpp) serving a random-weight "
    "2-layer GGUF (tests/models/gguf_factory.py) with `-t 1 -c 4096 -np 16`; temperature 0. "
    "Events are counted per answer by the client. llama.cpp closes the connection after a "
    "streamed answer: a request that meets such a closed kept-alive connection is sent again "
    "(resent; the gateways do the same on their own, nginx with `proxy_next_upstream "
    "non_idempotent`).",
    "cold": "A: `llm-manager llama-server` started alone, `/health` polled every 5 ms. B: the "
    "model stopped through the API, then one streamed request through LLM-Manager, timed to "
    "its first byte, while the engine's `/health` is polled every 5 ms. Repetitions "
    "alternate A and B.",
    "aliases": "LLM-Manager is configured with 10 models of 100 aliases each (1,000 aliases) "
    "throughout the whole run. The same request names the model in four ways.",
    "rss": "VmRSS and VmHWM (peak) of LLM-Manager's process, from /proc/<pid>/status.",
    "bodies": "Non-streamed chat completions from 8 connections whose body is json-c8's small "
    "request, or a chat history "
    "(a system prompt, then user and assistant turns of prose, some with code blocks and "
    "non-ASCII words; `model` last, as OpenAI's Python SDK writes it) of exactly 64 KiB or "
    "1 MiB, to the fixed-JSON backend. `llm-manager` is called by the model's name (the body "
    "is relayed as it is), `llm-manager (alias)` by an alias (`fast-a000`: the body is "
    "renamed on its way). nginx keeps bodies up to 2 MiB in memory "
    "(`client_body_buffer_size`).",
    "bad": "Well-formed requests from 8 connections; in the second variant malformed ones "
    "(one connection each, 4 at a time) are sent meanwhile. Figures are medians over rounds; "
    "CPU is counted per well-formed request.",
}


def section(title: str, about: str | None, body: str) -> str:
    return f"### {title}\n\n" + (f"{about}\n\n" if about else "") + body


def markdown(results: dict[str, Any]) -> str:
    llama = results["settings"]["max_tokens"]
    sections = [
        header(results),
        section(
            "Non-streamed chat completion, fast fixed-JSON backend",
            ABOUT["json"],
            json_table(results, ["json-c1", "json-c8", "json-c64"]),
        ),
        section(
            "Added latency at 1 client (non-streamed, fast backend)", None, latency_table(results)
        ),
        section(
            "Streamed, fast SSE burst",
            ABOUT["sse"],
            stream_table(results, ["sse-c1", "sse-c16"]),
        ),
        section(
            f"Streamed, real llama.cpp, token by token (max_tokens {llama})",
            ABOUT["llama"],
            stream_table(results, ["llama-stream-c1", "llama-stream-c16"]),
        ),
        section(
            f"Non-streamed, real llama.cpp, 8 clients (max_tokens {llama})",
            None,
            json_table(results, ["llama-json-c8"]),
        ),
        section("Cold start (llama.cpp engine)", ABOUT["cold"], cold_table(results)),
        section(
            "10 models, 1,000 aliases: the model named by name or alias (1 client)",
            ABOUT["aliases"],
            alias_table(results),
        ),
        section(
            "Request bodies: the small request, 64 KiB and 1 MiB chat histories, 8 clients",
            ABOUT["bodies"],
            json_table(
                results, [k for k in results["scenarios"] if k.startswith("bodies-")], "body"
            ),
        ),
        section("LLM-Manager's memory across the run", ABOUT["rss"], rss_table(results)),
        section(
            "Malformed requests under load (LLM-Manager)", ABOUT["bad"], bad_input_tables(results)
        ),
        section("Goals (issues 7 and 19)", None, goals_table(results)),
    ]
    return "\n\n".join(sections) + "\n"
