"""Write tiny random-weight GGUF models that llama.cpp loads and serves.

No downloads: every file is generated here with the ``gguf`` package's ``GGUFWriter``, from a
fixed seed, so the same call always writes the same bytes. The answers are gibberish (random
weights) but every endpoint works:

- :func:`write_chat_model`: ``llama`` architecture, 2 layers, 64-dim, byte-level BPE ("gpt2")
  tokenizer with a ChatML chat template, for ``/v1/chat/completions`` and ``/v1/completions``.
- :func:`write_embedding_model`: ``bert`` architecture (bidirectional), WordPiece ("bert")
  tokenizer, mean pooling, for ``/v1/embeddings`` (serve with ``--embedding``).
- :func:`write_reranker_model`: the same ``bert`` with a classification head (``cls``,
  ``cls.output``, one output label) and rank pooling, for ``/v1/rerank`` (serve with
  ``--reranking``).

Each file is well under 1 MB and takes milliseconds to write.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

#: Width of the chat model's hidden state.
CHAT_N_EMBD = 64
#: Length of the vectors the embedding model returns (its hidden size).
EMBEDDING_DIM = 64
#: Hidden size of the reranker.
RERANKER_N_EMBD = 64

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_SEED = 20240601


@dataclass(frozen=True)
class TinyModels:
    """Paths of the three generated models."""

    chat: Path
    embedding: Path
    reranker: Path


def write_all(directory: Path | str) -> TinyModels:
    """Write the chat, embedding and reranker models into ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    return TinyModels(
        chat=write_chat_model(d / "tiny-chat.gguf"),
        embedding=write_embedding_model(d / "tiny-embedding.gguf"),
        reranker=write_reranker_model(d / "tiny-reranker.gguf"),
    )


# --------------------------------------------------------------------------- helpers


def _rand(rng: np.random.Generator, *shape: int, std: float = 0.05) -> np.ndarray:
    """Random float32 weights. numpy shape is (rows, cols) = GGUF ne reversed."""
    return (rng.standard_normal(shape) * std).astype(np.float32)


def _ones(n: int) -> np.ndarray:
    return np.ones(n, dtype=np.float32)


def _zeros(n: int) -> np.ndarray:
    return np.zeros(n, dtype=np.float32)


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (byte-level BPE)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def _finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# --------------------------------------------------------------------------- chat (llama)


def write_chat_model(path: Path | str, *, n_layer: int = 2, context_length: int = 2048) -> Path:
    """A llama-architecture chat model with a byte-level BPE tokenizer and ChatML template."""
    path = Path(path)
    rng = np.random.default_rng(_SEED)
    n_embd, n_head, n_head_kv, n_ff = CHAT_N_EMBD, 4, 2, 128
    head_dim = n_embd // n_head

    # Vocabulary: the 256 byte tokens, a few merges, then the special tokens.
    b2u = _byte_to_unicode()
    tokens: list[str] = [b2u[b] for b in range(256)]
    sp = b2u[ord(" ")]
    merge_pairs = [
        ("h", "e"),
        (sp, "t"),
        (sp + "t", "he"),
        ("i", "n"),
        (sp, "a"),
        ("e", "r"),
        ("o", "n"),
        (sp, "w"),
        ("r", "e"),
        ("a", "t"),
    ]
    merges = []
    for left, right in merge_pairs:
        merges.append(f"{left} {right}")
        tokens.append(left + right)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    first_special = len(tokens)
    tokens.extend(specials)
    n_vocab = len(tokens)
    token_types = [gguf.TokenType.NORMAL] * first_special + [gguf.TokenType.CONTROL] * len(specials)
    endoftext, im_end = first_special, first_special + 2

    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny-chat")
    w.add_context_length(context_length)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(merges)
    w.add_bos_token_id(endoftext)
    w.add_eos_token_id(im_end)
    w.add_eot_token_id(im_end)
    w.add_pad_token_id(endoftext)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML_TEMPLATE)

    w.add_tensor("token_embd.weight", _rand(rng, n_vocab, n_embd))
    w.add_tensor("output_norm.weight", _ones(n_embd))
    w.add_tensor("output.weight", _rand(rng, n_vocab, n_embd, std=1.0))
    kv_dim = n_head_kv * head_dim
    for i in range(n_layer):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", _ones(n_embd))
        w.add_tensor(p + "attn_q.weight", _rand(rng, n_embd, n_embd))
        w.add_tensor(p + "attn_k.weight", _rand(rng, kv_dim, n_embd))
        w.add_tensor(p + "attn_v.weight", _rand(rng, kv_dim, n_embd))
        w.add_tensor(p + "attn_output.weight", _rand(rng, n_embd, n_embd))
        w.add_tensor(p + "ffn_norm.weight", _ones(n_embd))
        w.add_tensor(p + "ffn_gate.weight", _rand(rng, n_ff, n_embd))
        w.add_tensor(p + "ffn_up.weight", _rand(rng, n_ff, n_embd))
        w.add_tensor(p + "ffn_down.weight", _rand(rng, n_embd, n_ff))
    _finish(w)
    return path


