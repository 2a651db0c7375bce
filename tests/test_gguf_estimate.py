"""The GGUF memory estimate (llm_manager.engines.gguf_estimate): argv parsing, the arithmetic
against generated GGUF files, scheme keys, and one check against the real bundled engine."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from llm_manager.config import SchemeConfig
from llm_manager.engines import gguf_estimate as ge
from llm_manager.engines.gguf_estimate import EstimateError, LlamaArgs, estimate, llama_args

gguf = pytest.importorskip("gguf", reason="needs the gguf package to write test models")

from tests.models.gguf_factory import TinyModels  # noqa: E402

MIB = 1 << 20


# ----------------------------------------------------------------------------- argv


@pytest.mark.parametrize(
    ("prefix", "launcher"),
    [
        (["llama-server"], "native"),
        (["/opt/llama.cpp/build/bin/llama-server"], "native"),
        (["llm-manager", "llama-server"], "cli"),
        (["/venv/bin/python3", "-m", "llm_manager", "llama-server"], "cli"),
        ([sys.executable, "-m", "llm_manager.engines.llama_server"], "module"),
    ],
)
def test_recognised_commands(prefix: list[str], launcher: str) -> None:
    args = llama_args([*prefix, "-m", "/m.gguf", "--port", "8080"])
    assert args == LlamaArgs(model=Path("/m.gguf"), launcher=launcher)


@pytest.mark.parametrize(
    "argv",
    [
        ["python", "-m", "http.server"],
        ["vllm", "serve", "-m", "x"],
        ["llm-manager", "serve"],
        ["llm-manager", "quickstart-model", "multilingual-e5-small", "--port", "1"],
        ["python", "server.py", "llama-server"],
        [],
    ],
)
def test_other_commands_are_none(argv: list[str]) -> None:
    assert llama_args(argv) is None


SHORT = "-m a.gguf -c 4096 -np 4 -ngl 20 -ctk q8_0 -ctv q4_0 -ts 3,1 -ub 256 -b 1024 -fa off -nkvo"
LONG = (
    "--model a.gguf --ctx-size 4096 --parallel 4 --n-gpu-layers 20 --cache-type-k q8_0 "
    "--cache-type-v q4_0 --tensor-split 3,1 --ubatch-size 256 --batch-size 1024 "
    "--flash-attn off --no-kv-offload"
)
EQUALS = (
    "--model=a.gguf --ctx-size=4096 --parallel=4 --gpu-layers=20 --cache-type-k=q8_0 "
    "--cache-type-v=Q4_0 --tensor-split=3,1 --ubatch-size=256 --batch-size=1024 "
    "--flash-attn=off -nkvo"
)


@pytest.mark.parametrize("flags", [SHORT, LONG, EQUALS])
def test_every_spelling(flags: str) -> None:
    args = llama_args(["llama-server", "--unknown", "x", *flags.split(), "--jinja"])
    assert args == LlamaArgs(
        model=Path("a.gguf"),
        ctx_size=4096,
        parallel=4,
        gpu_layers=20,
        cache_type_k="q8_0",
        cache_type_v="q4_0",
        tensor_split=(3.0, 1.0),
        ubatch_size=256,
        batch_size=1024,
        flash_attn="off",
        kv_offload=False,
    )


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["-ngl", "auto"], {"gpu_layers": -1}),
        (["-ngl", "all"], {"gpu_layers": 999}),
        (["-fa"], {"flash_attn": "on"}),  # the old bare switch
        (["-fa", "-c", "64"], {"flash_attn": "on", "ctx_size": 64}),
        (["-fa", "auto"], {"flash_attn": "auto"}),
        (["--embedding"], {"embedding": True}),
        (["--embeddings"], {"embedding": True}),
        (["--reranking"], {"embedding": True}),
        (["--swa-full", "-kvu"], {"swa_full": True, "kv_unified": True}),
    ],
)
def test_flag_values(flags: list[str], expected: dict[str, Any]) -> None:
    assert llama_args(["llama-server", "-m", "a.gguf", *flags]) == LlamaArgs(
        model=Path("a.gguf"), **expected
    )


def test_command_without_model_or_with_a_bad_number() -> None:
    with pytest.raises(EstimateError, match="no -m/--model"):
        llama_args(["llama-server", "-hf", "org/repo"])
    with pytest.raises(EstimateError, match="'many'"):
        llama_args(["llama-server", "-m", "a.gguf", "-c", "many"])


def test_quickstart_command(tmp_path: Path) -> None:
    from llm_manager import quickstart

    argv = ["/venv/bin/python", "-m", "llm_manager", "quickstart-model", "gemma-3-270m"]
    flags = ["--data-dir", str(tmp_path), "--host", "127.0.0.1", "--port", "9", "-c", "4096"]
    args = llama_args([*argv, *flags, "-n", "256", "--no-jinja", "--chat-template", "gemma"])
    assert args is not None
    assert (args.ctx_size, args.launcher) == (4096, "cli")
    # Not assembled yet: the header is read from the package's first chunk, if installed.
    assert args.model.name.startswith(quickstart.GGUF_NAME)
    target = quickstart.gguf_path(tmp_path)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"")
    args = llama_args(["llm-manager", "quickstart-model", "gemma-3-270m", f"--data-dir={tmp_path}"])
    assert args is not None and args.model == target


# ----------------------------------------------------------------------------- GGUF files


def write_model(
    path: Path,
    *,
    arch: str = "llama",
    n_layer: int = 4,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int | list[int] = 2,
    n_vocab: int = 100,
    sliding_window: int = 0,
    context_length: int = 8192,
) -> Path:
    """A GGUF with the metadata the estimate reads and one 1 KiB f32 tensor per layer part
    (never loaded by llama.cpp: only its header matters here)."""
    w = gguf.GGUFWriter(path, arch)
    w.add_context_length(context_length)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(128)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    if sliding_window:
        w.add_sliding_window(sliding_window)
    w.add_token_list([f"t{i}" for i in range(n_vocab)])
    kib = np.zeros(256, dtype=np.float32)
    w.add_tensor("token_embd.weight", np.zeros(1024, dtype=np.float32))  # 4 KiB
    w.add_tensor("output.weight", np.zeros(512, dtype=np.float32))  # 2 KiB
    for il in range(n_layer):
        w.add_tensor(f"blk.{il}.attn_q.weight", kib)
        w.add_tensor(f"blk.{il}.ffn_up.weight", kib)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def kv_bytes(cells: int, layers: int, n_head_kv: int, head_dim: int, k: float, v: float) -> float:
    """KV bytes by hand: cells x layers x heads x head_dim x bytes per element (K and V)."""
    return cells * layers * n_head_kv * head_dim * (k + v)


Q8_0 = 34 / 32  # bytes per element: 32-element blocks of 34 bytes
Q4_0 = 18 / 32


def test_type_table_matches_the_gguf_package() -> None:
    expected = {int(t): (t.name, *size) for t, size in gguf.GGML_QUANT_SIZES.items()}
    assert expected == ge.GGML_TYPES


def test_kv_cache_of_the_tiny_chat_model(tiny_models: TinyModels) -> None:
    # tiny-chat: 2 layers, 4 heads of 16, 2 KV heads. -c 1000 -np 3: 334 cells per sequence,
    # rounded up to 512 as llama.cpp does.
    args = llama_args(
        ["llama-server", "-m", str(tiny_models.chat), "-c", "1000", "-np", "3", "-ctk", "q8_0"]
    )
    assert args is not None
    result = estimate(args, gpus=0)
    expected = 3 * kv_bytes(512, 2, 2, 16, Q8_0, 2)
    assert result.parts["kv_host"] * MIB == pytest.approx(expected, abs=1e-6)
    assert result.parts["kv_gpu"] == 0
    assert result.gpu_mib == ()
    # Weights: every tensor of the file, all on the host without a GPU.
    header = ge.read_header(tiny_models.chat)
    assert result.parts["weights_host"] * MIB == sum(t.nbytes for t in header.tensors)


def test_default_context_is_the_training_context(tmp_path: Path) -> None:
    model = write_model(tmp_path / "m.gguf", context_length=3000)
    result = estimate(LlamaArgs(model=model, cache_type_v="q4_0"), gpus=0)
    # 3000 -> 3072 cells; 4 layers, 2 KV heads of 16.
    assert result.parts["kv_host"] * MIB == pytest.approx(kv_bytes(3072, 4, 2, 16, 2, Q4_0))
    assert "ctx 0 = training context 3000" in result.notes


def test_per_layer_kv_heads_and_sliding_window(tmp_path: Path) -> None:
    # gemma3: every 6th layer attends to the whole context, the others to n_swa 512
    # (+ n_ubatch 512 = 1024 cells). 12 layers: 2 full, 10 sliding.
    heads = [1, 2] * 6
    model = write_model(
        tmp_path / "g.gguf", arch="gemma3", n_layer=12, n_head_kv=heads, sliding_window=512
    )
    result = estimate(LlamaArgs(model=model, ctx_size=8192), gpus=0)
    full = [il for il in range(12) if il % 6 == 5]  # layers 5 and 11: two KV heads each
    expected = sum((8192 if il in full else 1024) * heads[il] * 16 * (2 + 2) for il in range(12))
    assert result.parts["kv_host"] * MIB == pytest.approx(expected)
    assert any("sliding-window" in n for n in result.notes)


def test_encoder_has_no_kv_cache(tiny_models: TinyModels) -> None:
    args = llama_args(["llama-server", "-m", str(tiny_models.embedding), "--embedding"])
    assert args is not None
    result = estimate(args, gpus=0)
    assert result.parts["kv_host"] == 0
    assert any("encoder" in n for n in result.notes)


def test_tensor_split_and_partial_offload(tmp_path: Path) -> None:
    # 4 layers + the output layer = 5 offloadable; each layer has 2 KiB of weights.
    model = write_model(tmp_path / "m.gguf", n_layer=4)
    kib = 1024 / MIB
    split = estimate(LlamaArgs(model=model, ctx_size=256, gpu_layers=99, tensor_split=(3, 1)), 2)
    # Positions 0/5..4/5 against cumulative starts (0, 0.75): layers 0-3 on GPU 0, the
    # output (position 0.8) on GPU 1; token embeddings stay on the host.
    assert split.parts["weights_gpu"] == pytest.approx(8 * kib + 2 * kib)
    assert split.parts["weights_host"] == pytest.approx(4 * kib)
    assert split.parts["kv_host"] == 0
    even = estimate(LlamaArgs(model=model, ctx_size=256, gpu_layers=3), gpus=2)
    # -ngl 3: the last three of the five, layers 2, 3 and the output, go to the GPUs
    # (positions 0, 1/3, 2/3 against starts (0, 0.5): GPU 0, 0, 1); layers 0-1 stay on the
    # host with their KV cache.
    assert even.parts["weights_host"] == pytest.approx(4 * kib + 2 * 2 * kib)
    assert even.parts["weights_gpu"] == pytest.approx(2 * 2 * kib + 2 * kib)
    per_layer = kv_bytes(256, 1, 2, 16, 2, 2) / MIB
    assert even.parts["kv_host"] == pytest.approx(2 * per_layer)
    assert even.parts["kv_gpu"] == pytest.approx(2 * per_layer)
    no_offload = estimate(LlamaArgs(model=model, ctx_size=256, gpu_layers=99, kv_offload=False), 1)
    assert no_offload.parts["kv_host"] == pytest.approx(4 * per_layer)


def test_gpu_layers_auto_is_all(tmp_path: Path) -> None:
    model = write_model(tmp_path / "m.gguf")
    result = estimate(LlamaArgs(model=model, ctx_size=256), gpus=1)
    assert result.parts["weights_host"] * MIB == 4096
    assert any("-ngl auto" in n for n in result.notes)
    assert result.gpu_mib[0] >= 1 and result.host_mib >= ge.ENGINE_BASELINE_MIB


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(EstimateError, match="model file not found: .*missing.gguf"):
        estimate(LlamaArgs(model=tmp_path / "missing.gguf"), 0)
    text = tmp_path / "notes.txt"
    text.write_text("hello world, not a model")
    with pytest.raises(EstimateError, match="is not a GGUF file"):
        estimate(LlamaArgs(model=text), 0)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(write_model(tmp_path / "whole.gguf").read_bytes()[:200])
    with pytest.raises(EstimateError, match="cut short"):
        estimate(LlamaArgs(model=cut), 0)
    with pytest.raises(EstimateError, match="unknown KV cache type 'q3'"):
        estimate(LlamaArgs(model=tmp_path / "whole.gguf", cache_type_k="q3"), 0)
    rnn = write_model(tmp_path / "rnn.gguf", arch="mamba")
    with pytest.raises(EstimateError, match="recurrent"):
        estimate(LlamaArgs(model=rnn), 0)


# ----------------------------------------------------------------------------- schemes


def scheme_of(**fields: Any) -> SchemeConfig:
    return SchemeConfig.model_validate(fields)


def test_estimate_scheme_maps_onto_keys(tmp_path: Path) -> None:
    write_model(tmp_path / "m.gguf")
    scheme = scheme_of(
        devices={"cuda:1": 1, "cpu": 1, "cuda:0": 1},
        command="llama-server -m {data_dir}/m.gguf --port {port} -a {name} -ngl 99 -ts 1,1",
    )
    mib = ge.estimate_scheme(scheme, name="m", data_dir=tmp_path, base_dir=tmp_path)
    full = ge.estimate_for_scheme(scheme, name="m", data_dir=tmp_path, base_dir=tmp_path)
    assert full is not None and mib is not None
    assert list(mib) == ["cuda:1", "cpu", "cuda:0"]
    assert mib == {"cuda:1": full.gpu_mib[0], "cuda:0": full.gpu_mib[1], "cpu": full.host_mib}
    assert min(mib.values()) >= 1


def test_estimate_scheme_relative_model_and_other_schemes(tmp_path: Path) -> None:
    write_model(tmp_path / "m.gguf")
    relative = scheme_of(devices={"cpu": 0}, command=["llama-server", "-m", "m.gguf"], cwd=".")
    assert ge.estimate_scheme(relative, name="m", data_dir=tmp_path, base_dir=tmp_path)
    script = tmp_path / "run.sh"
    script.write_text("exec true\n")
    for scheme in (
        scheme_of(devices={"cpu": 0}, script=str(script)),
        scheme_of(devices={"cpu": 0}, command="vllm serve org/model --port {port}"),
    ):
        assert ge.estimate_scheme(scheme, name="m", data_dir=tmp_path, base_dir=tmp_path) is None
    missing = scheme_of(devices={"cpu": 0}, command="llama-server -m /nowhere/x.gguf")
    with pytest.raises(EstimateError, match="not found"):
        ge.estimate_scheme(missing, name="m", data_dir=tmp_path, base_dir=tmp_path)


# ----------------------------------------------------------------------------- real engine

# The estimate of the tiny chat model is almost all ENGINE_BASELINE_MIB (its weights and
# buffers are 2 MiB). Runs of the same command measured RSS from 58.5 to 61.4 MiB, so the
# estimate must be within 15% of the measured RSS: a few MiB of run-to-run noise plus
# allocator slack, while a wrong baseline (say the interpreter alone, 23 MiB) fails.
RSS_TOLERANCE = 0.15


def tree_rss_mib(pid: int) -> float:
    psutil = pytest.importorskip("psutil")
    proc = psutil.Process(pid)
    procs = [proc, *proc.children(recursive=True)]
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total / MIB


def start_cli_engine(model: Path, log: Path, *flags: str) -> Any:
    """`python -m llm_manager llama-server ...`: the engine as a scheme's `llm-manager
    llama-server` command runs it (the CLI's imports are part of its footprint)."""
    from tests.test_llama_engine import START_TIMEOUT, Engine, _health, free_port

    port = free_port()
    cmd = [sys.executable, "-m", "llm_manager", "llama-server", "-m", str(model)]
    cmd += ["--port", str(port), "-t", "1", *flags]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    engine = Engine(proc, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        if _health(engine.url) == 200:
            return engine
        time.sleep(0.05)
    engine.stop()
    raise AssertionError(f"engine did not become healthy:\n{engine.log_text()[-3000:]}")


def test_host_estimate_matches_the_real_engine(tiny_models: TinyModels, tmp_path: Path) -> None:
    pytest.importorskip("xllamacpp", reason="needs the llama extra (xllamacpp)")
    flags = ["-c", "2048", "-np", "2"]
    args = llama_args(["llm-manager", "llama-server", "-m", str(tiny_models.chat), *flags])
    assert args is not None
    expected = estimate(args, gpus=0).host_mib
    engine = start_cli_engine(tiny_models.chat, tmp_path / "engine.log", *flags)
    try:
        peak = 0.0
        for _ in range(10):  # the peak over half a second after /health says ready
            peak = max(peak, tree_rss_mib(engine.proc.pid))
            time.sleep(0.05)
    finally:
        engine.stop()
    assert abs(expected - peak) <= RSS_TOLERANCE * peak, (expected, peak)
