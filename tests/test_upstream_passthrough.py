"""``ANY /upstream/{model}/{path}``: the model's own server, started if needed, with the
client's Accept-Encoding kept; usage recorded from plain JSON and SSE answers; pages
opened through it reach their model on absolute paths (Referer)."""

from __future__ import annotations

import asyncio
import gzip
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from yarl import URL

from llm_manager.models.runtime import State
from tests.conftest import RunningManager, fake_command, make_config, running_manager

MODELS: dict[str, Any] = {
    "chat-model": {"aliases": ["chat"], "schemes": {"CPU": {"command": fake_command()}}},
    "embedder": {"mode": "embedding", "schemes": {"CPU": {"command": fake_command()}}},
}


async def records(mgr: RunningManager) -> list[dict[str, Any]]:
    await asyncio.to_thread(mgr.app.db.flush)
    status, body = await mgr.get("/api/requests?limit=100")
    assert status == 200
    return list(reversed(body["requests"]))


async def test_passthrough_starts_the_model_and_keeps_path_query_and_encoding(
    tmp_path: Path,
) -> None:
    async with running_manager(make_config(tmp_path, MODELS)) as mgr:
        runtime = mgr.supervisor.resolve("chat-model")
        assert runtime.state is State.STOPPED
        # By alias; the query string goes along.
        async with mgr.http.get(mgr.url + "/upstream/chat/props?a=1&b=%20") as resp:
            assert resp.status == 200
            assert await resp.json() == {"served_by": "chat-model", "query": "a=1&b=%20"}
        assert runtime.state is State.ROUTING

        # The client's Accept-Encoding reaches the engine: llama.cpp serves its UI
        # gzipped, and only to clients that accept gzip.
        async with mgr.http.get(
            mgr.url + "/upstream/chat-model/gz",
            headers={"Accept-Encoding": "gzip"},
            auto_decompress=False,
        ) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Encoding"] == "gzip"
            page = gzip.decompress(await resp.read())
            assert page == b"<html><body>page of chat-model</body></html>"
        async with mgr.http.get(
            mgr.url + "/upstream/chat-model/gz", headers={"Accept-Encoding": "identity"}
        ) as resp:
            assert resp.status == 415  # the engine's own answer, as it gave it

        # Any method; headers as sent (less hop-by-hop ones and Host).
        async with mgr.http.put(
            mgr.url + "/upstream/chat-model/v1/echo?x=y",
            data=b"raw bytes",
            headers={"Accept-Encoding": "br, gzip", "X-Custom": "1"},
        ) as resp:
            echoed = await resp.json()
        assert echoed["method"] == "PUT" and echoed["path"] == "/v1/echo"
        assert echoed["query"] == "x=y" and echoed["body"] == "raw bytes"
        sent = {name.lower(): value for name, value in echoed["headers"].items()}
        assert sent["accept-encoding"] == "br, gzip" and sent["x-custom"] == "1"


async def test_passthrough_records_usage_and_skips_the_mode_gate(tmp_path: Path) -> None:
    async with running_manager(make_config(tmp_path, MODELS)) as mgr:
        chat = {"model": "whatever", "messages": [{"role": "user", "content": "hi"}]}
        status, body = await mgr.post("/upstream/chat/v1/chat/completions", json=chat)
        assert status == 200 and body["usage"]["prompt_tokens"] == 7
        # The body goes as it is: no model is read from it, nor renamed.
        assert body["model"] == "whatever"
        async with mgr.http.post(
            mgr.url + "/upstream/chat-model/v1/chat/completions",
            json={**chat, "stream": True},
            headers={"Accept-Encoding": "gzip"},
        ) as resp:
            assert resp.status == 200
            assert b"data: [DONE]" in await resp.read()
        # No mode gate: an embedding model's server gets whatever path is asked for.
        status, _ = await mgr.post("/upstream/embedder/v1/chat/completions", json=chat)
        assert status == 200

        rows = [r for r in await records(mgr) if r["endpoint"].startswith("/upstream/")]
        assert [(r["model"], r["endpoint"], r["status"]) for r in rows] == [
            ("chat-model", "/upstream/chat/v1/chat/completions", 200),
            ("chat-model", "/upstream/chat-model/v1/chat/completions", 200),
            ("embedder", "/upstream/embedder/v1/chat/completions", 200),
        ]
        assert (rows[0]["prompt_tokens"], rows[0]["completion_tokens"]) == (7, 5)
        assert rows[1]["stream"] and rows[1]["prompt_tokens"] == 7