# --------------------------------------------------------------------------- bert family


def _wordpiece_vocab() -> tuple[list[str], dict[str, int]]:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    words = ["the", "is", "of", "and", "to", "in", "what", "panda", "bear", "hello", "world"]
    pieces = ["##" + c for c in string.ascii_lowercase + string.digits]
    tokens = specials + chars + words + pieces
    assert len(set(tokens)) == len(tokens), "llama.cpp refuses duplicate tokens"
    return tokens, {t: i for i, t in enumerate(tokens)}


def _write_bert(
    path: Path,
    *,
    name: str,
    pooling: gguf.PoolingType,
    classifier: bool,
    n_embd: int,
    n_layer: int = 2,
    context_length: int = 512,
) -> Path:
    rng = np.random.default_rng(_SEED + (1 if classifier else 2))
    n_head, n_ff = 4, 128
    tokens, index = _wordpiece_vocab()
    n_vocab = len(tokens)
    token_types = [
        gguf.TokenType.CONTROL if t.startswith("[") else gguf.TokenType.NORMAL for t in tokens
    ]

    w = gguf.GGUFWriter(path, "bert")
    w.add_name(name)
    w.add_context_length(context_length)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_layer_norm_eps(1e-12)
    w.add_causal_attention(False)
    w.add_pooling_type(pooling)
    w.add_vocab_size(n_vocab)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    if classifier:
        w.add_classifier_output_labels(["relevance"])

    w.add_tokenizer_model("bert")
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_type_count(2)
    # As for real BERT GGUFs: [CLS] is BOS, [SEP] ends each segment, no EOS token (llama.cpp
    # uses SEP where EOS is absent, e.g. "[CLS] query [SEP] document [SEP]" for rerank).
    w.add_bos_token_id(index["[CLS]"])
    w.add_sep_token_id(index["[SEP]"])
    w.add_unk_token_id(index["[UNK]"])
    w.add_pad_token_id(index["[PAD]"])
    w.add_mask_token_id(index["[MASK]"])
    w.add_add_bos_token(True)
    w.add_add_sep_token(True)

    w.add_tensor("token_embd.weight", _rand(rng, n_vocab, n_embd, std=0.5))
    w.add_tensor("token_types.weight", _rand(rng, 2, n_embd))
    w.add_tensor("position_embd.weight", _rand(rng, context_length, n_embd))
    w.add_tensor("token_embd_norm.weight", _ones(n_embd))
    w.add_tensor("token_embd_norm.bias", _zeros(n_embd))
    for i in range(n_layer):
        p = f"blk.{i}."
        for t in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(p + t + ".weight", _rand(rng, n_embd, n_embd))
            w.add_tensor(p + t + ".bias", _zeros(n_embd))
        w.add_tensor(p + "attn_output_norm.weight", _ones(n_embd))
        w.add_tensor(p + "attn_output_norm.bias", _zeros(n_embd))
        w.add_tensor(p + "ffn_up.weight", _rand(rng, n_ff, n_embd))
        w.add_tensor(p + "ffn_up.bias", _zeros(n_ff))
        w.add_tensor(p + "ffn_down.weight", _rand(rng, n_embd, n_ff))
        w.add_tensor(p + "ffn_down.bias", _zeros(n_embd))
        w.add_tensor(p + "layer_output_norm.weight", _ones(n_embd))
        w.add_tensor(p + "layer_output_norm.bias", _zeros(n_embd))
    if classifier:
        w.add_tensor("cls.weight", _rand(rng, n_embd, n_embd, std=0.5))
        w.add_tensor("cls.bias", _zeros(n_embd))
        w.add_tensor("cls.output.weight", _rand(rng, 1, n_embd, std=0.5))
        w.add_tensor("cls.output.bias", _zeros(1))
    _finish(w)
    return path


def write_embedding_model(path: Path | str) -> Path:
    """A bert-architecture embedding model (mean pooling, ``EMBEDDING_DIM``-long vectors)."""
    return _write_bert(
        Path(path),
        name="tiny-embedding",
        pooling=gguf.PoolingType.MEAN,
        classifier=False,
        n_embd=EMBEDDING_DIM,
    )


def write_reranker_model(path: Path | str) -> Path:
    """A bert-architecture reranker: classification head ``cls``/``cls.output``, rank pooling."""
    return _write_bert(
        Path(path),
        name="tiny-reranker",
        pooling=gguf.PoolingType.RANK,
        classifier=True,
        n_embd=RERANKER_N_EMBD,
    )


if __name__ == "__main__":  # pragma: no cover - manual use: python -m tests.models.gguf_factory
    import sys

    out = write_all(sys.argv[1] if len(sys.argv) > 1 else ".")
    print(out)
