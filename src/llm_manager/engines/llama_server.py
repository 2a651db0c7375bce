"""``llm-manager llama-server``: llama.cpp's HTTP server from the ``xllamacpp`` wheel.

The ``xllamacpp`` package bundles a prebuilt llama.cpp (CPU wheels on PyPI, CUDA/ROCm/Vulkan
wheels from its own index) with llama.cpp's native C++ HTTP server inside the extension. Its
``xllamacpp.Server(CommonParams)`` starts that server on background C++ threads, then loads the
model (meanwhile ``/health`` answers 503 "Loading model", as with ``llama-server``); the calling
thread gets control back once the model is loaded (``/health`` then answers 200).
There is no separate ``llama-server`` executable in the wheel, so this module drives the server
in-process:

1. the common ``llama-server`` flags are parsed here and copied onto ``CommonParams``;
2. the model is loaded on a worker thread whose signal mask blocks SIGTERM/SIGINT, so that every
   llama.cpp thread (all started from it) inherits the block;
3. the main thread then waits for SIGTERM/SIGINT with ``sigwait`` and ends the process with
   status 0 at once.

While the model is loading (a C call that holds the GIL) SIGTERM/SIGINT keep their default
action and end the process immediately (status -15/-2): there is nothing to clean up yet.
On a stop signal the process exits with ``os._exit(0)`` rather than destroying the server:
``Server``'s destructor waits up to 30 s for in-flight streamed requests, while the process
exiting closes every socket at once (clients of in-flight requests see the connection close).

Served: llama.cpp's usual API (``/health``, ``/v1/models``, ``/v1/chat/completions`` with
streaming, ``/v1/completions``, ``/v1/embeddings`` with ``--embedding``, ``/v1/rerank`` and
``/rerank`` with ``--reranking``, ``/v1/messages``, ``/v1/responses``, ``/tokenize``, ...).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llm_manager.engines.llama_flags import gpu_layers

PROG = "llm-manager llama-server"
INSTALL_HINT = "pip install 'llm-manager[llama]'"
POOLING_CHOICES = ("none", "mean", "cls", "last", "rank")
# KV cache types llama-server accepts for -ctk/-ctv.
CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class EngineError(Exception):
    """A problem that ends the engine with a one-line message and status 1."""


def _gpu_layers(value: str) -> int:
    try:
        return gpu_layers(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid value {value!r}: expected a number, 'auto' or 'all'"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    """The accepted subset of llama.cpp ``llama-server`` flags (same spellings)."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Serve a GGUF model with the llama.cpp bundled in the xllamacpp package "
            "(llama.cpp's own HTTP server and API)."
        ),
    )
    p.add_argument("-m", "--model", required=True, help="GGUF model file.")
    p.add_argument("--host", default="127.0.0.1", help="Bind address (default 127.0.0.1).")
    p.add_argument("--port", type=int, default=8080, help="Port (default 8080).")
    p.add_argument("-a", "--alias", help="Model name(s) shown by /v1/models, comma-separated.")
    p.add_argument(
        "-c", "--ctx-size", type=int, help="Context size (0 = the model's training context)."
    )
    p.add_argument("-n", "--n-predict", type=int, help="Default maximum tokens to generate.")
    p.add_argument("-b", "--batch-size", type=int, help="Logical batch size.")
    p.add_argument("-ub", "--ubatch-size", type=int, help="Physical batch size.")
    p.add_argument("-np", "--parallel", type=int, help="Number of parallel slots.")
    p.add_argument("-t", "--threads", type=int, help="Threads for generation.")
    p.add_argument("-tb", "--threads-batch", type=int, help="Threads for prompt processing.")
    p.add_argument("--threads-http", type=int, help="Threads for HTTP requests.")
    p.add_argument(
        "-ngl",
        "--n-gpu-layers",
        "--gpu-layers",
        type=_gpu_layers,
        help="Layers to offload to the GPU (number, 'auto' or 'all').",
    )
    p.add_argument(
        "-ctk", "--cache-type-k", choices=CACHE_TYPES, help="KV cache type of K (default f16)."
    )
    p.add_argument(
        "-ctv", "--cache-type-v", choices=CACHE_TYPES, help="KV cache type of V (default f16)."
    )
    p.add_argument(
        "-nkvo", "--no-kv-offload", action="store_true", help="Keep the KV cache in host memory."
    )
    p.add_argument(
        "-ts", "--tensor-split", help="Share of the model per GPU, comma-separated (3,1)."
    )
    p.add_argument(
        "-fa",
        "--flash-attn",
        choices=("on", "off", "auto"),
        help="Flash attention (on, off, auto).",
    )
    p.add_argument(
        "--embedding",
        "--embeddings",
        action="store_true",
        help="Serve embeddings (/v1/embeddings) only.",
    )
    p.add_argument(
        "--reranking",
        "--rerank",
        action="store_true",
        help="Serve reranking (/v1/rerank); implies --embedding --pooling rank.",
    )
    p.add_argument("--pooling", choices=POOLING_CHOICES, help="Pooling for embeddings.")
    p.add_argument(
        "--chat-template", help="Chat template: a built-in name (chatml, ...) or Jinja text."
    )
    p.add_argument("--chat-template-file", help="File holding a Jinja chat template.")
    p.add_argument("--jinja", dest="jinja", action="store_true", default=None)
    p.add_argument("--no-jinja", dest="jinja", action="store_false")
    p.add_argument("--api-key", help="API key(s) clients must send, comma-separated.")
    p.add_argument("--seed", type=int, help="Default sampling seed.")
    p.add_argument("-to", "--timeout", type=int, help="HTTP read/write timeout in seconds.")
    p.add_argument("--no-warmup", action="store_true", help="Skip the warm-up run.")
    p.add_argument("--metrics", action="store_true", help="Enable /metrics.")
    p.add_argument("--slots", action="store_true", help="Enable /slots.")
    p.add_argument(
        "-lv",
        "--verbosity",
        "--log-verbosity",
        type=int,
        help="llama.cpp log verbosity (default 3 = info).",
    )
    p.add_argument("-cb", "--cont-batching", action="store_true", help="Accepted; always on.")
    return p


