"""Llama forward pass in numpy, following llama.cpp's ``src/models/llama.cpp`` step by step.

Per layer: RMSNorm, Q/K/V, NORM RoPE (adjacent pairs: llama.cpp's converter permutes the Q/K
rows of Hugging Face checkpoints so that this mode is the right one for GGUF weights; Llama 3.1+
divides every pair's angle by its ``rope_freqs`` factor, as llama.cpp's ``ggml_rope_ext``), GQA
attention scaled by 1/sqrt(head_dim), output projection, residual; RMSNorm, SiLU(gate) * up,
down, residual. Output norm, then ``output.weight`` or the tied token embeddings.
"""

from __future__ import annotations

import math

import numpy as np

from anepack.reference.common import attention, attention_mask, rms_norm, rope, silu
from anepack.reference.model import ReferenceModel
from anepack.source.config import LlamaConfig
from anepack.source.weights import EMBEDDING, LM_HEAD


class Llama(ReferenceModel):
    """Llama decoder over a weight source (``name -> float32 array``, numpy order)."""

    config: LlamaConfig

    def embed_tokens(self, tokens: np.ndarray) -> np.ndarray:
        return self.round(self.gather(EMBEDDING, tokens), None, "embed")

    def block(self, il: int, hidden: np.ndarray, positions: np.ndarray) -> np.ndarray:
        cfg, r, w = self.config, self.round, self.layer_weight
        n_tokens, hd = hidden.shape[0], cfg.head_dim

        x = r(rms_norm(hidden, w(il, "attn_norm"), cfg.rms_eps), il, "attn_norm")
        q = r(self.linear(x, f"blk.{il}.attn_q.weight"), il, "q").reshape(n_tokens, cfg.n_head, hd)
        k = r(self.linear(x, f"blk.{il}.attn_k.weight"), il, "k").reshape(n_tokens, cfg.n_head_kv, hd)
        v = r(self.linear(x, f"blk.{il}.attn_v.weight"), il, "v").reshape(n_tokens, cfg.n_head_kv, hd)
        factors = self.weight("rope_freqs.weight") if cfg.rope_freqs else None
        q = r(rope(q, positions, cfg.rope_base, neox=False, n_rot=cfg.rope_dim, freq_scale=cfg.rope_freq_scale,
                   freq_factors=factors), il, "q_rope")
        k = r(rope(k, positions, cfg.rope_base, neox=False, n_rot=cfg.rope_dim, freq_scale=cfg.rope_freq_scale,
                   freq_factors=factors), il, "k_rope")

        mixed = attention(q, k, v, attention_mask(positions, positions), 1.0 / math.sqrt(hd), self.precision, il)
        attn_out = r(self.linear(mixed, f"blk.{il}.attn_output.weight"), il, "attn_output")
        residual = r(attn_out + hidden, il, "attn_residual")

        x = r(rms_norm(residual, w(il, "ffn_norm"), cfg.rms_eps), il, "ffn_norm")
        gate = r(self.linear(x, f"blk.{il}.ffn_gate.weight"), il, "ffn_gate")
        up = r(self.linear(x, f"blk.{il}.ffn_up.weight"), il, "ffn_up")
        act = r(r(silu(gate), il, "ffn_silu") * up, il, "ffn_swiglu")
        down = r(self.linear(act, f"blk.{il}.ffn_down.weight"), il, "ffn_down")
        return r(down + residual, il, "ffn_residual")

    def head(self, hidden: np.ndarray) -> np.ndarray:
        x = self.round(rms_norm(hidden, self.weight("output_norm.weight"), self.config.rms_eps), None, "output_norm")
        return self.round(self.linear(x, LM_HEAD), None, "logits")
