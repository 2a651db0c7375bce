"""The ``llm-manager`` command: serve, config checks, and client commands."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.table import Table

from llm_manager import __version__, settings
from llm_manager.cli.client import ClientError, base_url, call, stream_events
from llm_manager.cli.importer import import_config
from llm_manager.cli.llama import llama_server
from llm_manager.cli.quickstart import quickstart_model
from llm_manager.config import ConfigError, LoadedConfig, json_schema, load_file
from llm_manager.web_guard import startup_warnings

if TYPE_CHECKING:
    from llm_manager.server import EarlySignals

url_option = click.option(
    "--url", default=None, help="LLM-Manager address (default $LLM_MANAGER_URL or :8080)."
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


@click.group()
@click.version_option(__version__, prog_name="llm-manager")
def cli() -> None:
    """LLM-Manager: local model manager and OpenAI-compatible gateway."""


@cli.command()
@click.option("--config", "config_path", default=None, help="YAML configuration file.")
@click.option("--host", default=None, help="Bind address (overrides server.host).")
@click.option("--port", type=int, default=None, help="Port (overrides server.port; 0 = any).")
@click.option("--data-dir", default=None, help="Data directory (overrides server.data_dir).")
@click.option(
    "--log-level",
    default="info",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
)
@click.option("--watch", is_flag=True, help="Reload the configuration when its file changes.")
def serve(
    config_path: str | None,
    host: str | None,
    port: int | None,
    data_dir: str | None,
    log_level: str,
    watch: bool,
) -> None:
    """Serve the API and manage the configured models."""
    from llm_manager.server import EarlySignals

    early = EarlySignals()
    early.install()
    logging.basicConfig(
        level=log_level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    log = logging.getLogger("llm_manager")
    try:
        loaded = settings.load(config_path)
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)
    log.info("configuration: %s", loaded.source)
    changes: dict[str, Any] = {}
    if host is not None:
        changes["host"] = host
    if port is not None:
        changes["port"] = port
    if data_dir is not None:
        changes["data_dir"] = Path(data_dir).resolve()
    if changes:
        loaded = settings.with_server(loaded, **changes)
    server = loaded.config.server
    for warning in startup_warnings(server):  # who else can reach it: docs/security.md
        log.warning("%s", warning)
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            code = runner.run(_run(loaded, log_level, early, changes, watch))
    except OSError as exc:
        click.echo(f"cannot serve on {server.host}:{server.port}: {exc.strerror or exc}", err=True)
        sys.exit(1)
    sys.exit(code)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where installed (it is with uvicorn[standard]): less CPU per relayed byte."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def _run(
    loaded: LoadedConfig,
    log_level: str,
    early: EarlySignals,
    overrides: dict[str, Any],
    watch: bool,
) -> int:
    from llm_manager.server import serve as run_server

    server = loaded.config.server
    return await run_server(loaded, server.host, server.port, log_level, early, overrides, watch)


@cli.command("check-config")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
def check_config(path: Path) -> None:
    """Validate a configuration file; print every problem with its YAML path and line."""
    try:
        loaded = load_file(path)
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(f"{path}: {problem}", err=True)
        click.echo(f"{len(exc.problems)} problem(s) found", err=True)
        sys.exit(1)
    models = loaded.config.models
    click.echo(f"{path}: valid ({len(models)} model(s): {', '.join(models) or 'none'})")


@cli.command("config-schema")
def config_schema() -> None:
    """Print the configuration's JSON Schema (for editors)."""
    click.echo(json_schema())


