"""A small HTTP client for the CLI's client commands (stdlib only: no event loop needed).

Where the server is, first answer that applies:

1. ``--url`` (before or after the command's name);
2. ``$LLM_MANAGER_URL``;
3. the configuration that ``llm-manager serve`` would load here (``--config`` aside: the
   same lookup, ``$LLM_MANAGER_CONFIG``, ``./llm-manager.yaml``, else the built-in one):
   first the URL that a running ``serve`` of that configuration wrote into its data
   directory (``DATA_DIR/run/url.json``: right even when it was started with ``--port``),
   then the configuration's own ``server.host`` and ``server.port``.

With 3, each address is tried in turn until one answers; an error says what was tried.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from llm_manager import runurl

DEFAULT_URL = "http://127.0.0.1:8080"
HOW_TO_POINT = (
    "point the CLI at the server with --url http://HOST:PORT (before or after the command) "
    "or $LLM_MANAGER_URL"
)


class ClientError(Exception):
    pass


class Unreachable(ClientError):
    """No address answered (exit status 2)."""


@dataclass(frozen=True)
class Target:
    url: str
    origin: str  # why this address: shown when it cannot be reached


def _auth() -> dict[str, str]:
    """The key for a server with api_keys/admin_keys, from $LLM_MANAGER_API_KEY."""
    key = os.environ.get("LLM_MANAGER_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def targets(explicit: str | None) -> list[Target]:
    """The addresses to try, in order (see the module's docstring)."""
    if explicit:
        return [Target(_normal(explicit), "--url")]
    env = os.environ.get("LLM_MANAGER_URL")
    if env:
        return [Target(_normal(env), "$LLM_MANAGER_URL")]
    return _from_configuration()


def _normal(url: str) -> str:
    """``127.0.0.1:8090`` means ``http://127.0.0.1:8090``; no trailing slash."""
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    return url.rstrip("/")


def _from_configuration() -> list[Target]:
    from llm_manager import settings
    from llm_manager.config import ConfigError

    try:
        loaded = settings.load(None)
    except ConfigError as exc:
        where = exc.source
        return [Target(DEFAULT_URL, f"the default port; {where} is not a valid configuration")]
    if loaded.source == settings.BUILTIN_SOURCE:
        name = "the built-in configuration"
    else:
        name = loaded.source
    server = loaded.config.server
    found: list[Target] = []
    written = runurl.read(server.data_dir)
    if written:
        origin = f"written by the manager serving {name}, in {server.data_dir}"
        found.append(Target(written.rstrip("/"), origin))
    if server.port:
        url = runurl.client_url(server.host, server.port)
        if not found or found[0].url != url:
            found.append(Target(url, f"server.port of {name}"))
    if not found:
        found.append(Target(DEFAULT_URL, f"the default port; server.port of {name} is 0 (any)"))
    return found


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", exc)
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason)


def unreachable(tried: list[tuple[Target, str]]) -> Unreachable:
    if len(tried) == 1:
        target, reason = tried[0]
        head = f"cannot reach LLM-Manager at {target.url} ({target.origin}): {reason}"
    else:
        lines = [f"  {t.url} ({t.origin}): {reason}" for t, reason in tried]
        head = "cannot reach LLM-Manager; tried:\n" + "\n".join(lines)
    hint = f"Is `llm-manager serve` running? If it is elsewhere, {HOW_TO_POINT}."
    return Unreachable(f"{head}\n{hint}")


def _open(where: list[Target], method: str, path: str, timeout: float) -> tuple[Target, Any]:
    """The first target that answers (an HTTP error answer counts); raises Unreachable."""
    tried: list[tuple[Target, str]] = []
    data = b"" if method == "POST" else None
    for target in where:
        try:
            request = urllib.request.Request(
                target.url + path, method=method, data=data, headers=_auth()
            )
            return target, urllib.request.urlopen(request, timeout=timeout)
        except urllib.error.HTTPError as exc:
            return target, exc
        except (urllib.error.URLError, OSError, ValueError) as exc:
            tried.append((target, _reason(exc)))
    raise unreachable(tried)


def call(where: list[Target], method: str, path: str, timeout: float = 600) -> dict[str, Any]:
    """JSON answer of the first of ``where`` that answers (see :func:`targets`); error
    answers are returned too (they carry a message)."""
    target, resp = _open(where, method, path, timeout)
    try:
        with resp:
            body = resp.read()
    except OSError as exc:
        raise ClientError(f"{target.url}{path}: the answer was cut: {_reason(exc)}") from None
    try:
        data = json.loads(body)
    except ValueError:
        raise ClientError(
            f"{target.url}{path} did not answer JSON: is it LLM-Manager? ({target.origin}); "
            f"if not, {HOW_TO_POINT}"
        ) from None
    if not isinstance(data, dict):
        raise ClientError(f"{target.url}{path} answered an unexpected shape")
    return data


def stream_events(where: list[Target], path: str) -> Iterator[dict[str, Any]]:
    """The JSON events of a Server-Sent Events stream, as they arrive."""
    _, resp = _open(where, "GET", path, 3600)
    if isinstance(resp, urllib.error.HTTPError):
        try:
            detail = json.loads(resp.read()).get("message", resp.reason)
        except (ValueError, AttributeError):
            detail = resp.reason
        raise ClientError(f"the server answered {resp.code}: {detail}") from None
    with resp:
        for raw in resp:
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            if not line.startswith("data:"):
                continue
            try:
                event = json.loads(line[5:])
            except ValueError:
                continue
            if isinstance(event, dict):
                yield event
                if event.get("type") == "stream_end":
                    return
