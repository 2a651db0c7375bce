"""Web pages against the manager in a real browser (Debian's headless Chromium, driven by
Playwright): a page of another origin (another port of 127.0.0.1) tries what any page can
do without asking (form posts, no-cors fetches, image and script tags) and starts and
stops nothing; a DNS-rebinding page reads nothing; the dashboard, same origin, still
starts and stops models. See docs/security.md."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import fake_command, make_config, read_pids, running_manager

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="needs Debian's chromium (.ci/run installs it)"
)
REBIND = "rebind.test"  # resolved to 127.0.0.1 by the browser, as a rebinding DNS would

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
# A text/plain form whose body is JSON: name '{"model":"m",...,"x":"' + '=' + value '"}'.
_FORM_NAME = json.dumps(CHAT)[:-1] + ', "x": "'

ATTACK = """<!doctype html>
<meta charset="utf-8"><title>a page of another origin</title>
<script>
window.done = 0;
const finished = () => { window.done += 1; };
</script>
<iframe name="f1" onload="finished()"></iframe>
<iframe name="f2" onload="finished()"></iframe>
<iframe name="f3" onload="finished()"></iframe>
<form id="start" method="POST" action="MGR/api/models/m/start" target="f1"></form>
<form id="chat" method="POST" action="MGR/v1/chat/completions" target="f2"
      enctype="text/plain"><input name='FORM_NAME' value='"}'></form>
<form id="stop" method="POST" action="MGR/api/models/keep/stop" target="f3"
      enctype="application/x-www-form-urlencoded"><input name="a" value="b"></form>