def _tensor_split(value: str) -> list[float]:
    try:
        shares = [float(v) for v in value.replace("/", ",").split(",") if v.strip()]
    except ValueError:
        raise EngineError(f"--tensor-split {value!r}: expected numbers such as 3,1") from None
    if not shares or any(v < 0 for v in shares):
        raise EngineError(f"--tensor-split {value!r}: expected numbers such as 3,1")
    return shares


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _params(xlc: Any, args: argparse.Namespace) -> Any:
    """Copy the parsed flags onto an ``xllamacpp.CommonParams``."""
    params = xlc.CommonParams()
    params.model.path = str(args.model)
    params.hostnames = [args.host]
    params.port = args.port
    if args.alias:
        params.model_alias = set(_split(args.alias))
    if args.ctx_size is not None:
        params.n_ctx = args.ctx_size
    if args.n_predict is not None:
        params.n_predict = args.n_predict
    if args.batch_size is not None:
        params.n_batch = args.batch_size
    if args.ubatch_size is not None:
        params.n_ubatch = args.ubatch_size
    if args.parallel is not None:
        params.n_parallel = args.parallel
    if args.threads is not None:
        params.cpuparams.n_threads = args.threads
        params.cpuparams_batch.n_threads = args.threads
    if args.threads_batch is not None:
        params.cpuparams_batch.n_threads = args.threads_batch
    if args.threads_http is not None:
        params.n_threads_http = args.threads_http
    if args.n_gpu_layers is not None:
        params.n_gpu_layers = args.n_gpu_layers
    for flag, name in (("cache_type_k", args.cache_type_k), ("cache_type_v", args.cache_type_v)):
        if name is not None:
            setattr(params, flag, getattr(xlc.ggml_type, "GGML_TYPE_" + name.upper()))
    if args.no_kv_offload:
        params.no_kv_offload = True
    if args.tensor_split:
        shares = _tensor_split(args.tensor_split)
        split = list(params.tensor_split)
        if len(shares) > len(split):
            raise EngineError(f"--tensor-split: at most {len(split)} devices")
        params.tensor_split = shares + [0.0] * (len(split) - len(shares))
    if args.flash_attn is not None:
        kinds = {"on": "ENABLED", "off": "DISABLED", "auto": "AUTO"}
        params.flash_attn_type = getattr(
            xlc.llama_flash_attn_type, "LLAMA_FLASH_ATTN_TYPE_" + kinds[args.flash_attn]
        )
    if args.embedding or args.reranking:
        params.embedding = True
    pooling = "rank" if args.reranking else args.pooling
    if pooling is not None:
        params.pooling_type = getattr(
            xlc.llama_pooling_type, "LLAMA_POOLING_TYPE_" + pooling.upper()
        )
    if args.chat_template_file:
        try:
            params.chat_template = Path(args.chat_template_file).read_text(encoding="utf-8")
        except OSError as e:
            raise EngineError(f"cannot read --chat-template-file: {e}") from None
    elif args.chat_template:
        params.chat_template = args.chat_template
        if args.jinja is None and "{" not in args.chat_template:
            # A built-in template's name (gemma, chatml...): llama.cpp only looks names up
            # with Jinja off; with it on the name itself would be rendered as the template.
            params.use_jinja = False
    if args.jinja is not None:
        params.use_jinja = args.jinja
    if args.api_key:
        params.api_keys = _split(args.api_key)
    if args.seed is not None:
        params.sampling.seed = args.seed
    if args.timeout is not None:
        params.timeout_read = args.timeout
        params.timeout_write = args.timeout
    if args.no_warmup:
        params.warmup = False
    if args.metrics:
        params.endpoint_metrics = True
    if args.slots:
        params.endpoint_slots = True
    if args.verbosity is not None:
        params.verbosity = args.verbosity
    return params