async def test_redirect_referer_and_errors(tmp_path: Path) -> None:
    async with running_manager(make_config(tmp_path, MODELS)) as mgr:
        # The model's root without its slash: its pages' relative links need the slash.
        async with mgr.http.get(
            mgr.url + "/upstream/chat-model?q=1", allow_redirects=False
        ) as resp:
            assert resp.status == 308
            assert resp.headers["Location"] == "chat-model/?q=1"  # relative: any prefix

        # A page opened through /upstream/<model>/ calls absolute paths without a model.
        referer = {"Referer": mgr.url + "/upstream/chat/index.html"}
        async with mgr.http.get(mgr.url + "/props?z=2", headers=referer) as resp:
            assert resp.status == 200
            assert await resp.json() == {"served_by": "chat-model", "query": "z=2"}
        # A request that names its model goes to that model, whatever the Referer.
        chat = {"model": "embedder", "input": "x"}
        status, body = await mgr.post("/v1/embeddings", json=chat, headers=referer)
        assert status == 200 and body["object"] == "list"
        # No Referer, no model: no route, as before.
        async with mgr.http.get(mgr.url + "/props") as resp:
            assert resp.status == 404

        for path, status in [
            ("/upstream/nope/props", 404),
            ("/upstream/", 404),
            ("/upstream/chat/a/../props", 400),
            ("/upstream/chat/a%2Fb", 400),
        ]:
            async with mgr.http.get(URL(mgr.url + path, encoded=True)) as resp:
                assert resp.status == status, path
                assert "error" in json.loads(await resp.read())


async def test_passthrough_needs_the_api_key(tmp_path: Path) -> None:
    loaded = make_config(tmp_path, MODELS, api_keys=["sk-api"], admin_keys=["sk-admin"])
    async with running_manager(loaded) as mgr:
        async with mgr.http.get(mgr.url + "/upstream/chat/props") as resp:
            assert resp.status == 401
        assert mgr.supervisor.resolve("chat-model").state is State.STOPPED
        for key in ("sk-api", "sk-admin"):
            headers = {"Authorization": f"Bearer {key}"}
            async with mgr.http.get(mgr.url + "/upstream/chat/props", headers=headers) as resp:
                assert resp.status == 200, key


# --- the real llama.cpp web UI in a browser ------------------------------------------------

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium")
async def test_llama_cpp_web_ui_through_upstream(tmp_path: Path, tiny_models: Any) -> None:
    pytest.importorskip("xllamacpp", reason="needs the llama extra (xllamacpp)")
    playwright_api = pytest.importorskip("playwright.async_api")
    from tests.test_gateway_llama import engine

    models = {
        "tiny-chat": {
            "aliases": ["tiny"],
            "schemes": {"CPU": {"command": engine(tiny_models.chat)}},
        }
    }
    async with (
        running_manager(make_config(tmp_path, models)) as mgr,
        playwright_api.async_playwright() as pw,
    ):
        browser = await pw.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 760})
            paths: list[tuple[int, str]] = []
            page.on("response", lambda r: paths.append((r.status, URL(r.url).path)))
            # No trailing slash: redirected to the model's root, where relative links work.
            await page.goto(mgr.url + "/upstream/tiny")
            assert page.url == mgr.url + "/upstream/tiny/"
            box = page.get_by_placeholder("Type a message...")
            await playwright_api.expect(box).to_be_visible(timeout=30_000)
            await box.fill("Hello there, engine")
            before = len(await page.inner_text("body"))
            async with page.expect_response(
                lambda r: URL(r.url).path.endswith("/v1/chat/completions"), timeout=60_000
            ) as answered:
                await box.press("Enter")
            response = await answered.value
            assert response.status == 200
            assert URL(response.url).path == "/upstream/tiny/v1/chat/completions"
            await response.finished()
            # The engine's answer (gibberish from random weights) appears on the page.
            await page.wait_for_function(
                f"document.body.innerText.length > {before} + 40", timeout=30_000
            )
            await page.screenshot(path=str(tmp_path / "llama-ui.png"))
        finally:
            await browser.close()
        # The page, its scripts and its API calls all went through /upstream/tiny/.
        assert (200, "/upstream/tiny/props") in paths
        assert any(p.startswith("/upstream/tiny/_app/") and s == 200 for s, p in paths)
        assert all(p.startswith("/upstream/tiny") for _, p in paths), paths
        rows = [r for r in await records(mgr) if r["endpoint"].endswith("/chat/completions")]
        assert len(rows) == 1 and rows[0]["model"] == "tiny-chat" and rows[0]["status"] == 200
        assert rows[0]["stream"] and rows[0]["completion_tokens"] > 0  # usage from the SSE
        print("UI chat record:", rows[0])