<img src="MGR/v1/echo?model=m&via=img" onload="finished()" onerror="finished()">
<script>
document.getElementById("start").submit();
document.getElementById("chat").submit();
document.getElementById("stop").submit();
const s = document.createElement("script");
s.src = "MGR/v1/echo?model=m&via=script";
s.onload = s.onerror = finished;
document.body.append(s);
const chat = JSON.stringify(CHAT_JSON);
for (const [path, body] of [["/v1/chat/completions", chat], ["/api/models/stop-all", ""],
                            ["/api/models/m/start", ""], ["/v1/echo?model=m", chat]]) {
  fetch("MGR" + path, {method: "POST", mode: "no-cors",
                       headers: {"Content-Type": "text/plain"}, body})
    .then(finished, finished);
}
</script>
"""
ATTEMPTS = 3 + 1 + 1 + 4  # frames, img, script, fetches


def _models(spawn_log: Path) -> dict[str, Any]:
    command = fake_command("--spawn-log", str(spawn_log))
    return {
        "m": {"schemes": {"CPU": {"command": command}}},
        "keep": {"schemes": {"CPU": {"command": command}}},
    }


@contextlib.asynccontextmanager
async def other_origin(page: str) -> AsyncIterator[str]:
    """A tiny web server on another port of 127.0.0.1 serving one page at /."""

    async def index(_: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html")

    app = web.Application()
    app.router.add_get("/", index)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        await runner.cleanup()


def _record_refusals(dispatcher: Any) -> list[str]:
    """``METHOD /path?query`` of every request the guard refuses (answered 403 as usual)."""
    refused: list[str] = []
    answer = dispatcher._refuse

    async def recording(scope: Any, receive: Any, send: Any, *args: Any) -> None:
        query = scope["query_string"].decode()
        refused.append(f"{scope['method']} {scope['path']}" + (f"?{query}" if query else ""))
        await answer(scope, receive, send, *args)

    dispatcher._refuse = recording
    return refused


async def _launch(pw: Any) -> Any:
    return await pw.chromium.launch(
        executable_path=CHROMIUM,
        args=[
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            f"--host-resolver-rules=MAP {REBIND} 127.0.0.1",
        ],
    )


async def test_other_origins_cannot_drive_models(tmp_path: Path, spawn_log: Path) -> None:
    playwright_api = pytest.importorskip("playwright.async_api")
    expect = playwright_api.expect
    loaded = make_config(tmp_path, _models(spawn_log))
    async with running_manager(loaded) as mgr:
        status, _ = await mgr.post("/api/models/keep/start")
        assert status == 200
        keep = mgr.supervisor.resolve("keep")
        pid = keep.pid
        port = int(mgr.url.rsplit(":", 1)[1])
        page_text = (
            ATTACK.replace("MGR", mgr.url)
            .replace("FORM_NAME", _FORM_NAME)
            .replace("CHAT_JSON", json.dumps(CHAT))
        )
        refused = _record_refusals(mgr.app.asgi)
        async with other_origin(page_text) as evil_url, playwright_api.async_playwright() as pw:
            browser = await _launch(pw)
            try:
                page = await browser.new_page()
                answers: dict[str, int] = {}

                def on_response(response: Any) -> None:
                    if response.url.startswith(mgr.url):
                        key = f"{response.request.method} {response.url[len(mgr.url) :]}"
                        answers[key] = response.status

                page.on("response", on_response)
                await page.goto(evil_url)
                await page.wait_for_function(f"window.done >= {ATTEMPTS}", timeout=15000)

                # Every attempt reached the manager and was refused (the browser itself
                # does not show the answers to the image and the script: ORB), and nothing
                # started or stopped.
                assert sorted(refused) == sorted(
                    [
                        "POST /api/models/m/start",  # the form
                        "POST /v1/chat/completions",  # the text/plain form
                        "POST /api/models/keep/stop",  # the urlencoded form
                        "GET /v1/echo?model=m&via=img",
                        "GET /v1/echo?model=m&via=script",
                        "POST /v1/chat/completions",  # the fetches
                        "POST /api/models/stop-all",
                        "POST /api/models/m/start",
                        "POST /v1/echo?model=m",
                    ]
                ), refused
                assert answers and set(answers.values()) == {403}, answers
                assert mgr.supervisor.resolve("m").state.value == "stopped"
                assert keep.state.value == "routing" and keep.pid == pid
                assert read_pids(spawn_log) == [pid]

                # DNS rebinding: the attacker's name now points at 127.0.0.1. Its page
                # is same-origin with the manager's port, but the Host is refused.
                rebound = f"http://{REBIND}:{port}"
                response = await page.goto(rebound + "/ui")
                assert response is not None and response.status == 403
                seen = await page.evaluate(
                    """async () => {
                        const out = [];
                        for (const [path, method] of [["/api/models/all-models/info", "GET"],
                                ["/api/requests", "GET"], ["/api/models/m/logs/stream?follow=false", "GET"],
                                ["/api/models/m/start", "POST"], ["/api/models/stop-all", "POST"]]) {
                            const r = await fetch(path, {method});
                            out.push([path, r.status, await r.text()]);
                        }
                        return out;
                    }"""
                )
                for path, status, text in seen:
                    assert status == 403, (path, status, text)
                    assert "is not allowed" in text and '"models"' not in text
                assert mgr.supervisor.resolve("m").state.value == "stopped"
                assert keep.state.value == "routing" and keep.pid == pid

                # The dashboard, same origin, still starts and stops models.
                await page.goto(mgr.url + "/ui")
                row = page.locator("#models tbody tr[data-model=m]")
                await expect(row.locator(".badge")).to_have_text("stopped")
                await row.locator("button.start").click()
                await expect(row.locator(".badge")).to_have_text("ready", timeout=15000)
                await row.locator("button.stop").click()
                await expect(row.locator(".badge")).to_have_text("stopped", timeout=15000)
                await page.click("#stop-all")
                keep_row = page.locator("#models tbody tr[data-model=keep]")
                await expect(keep_row.locator(".badge")).to_have_text("stopped", timeout=15000)
                assert len(read_pids(spawn_log)) == 2
            finally:
                await browser.close()
