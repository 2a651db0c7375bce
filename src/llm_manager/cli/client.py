"""A small HTTP client for the CLI's client commands (stdlib only: no event loop needed)."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8080"


class ClientError(Exception):
    pass


def _auth() -> dict[str, str]:
    """The key for a server with api_keys/admin_keys, from $LLM_MANAGER_API_KEY."""
    key = os.environ.get("LLM_MANAGER_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def base_url(explicit: str | None) -> str:
    return (explicit or os.environ.get("LLM_MANAGER_URL") or DEFAULT_URL).rstrip("/")


def call(url: str, method: str, path: str, timeout: float = 600) -> dict[str, Any]:
    """JSON answer of the server; error answers are returned too (they carry a message)."""
    data = b"" if method == "POST" else None
    request = urllib.request.Request(url + path, method=method, data=data, headers=_auth())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        body = exc.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ClientError(f"cannot reach LLM-Manager at {url}: {reason}") from None
    try:
        data = json.loads(body)
    except ValueError:
        raise ClientError(f"{url}{path} did not answer JSON") from None
    if not isinstance(data, dict):
        raise ClientError(f"{url}{path} answered an unexpected shape")
    return data


def stream_events(url: str, path: str) -> Iterator[dict[str, Any]]:
    """The JSON events of a Server-Sent Events stream, as they arrive."""
    try:
        resp = urllib.request.urlopen(
            urllib.request.Request(url + path, headers=_auth()), timeout=3600
        )
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("message", exc.reason)
        except ValueError:
            detail = exc.reason
        raise ClientError(f"the server answered {exc.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ClientError(f"cannot reach LLM-Manager at {url}: {reason}") from None
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
