"""Minimal GGUF files written with gguf-py's own writer, for tests of the reader's checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter

N_EMBD, N_FF, N_HEAD, VOCAB = 32, 64, 4, 48


def llama_tensors(n_layers: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tensors = {
        "token_embd.weight": rng.standard_normal((VOCAB, N_EMBD)).astype(np.float32),
        "output_norm.weight": np.ones(N_EMBD, np.float32),
    }
    for il in range(n_layers):
        shapes = {
            "attn_norm": (N_EMBD,), "attn_q": (N_EMBD, N_EMBD), "attn_k": (N_EMBD, N_EMBD),
            "attn_v": (N_EMBD, N_EMBD), "attn_output": (N_EMBD, N_EMBD), "ffn_norm": (N_EMBD,),
            "ffn_gate": (N_FF, N_EMBD), "ffn_up": (N_FF, N_EMBD), "ffn_down": (N_EMBD, N_FF),
        }
        for kind, shape in shapes.items():
            tensors[f"blk.{il}.{kind}.weight"] = rng.standard_normal(shape).astype(np.float32) * 0.1
    return tensors


def write_llama(path: Path, arch: str = "llama", tensors: dict[str, np.ndarray] | None = None,
                raw: dict[str, tuple[np.ndarray, GGMLQuantizationType]] | None = None,
                n_layers: int = 1) -> Path:
    writer = GGUFWriter(path, arch)
    writer.add_block_count(n_layers)
    writer.add_embedding_length(N_EMBD)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_context_length(128)
    writer.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(VOCAB)])
    for name, array in (llama_tensors(n_layers) if tensors is None else tensors).items():
        writer.add_tensor(name, array)
    for name, (data, qtype) in (raw or {}).items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
