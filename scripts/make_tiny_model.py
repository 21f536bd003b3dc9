"""Print the path of a cached tiny llama-architecture GGUF model, writing it first when missing.

    python scripts/make_tiny_model.py

The model has random weights (fixed seed: the file is byte-for-byte reproducible) and the real
SentencePiece tokenizer that llama.cpp ships as `models/ggml-vocab-llama-spm.gguf`, so
llama-server tokenizes, schedules and generates for real; the text is gibberish. It is about
17 MB and loads in well under a second. Its shape is `llamacpp_cache.TINY_MODEL_PARAMETERS`;
the context length is high because llama-server caps each slot's context at it.

Needs the llama.cpp source tree (`scripts/build_llama_server.py` fetches it) and the `gguf`
and `numpy` packages (dev dependencies). Environment: `ROWER_CACHE_DIR`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import gguf
import llamacpp_cache as cache
import numpy as np
from build_llama_server import ensure_source


def tokenizer_fields(vocab: Path) -> list[tuple[str, Any, gguf.GGUFValueType, Any]]:
    """Every `tokenizer.ggml.*` field of `vocab` as (key, value, type, element type)."""
    fields = []
    for key, field in gguf.GGUFReader(vocab).fields.items():
        if key.startswith("tokenizer.ggml."):
            element = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            fields.append((key, field.contents(), field.types[0], element))
    return fields


def write_model(path: Path, vocab: Path) -> None:
    """Write the tiny model to `path` (via a temporary file and an atomic rename)."""
    p = cache.TINY_MODEL_PARAMETERS
    n_embd, n_layer = int(p["n_embd"]), int(p["n_layer"])
    n_head, n_ff = int(p["n_head"]), int(p["n_ff"])
    tokenizer = tokenizer_fields(vocab)
    n_vocab = next(len(value) for key, value, *_ in tokenizer if key == "tokenizer.ggml.tokens")

    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    writer = gguf.GGUFWriter(partial, "llama")
    writer.add_name("rower-tiny-llama")
    writer.add_context_length(int(p["context_length"]))
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for key, value, value_type, element_type in tokenizer:
        writer.add_key_value(key, value, value_type, sub_type=element_type)

    rng = np.random.default_rng(int(p["seed"]))

    def weight(*shape: int) -> np.ndarray[Any, np.dtype[np.float32]]:
        return rng.normal(0.0, 0.02, size=shape).astype(np.float32)

    def norm() -> np.ndarray[Any, np.dtype[np.float32]]:
        return np.ones(n_embd, dtype=np.float32)

    # numpy shapes are (out, in); GGUF stores them reversed, as llama.cpp expects.
    writer.add_tensor("token_embd.weight", weight(n_vocab, n_embd))
    for layer in range(n_layer):
        block = f"blk.{layer}"
        writer.add_tensor(f"{block}.attn_norm.weight", norm())
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"{block}.{name}.weight", weight(n_embd, n_embd))
        writer.add_tensor(f"{block}.ffn_norm.weight", norm())
        writer.add_tensor(f"{block}.ffn_gate.weight", weight(n_ff, n_embd))
        writer.add_tensor(f"{block}.ffn_up.weight", weight(n_ff, n_embd))
        writer.add_tensor(f"{block}.ffn_down.weight", weight(n_embd, n_ff))
    writer.add_tensor("output_norm.weight", norm())
    writer.add_tensor("output.weight", weight(n_vocab, n_embd))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(partial, path)


def ensure_tiny_model() -> Path:
    """The cached tiny model, written when missing."""
    path = cache.tiny_model_path()
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    vocab = ensure_source() / "models" / str(cache.TINY_MODEL_PARAMETERS["vocab"])
    write_model(path, vocab)
    print(f"make_tiny_model: wrote {path.stat().st_size / 1e6:.1f} MB", file=sys.stderr)
    return path


def main() -> None:
    print(ensure_tiny_model())


if __name__ == "__main__":
    main()