def _import_xllamacpp() -> Any:
    try:
        import xllamacpp  # type: ignore[import-untyped, unused-ignore]
    except ImportError as e:
        raise EngineError(
            f"the bundled llama.cpp engine needs the 'xllamacpp' package ({e}); "
            f"install it with: {INSTALL_HINT}"
        ) from None
    return xllamacpp


def _load(xlc: Any, params: Any) -> Any:
    """Start the server on a thread that blocks the stop signals (see the module doc)."""
    box: dict[str, Any] = {}

    def run() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            box["server"] = xlc.Server(params)
        except BaseException as e:  # reported by the caller
            box["error"] = e

    loader = threading.Thread(target=run, name="llama-load", daemon=True)
    loader.start()
    loader.join()
    if "error" in box:
        err = box["error"]
        raise EngineError(
            f"llama.cpp failed to start ({err}); its log above says why "
            "(unreadable model, port in use, ...)"
        )
    return box["server"]


def _stop_now(signum: int) -> None:
    name = signal.Signals(signum).name
    print(f"{PROG}: {name} received, exiting", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(0)


def serve(args: argparse.Namespace) -> int:
    """Load the model, serve until SIGTERM/SIGINT. Never returns once serving."""
    model = Path(args.model)
    if not model.is_file():
        raise EngineError(f"model file not found: {model}")
    xlc = _import_xllamacpp()
    params = _params(xlc, args)

    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:
        # During the load (C code holding the GIL) a stop signal ends the process at once.
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
    server = _load(xlc, params)
    if main_thread:
        # From here a stop signal means a clean exit with status 0. (In the moment between
        # the model becoming ready and this line, it still ends the process at once.)
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    version = getattr(xlc, "__version__", "?")
    print(
        f"{PROG}: serving {model} on {server.listening_address} "
        f"(llama.cpp from xllamacpp {version})",
        file=sys.stderr,
        flush=True,
    )
    if not main_thread:  # e.g. called from a test thread: serve until the process ends
        threading.Event().wait()
    signum = signal.sigwait(STOP_SIGNALS)
    _stop_now(signum)
    return 0  # pragma: no cover - _stop_now does not return


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``llm-manager llama-server ARGS``; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:  # --help (0) or a usage error (2), already printed
        return e.code if isinstance(e.code, int) else 2
    try:
        return serve(args)
    except EngineError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
