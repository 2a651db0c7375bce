"""The dashboard's memory column (issue 18) in a real browser (Debian's headless Chromium,
driven by Playwright) against a real manager whose fake models were really measured: per
device key declared / measured peak / planned (source), and the API's warnings highlighted.

``LLM_MANAGER_SCREENSHOTS=1`` also writes ``docs/img/ui-memory.png``.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RunningManager, fake_command, make_config, running_manager
from tests.test_dashboard import CHROMIUM, _shot

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="needs Debian's chromium (.ci/run installs it)"
)


async def memory_of(mgr: RunningManager, name: str) -> dict[str, Any]:
    status, body = await mgr.get(f"/api/models/{name}/info")
    assert status == 200
    return dict(body["model"]["memory"])


async def measured(mgr: RunningManager, name: str) -> dict[str, Any]:
    """The model's memory once the manager has read its process (every 0.5-1 s)."""
    for _ in range(150):
        mem = await memory_of(mgr, name)
        if mem["devices"]["cpu"]["load_peak"] is not None:
            return mem
        await asyncio.sleep(0.1)
    raise AssertionError(f"{name}: never measured: {mem}")


async def test_models_tab_shows_declared_measured_planned_and_warnings(
    tmp_path: Path, spawn_log: Path
) -> None:
    playwright_api = pytest.importorskip("playwright.async_api")
    expect = playwright_api.expect
    command = fake_command("--spawn-log", str(spawn_log), "--tick", "0.3")
    models = {
        "ran-once": {"schemes": {"cpu": {"devices": {"cpu": 4096}, "command": command}}},
        "tight": {"schemes": {"cpu": {"devices": {"cpu": 1}, "command": command}}},
        "never-ran": {"schemes": {"cpu": {"devices": {"cpu": "auto"}, "command": command}}},
    }
    loaded = make_config(tmp_path, models)
    async with running_manager(loaded) as mgr, playwright_api.async_playwright() as pw:
        for name in ("ran-once", "tight"):
            status, body = await mgr.post(f"/api/models/{name}/start")
            assert status == 200, body
        await measured(mgr, "tight")
        await measured(mgr, "ran-once")
        status, _ = await mgr.post("/api/models/ran-once/stop")
        assert status == 200
        once = (await memory_of(mgr, "ran-once"))["devices"]["cpu"]
        peak = max(v for v in (once["load_peak"], once["serve_peak"]) if v is not None)
        assert once["runs"] == 1 and 1 < peak < 4096  # a Python process, really measured
        assert once["now"] is None  # stopped: no current reading, the peaks stay

        browser = await pw.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 760})
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            await page.goto(mgr.url + "/ui")
            await expect(page.locator("#models tbody tr")).to_have_count(3)
            header = page.locator("#models thead th", has_text="Memory")
            await expect(header).to_contain_text("declared / peak / planned")

            # The model that ran once: what it declared, the peak measured, the plan.
            cell = page.locator("#models tbody tr[data-model=ran-once] td.memory")
            await expect(page.locator("#models tbody tr[data-model=ran-once] .badge")).to_have_text(
                "stopped"
            )
            cpu = cell.locator(".mem[data-device=cpu]")
            await expect(cpu.locator(".key")).to_have_text("cpu")
            await expect(cpu.locator(".declared")).to_have_text("4.0 GiB")
            await expect(cpu.locator(".peak")).to_have_text(f"{peak} MiB")
            await expect(cpu.locator(".planned")).to_have_text("4.0 GiB (declared)")
            await expect(cpu).to_have_text(f"cpu 4.0 GiB / {peak} MiB / 4.0 GiB (declared)")
            title = await cpu.get_attribute("title") or ""
            assert "over 1 run(s)" in title and "planned 4.0 GiB (declared)" in title
            assert await cell.locator(".mem-warn").count() == 0

            # Measured above what it declares: the API's warning, highlighted.
            tight = page.locator("#models tbody tr[data-model=tight] td.memory")
            await expect(tight.locator(".mem[data-device=cpu] .declared")).to_have_text("1 MiB")
            await expect(tight.locator(".mem[data-device=cpu] .peak")).to_have_text(
                re.compile(r"^\d+ MiB$")
            )
            warning = tight.locator(".mem-warn")
            await expect(warning).to_have_count(1)
            await expect(warning).to_have_text(
                re.compile(r"^⚠ cpu: measured \d+ MiB, above the 1 MiB declared$")
            )
            api_warnings = (await memory_of(mgr, "tight"))["warnings"]
            assert len(api_warnings) == 1 and api_warnings[0].endswith("above the 1 MiB declared")
            colour = await warning.evaluate("(n) => getComputedStyle(n).color")
            plain = await tight.locator(".mem").first.evaluate("(n) => getComputedStyle(n).color")
            assert colour != plain  # highlighted: the --warn colour

            # auto, never run, no estimate for a non-llama.cpp command: nothing to plan with.
            never = page.locator("#models tbody tr[data-model=never-ran] .mem[data-device=cpu]")
            await expect(never).to_have_text("cpu auto / – / unplanned")
            await expect(never.locator(".planned.none")).to_have_count(1)

            # The page is live (/api/events).
            await expect(page.locator("#conn")).to_have_text("live")
            await _shot(page, "memory")
            # A phone hides the optional columns, memory among them.
            await page.set_viewport_size({"width": 390, "height": 760})
            await expect(cell).to_be_hidden()
            assert errors == []
        finally:
            await browser.close()
