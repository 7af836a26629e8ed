"""Gemma 3 forward pass in numpy, following llama.cpp's ``src/models/gemma3.cpp`` step by step.

Embeddings scaled by sqrt(n_embd); per layer: RMSNorm, Q/K/V, per-head Q/K RMSNorm, NEOX RoPE
(local base on sliding-window layers, global base and linear scaling on the others), queries
scaled by ``attention_scale``, GQA attention, post-attention norm, residual; RMSNorm,
GELU-tanh(gate) * up, down, post-FFN norm, residual. Output norm and tied embeddings close it.
GGUF norm weights already include Gemma's ``+1``.
"""

from __future__ import annotations

import numpy as np

from anepack.reference.common import attention, attention_mask, rms_norm, rope
from anepack.reference.model import ReferenceModel
from anepack.source.config import Gemma3Config
from anepack.source.weights import EMBEDDING, LM_HEAD


class Gemma3(ReferenceModel):
    """Gemma 3 decoder over a weight source (``name -> float32 array``, numpy order)."""

    config: Gemma3Config

    def embed_tokens(self, tokens: np.ndarray) -> np.ndarray:
        rows = self.gather(EMBEDDING, tokens)
        return self.round(rows * np.float32(self.config.embed_scale), None, "embed")

    def block(self, il: int, hidden: np.ndarray, positions: np.ndarray) -> np.ndarray:
        cfg, r, w = self.config, self.round, self.layer_weight
        n_tokens, hd = hidden.shape[0], cfg.head_dim

        x = r(rms_norm(hidden, w(il, "attn_norm"), cfg.rms_eps), il, "attn_norm")
        q = r(self.linear(x, f"blk.{il}.attn_q.weight"), il, "q").reshape(n_tokens, cfg.n_head, hd)
        k = r(self.linear(x, f"blk.{il}.attn_k.weight"), il, "k").reshape(n_tokens, cfg.n_head_kv, hd)
        v = r(self.linear(x, f"blk.{il}.attn_v.weight"), il, "v").reshape(n_tokens, cfg.n_head_kv, hd)
        q = r(rms_norm(q, w(il, "attn_q_norm"), cfg.rms_eps), il, "q_norm")
        k = r(rms_norm(k, w(il, "attn_k_norm"), cfg.rms_eps), il, "k_norm")

        sliding = cfg.is_sliding(il)
        base = cfg.rope_base_local if sliding else cfg.rope_base
        freq_scale = 1.0 if sliding else cfg.rope_freq_scale
        q = rope(q, positions, base, neox=True, freq_scale=freq_scale)
        q = r(q * np.float32(cfg.attention_scale), il, "q_rope_scaled")
        k = r(rope(k, positions, base, neox=True, freq_scale=freq_scale), il, "k_rope")

        mask = attention_mask(positions, positions, cfg.sliding_window if sliding else None)
        mixed = attention(q, k, v, mask, 1.0, self.precision, il)
        attn_out = r(self.linear(mixed, f"blk.{il}.attn_output.weight"), il, "attn_output")
        attn_out = r(rms_norm(attn_out, w(il, "post_attention_norm"), cfg.rms_eps), il, "post_attention_norm")
        residual = r(attn_out + hidden, il, "attn_residual")

        x = r(rms_norm(residual, w(il, "ffn_norm"), cfg.rms_eps), il, "ffn_norm")
        gate = r(self.linear(x, f"blk.{il}.ffn_gate.weight"), il, "ffn_gate")
        up = r(self.linear(x, f"blk.{il}.ffn_up.weight"), il, "ffn_up")
        act = r(r(self.gelu_tanh(gate), il, "ffn_gelu") * up, il, "ffn_geglu")
        down = r(self.linear(act, f"blk.{il}.ffn_down.weight"), il, "ffn_down")
        down = r(rms_norm(down, w(il, "post_ffw_norm"), cfg.rms_eps), il, "post_ffw_norm")
        return r(down + residual, il, "ffn_residual")

    def head(self, hidden: np.ndarray) -> np.ndarray:
        x = self.round(rms_norm(hidden, self.weight("output_norm.weight"), self.config.rms_eps), None, "output_norm")
        return self.round(self.linear(x, LM_HEAD), None, "logits")
