"""The dashboard (``/ui``) in a real browser (Debian's headless Chromium, driven by
Playwright) against a real manager with fake models, and ``/api/events`` on its own.

``LLM_MANAGER_SCREENSHOTS=1`` also writes a screenshot of each tab to ``docs/img/``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import fake_command, make_config, running_manager

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="needs Debian's chromium (.ci/run installs it)"
)
SHOTS = Path(__file__).resolve().parent.parent / "docs" / "img"
EVIL = "<script>alert(1)</script>"


def _models(spawn_log: Path) -> dict[str, Any]:
    command = fake_command("--spawn-log", str(spawn_log), "--tick", "0.3")
    chat_command = [*command, "--chunk-delay", "0.05"]
    return {
        "chat": {"aliases": ["c"], "schemes": {"CPU": {"command": chat_command}}},
        EVIL: {"aliases": ["<b>x</b>"], "schemes": {"CPU": {"command": command}}},
        "embed": {"mode": "embedding", "schemes": {"CPU": {"command": command}}},
    }


async def _shot(page: Any, name: str) -> None:
    if os.environ.get("LLM_MANAGER_SCREENSHOTS") == "1":
        SHOTS.mkdir(parents=True, exist_ok=True)
        await page.evaluate("document.querySelector('#toast').hidden = true")
        await page.screenshot(path=str(SHOTS / f"ui-{name}.png"), full_page=False)


async def test_dashboard_in_chromium(tmp_path: Path, spawn_log: Path) -> None:
    playwright_api = pytest.importorskip("playwright.async_api")
    expect = playwright_api.expect
    loaded = make_config(tmp_path, _models(spawn_log))
    async with running_manager(loaded) as mgr, playwright_api.async_playwright() as pw:
        for text in ("Hello", "How are you?"):  # real requests for the usage tab
            status, _ = await mgr.post(
                "/v1/chat/completions",
                json={"model": "chat", "messages": [{"role": "user", "content": text}]},
            )
            assert status == 200
        status, _ = await mgr.post("/v1/embeddings", json={"model": "embed", "input": "hi"})
        assert status == 200

        browser = await pw.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 760})
            errors: list[str] = []
            dialogs: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))

            async def on_dialog(dialog: Any) -> None:
                dialogs.append(dialog.message)
                await dialog.dismiss()

            page.on("dialog", on_dialog)
            await page.goto(mgr.url + "/ui")
            await page.evaluate("window.__sameDocument = 42")

            # Models: every model, the hostile name as text, live state changes.
            rows = page.locator("#models tbody tr")
            await expect(rows).to_have_count(3)
            names = await page.locator("#models tbody td.name").all_text_contents()
            assert names == ["chat", EVIL, "embed"]
            evil_row = page.locator(f'#models tbody tr[data-model="{EVIL}"]')
            assert await evil_row.locator("td").nth(1).text_content() == "<b>x</b>"
            chat_row = page.locator("#models tbody tr[data-model=chat]")
            await expect(chat_row.locator(".badge")).to_have_text("ready")  # the API's "routing"
            assert await chat_row.get_attribute("data-state") == "routing"
            assert await chat_row.locator("td").nth(2).text_content() == "chat"  # not "Chat"
            scheme_cell = chat_row.locator("td").nth(4)
            assert (await scheme_cell.get_attribute("title") or "").startswith("command: ")
            await expect(evil_row.locator(".badge")).to_have_text("stopped")
            await evil_row.locator("button.start").click()
            await expect(evil_row.locator(".badge")).to_have_text("ready", timeout=15000)
            assert await page.evaluate("window.__sameDocument") == 42  # no reload
            await expect(page.locator("#conn")).to_have_text("live")
            await _shot(page, "models")

            # Logs: history, then live lines of a model.
            await page.click(".tabs button[data-tab=logs]")
            await page.select_option("#log-model", "chat")
            ticks = page.locator("#log-lines .line", has_text="tick ")
            await expect(ticks.first).to_be_visible()
            before = await ticks.count()
            await page.wait_for_function(
                """(n) => [...document.querySelectorAll('#log-lines .line')]
                    .filter((l) => l.textContent.includes('tick ')).length > n + 2""",
                arg=before,
                timeout=10000,
            )
            await page.fill("#log-search", "listening")
            await expect(page.locator("#log-lines .line:visible")).to_have_count(1)
            await page.fill("#log-search", "")
            await _shot(page, "logs")

            # Devices: at least the CPU, with a memory bar.
            await page.click(".tabs button[data-tab=devices]")
            await expect(page.locator("#devices .card[data-device=cpu] .bar")).to_be_visible()
            await _shot(page, "devices")

            # Usage: the chart has bars, the tables have the requests made above.
            await page.click(".tabs button[data-tab=usage]")
            await expect(page.locator("#requests tbody tr")).to_have_count(3)
            await expect(page.locator("#usage-chart")).not_to_have_attribute("data-bars", "0")
            bars = await page.get_attribute("#usage-chart", "data-bars")
            assert bars is not None and int(bars) >= 1
            painted = await page.evaluate(
                """() => {
                    const c = document.querySelector('#usage-chart');
                    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                    let n = 0;
                    for (let i = 3; i < d.length; i += 4) if (d[i]) n++;
                    return n;
                }"""
            )
            assert painted > 500
            totals = await page.locator("#usage-totals tbody td.name").all_text_contents()
            assert sorted(totals) == ["chat", "embed"]
            await _shot(page, "usage")

            # Playground: a streamed chat answer, then an embedding.
            await page.click(".tabs button[data-tab=playground]")
            await page.select_option("#pg-model", "chat")
            await page.fill("#pg-input", "Say something")
            await page.click("#pg-send")
            answer = page.locator("#pg-output .msg.assistant .body").last
            await expect(answer).to_contain_text("tok0 ")
            await expect(page.locator("#pg-output .msg.assistant[data-done]")).to_have_count(1)
            await expect(answer).to_have_text("tok0 tok1 tok2 tok3 tok4 ")
            await _shot(page, "playground")
            await page.select_option("#pg-model", "embed")
            await page.check("input[name=pg-kind][value=embedding]")
            await page.fill("#pg-input", "a sentence")
            await page.click("#pg-send")
            await expect(page.locator("#pg-output .msg.assistant").last).to_contain_text(
                "vector length: "
            )

            # The models tab still lists the hostile name as text; nothing ran it.
            await page.click(".tabs button[data-tab=models]")
            assert await page.locator("#models tbody script").count() == 0
            await page.set_viewport_size({"width": 390, "height": 760})  # a phone, dark
            await page.emulate_media(color_scheme="dark")
            await expect(page.locator("#models tbody tr")).to_have_count(3)
            await _shot(page, "phone-dark")
            assert dialogs == []
            assert errors == []
        finally:
            await browser.close()


async def test_events_stream_sends_changes_and_ends_at_shutdown(
    tmp_path: Path, spawn_log: Path
) -> None:
    loaded = make_config(
        tmp_path,
        {"m": {"schemes": {"CPU": {"command": fake_command("--spawn-log", str(spawn_log))}}}},
    )
    async with (
        running_manager(loaded) as mgr,
        mgr.http.get(mgr.url + "/api/events?interval=0.2") as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        seen: list[tuple[str, dict[str, Any]]] = []
        kind = ""

        async def read_until(predicate: Any) -> None:
            nonlocal kind
            async for raw in resp.content:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    seen.append((kind, json.loads(line[6:])))
                    if predicate():
                        return

        def states() -> list[str]:
            return [b["models"]["m"]["status"] for k, b in seen if k == "models"]

        await asyncio.wait_for(read_until(lambda: "devices" in {k for k, _ in seen}), 10)
        assert states() == ["stopped"]
        devices = next(b for k, b in seen if k == "devices")["devices"]
        assert "cpu" in devices and "cuda" in devices
        start = asyncio.create_task(mgr.post("/api/models/m/start"))
        await asyncio.wait_for(read_until(lambda: states()[-1:] == ["routing"]), 15)
        await start
        assert states()[0] == "stopped"
        # Unchanged state is not sent again.
        count = len(states())
        await asyncio.sleep(0.7)
        mgr.app.begin_shutdown()
        await asyncio.wait_for(read_until(lambda: seen[-1][0] == "end"), 5)
        assert len(states()) == count


async def test_page_survives_a_manager_restart(tmp_path: Path, spawn_log: Path) -> None:
    """The manager goes away and comes back on the same port (with one more model): the page
    shows it is reconnecting, then live again with the new state, without a reload."""
    import signal
    import socket
    import subprocess
    import sys

    import yaml

    playwright_api = pytest.importorskip("playwright.async_api")
    expect = playwright_api.expect
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = tmp_path / "llm-manager.yaml"
    command = fake_command("--spawn-log", str(spawn_log))

    def write(names: list[str]) -> None:
        models = {n: {"schemes": {"CPU": {"command": command}}} for n in names}
        server = {"data_dir": str(tmp_path / "data"), "port": port}
        config.write_text(yaml.safe_dump({"server": server, "models": models}))

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, "-m", "llm_manager", "serve", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    async def wait_listening() -> None:
        for _ in range(300):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                return
            except OSError:
                await asyncio.sleep(0.05)
        raise AssertionError("manager did not listen")

    write(["first"])
    manager = start()
    try:
        await wait_listening()
        async with playwright_api.async_playwright() as pw:
            browser = await pw.chromium.launch(
                executable_path=CHROMIUM,
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
            )
            try:
                page = await browser.new_page()
                await page.goto(f"http://127.0.0.1:{port}/ui")
                await expect(page.locator("#conn")).to_have_text("live", timeout=10000)
                await expect(page.get_by_role("cell", name="first", exact=True)).to_be_visible()
                manager.send_signal(signal.SIGTERM)
                assert await asyncio.to_thread(manager.wait, 30) == 0
                await expect(page.locator("#conn")).not_to_have_text("live", timeout=10000)
                write(["first", "second"])
                manager = start()
                await wait_listening()
                await expect(page.locator("#conn")).to_have_text("live", timeout=20000)
                await expect(page.get_by_role("cell", name="second", exact=True)).to_be_visible(
                    timeout=10000
                )
            finally:
                await browser.close()
    finally:
        if manager.poll() is None:
            manager.terminate()
            manager.wait(30)


async def test_dashboard_shows_the_queue(tmp_path: Path, spawn_log: Path) -> None:
    playwright_api = pytest.importorskip("playwright.async_api")
    expect = playwright_api.expect
    slow = fake_command("--spawn-log", str(spawn_log), "--chunks", "60", "--chunk-delay", "0.1")
    quick = fake_command("--spawn-log", str(spawn_log))
    gpu = [{"name": "test gpu", "kind": "cuda", "memory_total_mib": 8000}]
    models = {
        "big-a": {"schemes": {"GPU": {"devices": {"gpu": 6000}, "command": slow}}},
        "big-b": {"schemes": {"GPU": {"devices": {"gpu": 6000}, "command": quick}}},
    }
    loaded = make_config(tmp_path, models, devices=gpu, turn_time="2m")
    async with running_manager(loaded) as mgr, playwright_api.async_playwright() as pw:

        async def stream_a() -> tuple[int, str]:
            body = {"model": "big-a", "messages": [], "stream": True}
            async with mgr.http.post(mgr.url + "/v1/chat/completions", json=body) as resp:
                return resp.status, await resp.text()

        holder = asyncio.create_task(stream_a())
        a = mgr.supervisor.resolve("big-a")
        while a.admitted == 0:
            await asyncio.sleep(0.02)
        waiter = asyncio.create_task(
            mgr.post("/v1/chat/completions", json={"model": "big-b", "messages": []})
        )
        browser = await pw.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 500})
            await page.goto(mgr.url + "/ui")
            row_b = page.locator("#models tbody tr[data-model=big-b]")
            row_a = page.locator("#models tbody tr[data-model=big-a]")
            await expect(row_b.locator(".queue")).to_have_text("waiting for room: big-a")
            await expect(row_b).to_contain_text("(1 waiting)")
            await expect(row_a.locator(".queue")).to_contain_text("another model waits")
            await expect(page.locator("#summary")).to_contain_text("1 waiting")
            await _shot(page, "queue")
        finally:
            await browser.close()
        # The wait resolves: a finishes its stream, is swapped out, b answers.
        assert (await holder)[0] == 200 and (await waiter)[0] == 200
        await mgr.post("/api/models/stop-all")
