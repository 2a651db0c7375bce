"""A real browser (Debian's headless Chromium, driven by Playwright) consumes the log stream
with the seed's JavaScript: ``new EventSource(...)`` and ``JSON.parse(event.data)``."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import fake_command, make_config, running_manager

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="needs Debian's chromium (.ci/run installs it)"
)

SEED_MONITOR = """
(alias) => new Promise((resolve, reject) => {
    const seen = [];
    const source = new EventSource(`/api/models/${alias}/logs/stream`);
    source.onmessage = (event) => {
        const data = JSON.parse(event.data);
        seen.push(data);
        const live = seen.filter((d) => d.type === "realtime");
        if (live.length >= 3) { source.close(); resolve(seen); }
    };
    source.onerror = () => { source.close(); reject(new Error("EventSource error")); };
    const fail = () => { source.close(); reject(new Error("timeout: " + JSON.stringify(seen))); };
    setTimeout(fail, 15000);
})
"""


async def test_eventsource_in_chromium_reads_history_then_live_lines(
    tmp_path: Path, spawn_log: Path
) -> None:
    playwright_api = pytest.importorskip("playwright.async_api")
    command = fake_command("--spawn-log", str(spawn_log), "--tick", "0.2")
    loaded = make_config(tmp_path, {"m": {"schemes": {"CPU": {"command": command}}}})
    async with running_manager(loaded) as mgr, playwright_api.async_playwright() as pw:
        await mgr.post("/api/models/m/start")
        browser = await pw.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = await browser.new_page()
            failed: list[str] = []  # the browser's own /favicon.ico probe is not ours
            page.on(
                "response",
                lambda r: (
                    failed.append(r.url)
                    if r.status >= 400 and not r.url.endswith("/favicon.ico")
                    else None
                ),
            )
            await page.goto(mgr.url + "/health")  # same origin as the stream
            events = await page.evaluate(SEED_MONITOR, "m")
        finally:
            await browser.close()
        kinds = [e["type"] for e in events]
        assert kinds.index("historical_complete") > 0
        assert kinds[-3:] == ["realtime"] * 3
        history = [e["log"]["message"] for e in events if e["type"] == "historical"]
        assert any(m.startswith("starting with scheme CPU") for m in history)
        assert all(e["log"]["message"].startswith("tick ") for e in events[-3:])
        assert failed == []
        await mgr.post("/api/models/m/stop")