def _quote(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def _request(url: str | None, method: str, path: str) -> dict[str, Any]:
    try:
        return call(base_url(url), method, path)
    except ClientError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


def _finish(data: dict[str, Any], as_json: bool) -> None:
    """Print a success/message answer and exit 1 when it reports a failure."""
    if as_json:
        click.echo(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        message = data.get("message", "")
        error = data.get("error")
        text = message if not error or error == message else f"{message}: {error}"
        click.echo(text, err=not data.get("success", False))
    if not data.get("success", False):
        sys.exit(1)


@cli.command()
@url_option
@json_option
def models(url: str | None, as_json: bool) -> None:
    """List the models and their state."""
    data = _request(url, "GET", "/api/models/all-models/info")
    if as_json or not data.get("success"):
        _finish(data, as_json)
        return
    table = Table(title=f"{data['running_models']}/{data['total_models']} running")
    for column in (
        "model",
        "aliases",
        "mode",
        "status",
        "pid",
        "port",
        "scheme",
        "pending",
        "idle",
    ):
        table.add_column(column)
    for info in data["models"].values():
        status = info["status"]
        if info.get("failure_reason"):
            status += f" ({info['failure_reason']})"
        table.add_row(
            info["model_name"],
            ", ".join(info["aliases"]),
            info["mode"],
            status,
            str(info["pid"] or "-"),
            str(info.get("port") or "-"),
            info["config_source"] or "-",
            str(info["pending_requests"]),
            f"{info['idle_time_sec']}s",
        )
    Console().print(table)


@cli.command()
@click.argument("name")
@url_option
@json_option
def info(name: str, url: str | None, as_json: bool) -> None:
    """Show one model's details."""
    data = _request(url, "GET", f"/api/models/{_quote(name)}/info")
    if as_json or not data.get("success"):
        _finish(data, as_json)
        return
    table = Table(show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for key, value in data["model"].items():
        shown = ", ".join(value) if isinstance(value, list) else value
        table.add_row(key, "-" if shown is None else str(shown))
    Console().print(table)


@cli.command()
@click.argument("name")
@url_option
@json_option
def start(name: str, url: str | None, as_json: bool) -> None:
    """Start a model and wait until it is ready."""
    _finish(_request(url, "POST", f"/api/models/{_quote(name)}/start"), as_json)


@cli.command()
@click.argument("name")
@url_option
@json_option
def stop(name: str, url: str | None, as_json: bool) -> None:
    """Stop a model."""
    _finish(_request(url, "POST", f"/api/models/{_quote(name)}/stop"), as_json)


@cli.command()
@click.option("--model", default=None, help="Only this model.")
@click.option("--since", default="24h", show_default=True, help="24h, 7d, ISO time or unix.")
@click.option("--until", default=None, help="End of the range (same forms as --since).")
@click.option("--bucket", type=click.Choice(["hour", "day"]), default="hour", show_default=True)
@click.option("--requests", "recent", type=int, default=0, help="Also list N recent requests.")
@url_option
@json_option
def usage(
    model: str | None,
    since: str,
    until: str | None,
    bucket: str,
    recent: int,
    url: str | None,
    as_json: bool,
) -> None:
    """Token usage per model, and recent requests."""
    params = {"since": since, "until": until, "bucket": bucket, "model": model}
    query = urllib.parse.urlencode({k: v for k, v in params.items() if v})
    data = _request(url, "GET", f"/api/usage?{query}")
    rows: dict[str, Any] = {}
    if recent and data.get("success"):
        rq = urllib.parse.urlencode(
            {k: v for k, v in {"model": model, "limit": recent}.items() if v}
        )
        rows = _request(url, "GET", f"/api/requests?{rq}")
    if as_json or not data.get("success"):
        if rows:
            data["requests"] = rows.get("requests", [])
        _finish(data, as_json)
        return
    console = Console()
    table = Table(title=f"usage since {since}")
    for column in ("model", "requests", "prompt tokens", "completion tokens", "errors", "avg ms"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, t in data["totals"].items():
        avg = t["avg_duration_ms"]
        table.add_row(
            name,
            str(t["requests"]),
            str(t["prompt_tokens"]),
            str(t["completion_tokens"]),
            str(t["errors"]),
            f"{avg:.0f}" if avg is not None else "-",
        )
    total = data["total"]
    table.add_row(
        "total",
        str(total["requests"]),
        str(total["prompt_tokens"]),
        str(total["completion_tokens"]),
        str(total["errors"]),
        "",
        style="bold",
    )
    console.print(table)
    if rows.get("requests"):
        recent_table = Table(title="recent requests")
        for column in ("time", "model", "endpoint", "status", "ms", "ttfb", "in", "out"):
            recent_table.add_column(column)
        for r in rows["requests"]:
            recent_table.add_row(
                time.strftime("%H:%M:%S", time.localtime(r["started_at"])),
                r["model"],
                r["endpoint"],
                str(r["status"]),
                f"{r['duration_ms']:.0f}",
                "-" if r["ttfb_ms"] is None else f"{r['ttfb_ms']:.0f}",
                str(r["prompt_tokens"] if r["prompt_tokens"] is not None else "-"),
                str(r["completion_tokens"] if r["completion_tokens"] is not None else "-"),
            )
        console.print(recent_table)


@cli.command("reload")
@url_option
@json_option
def reload_config(url: str | None, as_json: bool) -> None:
    """Make the server re-read its configuration file."""
    data = _request(url, "POST", "/api/config/reload")
    if as_json or not data.get("success"):
        _finish(data, as_json)
        return
    click.echo(data["message"])
    for key in ("added", "removed", "changed", "restart_pending", "unchanged", "restart_needed"):
        if data.get(key):
            click.echo(f"  {key.replace('_', ' ')}: {', '.join(data[key])}")


@cli.command()
@click.argument("name")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines as they come.")
@click.option("--since", default=None, help="Only lines from then on: 10m, 2h, ISO time, unix.")
@click.option("-n", "--lines", type=int, default=None, help="Only the last N lines of history.")
@url_option
@json_option
def logs(
    name: str, follow: bool, since: str | None, lines: int | None, url: str | None, as_json: bool
) -> None:
    """Print a model's log, like tail (-f to follow)."""
    params: dict[str, str] = {"follow": "true" if follow else "false"}
    if since:
        params["since"] = since
    if lines is not None:
        params["history"] = str(lines)
    path = f"/api/models/{_quote(name)}/logs/stream?{urllib.parse.urlencode(params)}"
    try:
        for event in stream_events(base_url(url), path):
            if as_json:
                click.echo(json.dumps(event, ensure_ascii=False))
            elif "log" in event:
                line = event["log"]
                stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(line["timestamp"]))
                click.echo(f"{stamp} [{line.get('stream', '-')}] {line['message']}")
            elif event.get("type") == "error":
                click.echo(f"error: {event.get('message')}", err=True)
                sys.exit(1)
    except ClientError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1 if "answered" in str(exc) else 2)
    except KeyboardInterrupt:
        pass


@cli.command()
@url_option
@json_option
def devices(url: str | None, as_json: bool) -> None:
    """GPUs and CPU: memory, temperature, and which model uses what."""
    data = _request(url, "GET", "/api/devices/info")
    if as_json or not data.get("success"):
        _finish(data, as_json)
        return
    table = Table(title="devices")
    for column in ("device", "name", "used / total MiB", "free MiB", "temp", "util", "models"):
        table.add_column(column)
    for family, report in data["devices"].items():
        info = report.get("info", {})
        if not report.get("online"):
            table.add_row(family, f"offline: {report.get('error', '')}", "", "", "", "", "")
            continue
        if family == "cpu":
            temp = info.get("temperature")
            table.add_row(
                "cpu",
                f"{info['cpu_count']} CPUs",
                f"{info['memory_used']} / {info['memory_total']}",
                str(info["memory_free"]),
                "-" if temp is None else f"{temp:.0f}°C",
                "",
                "",
            )
            continue
        for dev in info.get("devices", []):
            users = sorted({p["model"] for p in dev.get("processes", []) if p.get("model")})
            temp, util = dev.get("temperature"), dev.get("utilization")
            table.add_row(
                dev.get("key") or family,
                dev["name"],
                f"{dev['memory_used']} / {dev['memory_total']}",
                str(dev["memory_free"]),
                "-" if temp is None else f"{temp:.0f}°C",
                "-" if util is None else f"{util:.0f}%",
                ", ".join(users),
            )
    Console().print(table)


cli.add_command(llama_server)
cli.add_command(quickstart_model)
cli.add_command(import_config)


def main() -> None:
    cli()
