"""Gemma 4 layer graphs for the shard builder, dense and Mixture-of-Experts, with the MoE split
around host-side routing (docs/moe-shards.md).

A dense layer is one graph, as Gemma 3's. An MoE layer is cut where the data-dependent choice
of experts happens, since an ANE graph is static:

- ``moe_trunk`` (end of a layer package): attention, the dense MLP with ``post_ffw_norm_1``, the
  router logits (fp16 router, never quantized) and ``pre_ffw_norm_2`` of the residual, the input
  every expert reads. Outputs ``residual``, ``dense``, ``expert_in``, ``router_logits``.
- ``expert``: one routed expert, ``down(gelu(gate x) * up x)``, a function of its own in an
  expert bank package (``expert_<e>_prefill`` / ``expert_<e>_decode``).
- ``moe_combine`` (start of the next package or of the head): ``post_ffw_norm_2`` of the routed
  sum the host made, plus the dense branch, ``post_ffw_norm``, residual, ``layer_output_scale``.

The host does the softmax, top-k, renormalization and ``ffn_down_exps.scale`` in float32
(``anepack.runtime.shards``), exactly as ``anepack.reference.gemma4``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Var

from anepack.coreml.weights import emit_weight
from anepack.quant import QuantizedTensor
from anepack.source.config import Gemma4Config
from anepack.validate.weights import RecipeWeights, expert_of

# Outputs of an MoE trunk, inputs of the combine that follows the experts.
TRUNK_OUTPUTS = ("residual", "dense", "expert_in", "router_logits")
COMBINE_INPUTS = ("residual", "dense", "routed")
EXPERT_INPUT, EXPERT_OUTPUT = "expert_in", "expert_out"


def expert_function(expert: int, mode: str) -> str:
    """The function of expert ``expert`` in a bank package, ``mode`` ``prefill`` or ``decode``."""
    return f"expert_{expert}_{mode}"


def expert_banks(config: Gemma4Config, il: int) -> list[str]:
    """The expert banks of MoE layer ``il``: the fused gate/up bank or the split ones, then down."""
    blk = f"blk.{il}"
    gate_up = [f"{blk}.ffn_gate_up_exps.weight"] if config.fused_gate_up[il] else [
        f"{blk}.ffn_gate_exps.weight", f"{blk}.ffn_up_exps.weight"
    ]
    return gate_up + [f"{blk}.ffn_down_exps.weight"]


def combine_tensors(config: Gemma4Config, il: int) -> list[str]:
    """What ``moe_combine`` of layer ``il`` reads (stored in the package that runs it)."""
    names = [f"blk.{il}.post_ffw_norm_2.weight", f"blk.{il}.post_ffw_norm.weight"]
    return names + ([f"blk.{il}.layer_output_scale.weight"] if config.output_scales[il] else [])


def expert_matrix(bank: QuantizedTensor, index: int) -> QuantizedTensor:
    """Expert ``index`` of a stored bank ``[E, Cout, Cin]`` as a stored ``[Cout, Cin]`` matrix.

    Its own LUTs or scales, or the bank's single shared scale/LUT when the format is per
    tensor over the whole bank (kept, so that failure mode stays representable).
    """
    one = expert_of(bank, index)
    changes = {
        field.name: array[0] for field in dataclasses.fields(one)
        if isinstance(array := getattr(one, field.name), np.ndarray)
    }
    if getattr(one, "vector_axis", None) is not None:
        changes["vector_axis"] = one.vector_axis - 1
    return dataclasses.replace(one, **changes)


def stored_expert(weights: RecipeWeights, bank: str, index: int) -> QuantizedTensor:
    """Expert ``index`` of ``bank`` as its package stores it, equal to what ``weights`` serves
    (``RecipeWeights.quantized_expert``: reused when the validators quantized the bank already,
    else quantized alone, so a build holds one float32 expert at a time)."""
    return expert_matrix(weights.quantized_expert(bank, index), 0)


# ---------------------------------------------------------------------------------------
# Graphs (``g`` is the builder's ``Graph``)


def attention_block(g, il: int, hidden: Var, name: str) -> Var:
    """Attention of Gemma 4 layer ``il`` added to the residual stream: q/k norms, no query
    scaling, weightless V norm, V from K's projection on layers without ``attn_v``."""
    cfg, p = g.config, f"blk_{il}_"
    n_head, n_kv, head_dim = g.arch.attention_dims(cfg, il)
    x = g.rms_norm(hidden, g.gain(f"blk.{il}.attn_norm.weight"), g.residual_eps, f"{p}attn_norm")
    q = g.heads(g.linear(x, f"blk.{il}.attn_q.weight", f"{p}q"), n_head, head_dim, f"{p}q_split")
    q = g.rms_norm(q, g.gain(f"blk.{il}.attn_q_norm.weight"), cfg.rms_eps, f"{p}q_norm")
    q = g.rope(q, il, f"{p}q_rope")
    k = g.heads(g.linear(x, f"blk.{il}.attn_k.weight", f"{p}k"), n_kv, head_dim, f"{p}k_split")
    if cfg.value_projections[il]:
        v = g.heads(g.linear(x, f"blk.{il}.attn_v.weight", f"{p}v"), n_kv, head_dim, f"{p}v_split")
    else:
        v = k
    v = g.rms_norm(v, None, cfg.rms_eps, f"{p}v_norm")
    k = g.rms_norm(k, g.gain(f"blk.{il}.attn_k_norm.weight"), cfg.rms_eps, f"{p}k_norm")
    k = g.rope(k, il, f"{p}k_rope")
    attn = g.linear(g.attention(il, q, k, v, p), f"blk.{il}.attn_output.weight", f"{p}attn_output")
    # Post-norms feed the residual adds: their gains carry alpha.
    post_gain = g.gain(f"blk.{il}.post_attention_norm.weight", g.alpha)
    attn = g.rms_norm(attn, post_gain, cfg.rms_eps, f"{p}post_attention_norm")
    return mb.add(x=hidden, y=attn, name=name)


def _dense_branch(g, il: int, residual: Var) -> Var:
    x = g.rms_norm(residual, g.gain(f"blk.{il}.ffn_norm.weight"), g.residual_eps, f"blk_{il}_ffn_norm")
    return g.gelu_mlp(x, il, f"blk_{il}_")


def _ffn_tail(g, il: int, residual: Var, ffn: Var, out_name: str) -> Var:
    """``post_ffw_norm``, the residual add and ``layer_output_scale``."""
    cfg, p = g.config, f"blk_{il}_"
    ffn = g.rms_norm(ffn, g.gain(f"blk.{il}.post_ffw_norm.weight", g.alpha), cfg.rms_eps, f"{p}post_ffw_norm")
    if not cfg.output_scales[il]:
        return mb.add(x=residual, y=ffn, name=out_name)
    out = mb.add(x=residual, y=ffn, name=f"{p}ffn_residual")
    return mb.mul(x=out, y=g.gain(f"blk.{il}.layer_output_scale.weight"), name=out_name)


def gemma4_layer(g, il: int, hidden: Var, out_name: str) -> Var:
    """A dense Gemma 4 layer (no router)."""
    residual = attention_block(g, il, hidden, f"blk_{il}_attn_residual")
    return _ffn_tail(g, il, residual, _dense_branch(g, il, residual), out_name)


def moe_trunk(g, il: int, hidden: Var) -> list[Var]:
    """MoE layer ``il`` up to the experts: ``residual`` (times alpha), ``dense`` (post-normed),
    ``expert_in`` (``pre_ffw_norm_2``) and ``router_logits``."""
    cfg, p = g.config, f"blk_{il}_"
    residual_name, dense_name, expert_name, logits_name = TRUNK_OUTPUTS
    residual = attention_block(g, il, hidden, residual_name)
    dense = g.rms_norm(_dense_branch(g, il, residual), g.gain(f"blk.{il}.post_ffw_norm_1.weight"), cfg.rms_eps,
                       dense_name)
    expert_in = g.rms_norm(residual, g.gain(f"blk.{il}.pre_ffw_norm_2.weight"), g.residual_eps, expert_name)
    # The router reads the weightless norm of the residual / sqrt(n_embd) * ffn_gate_inp.scale:
    # one gain, folded in float32 before its single rounding.
    router_gain = g.gain(f"blk.{il}.ffn_gate_inp.scale", 1.0 / math.sqrt(cfg.n_embd))
    router_in = g.rms_norm(residual, router_gain, g.residual_eps, f"{p}router_in")
    logits = g.linear(router_in, f"blk.{il}.ffn_gate_inp.weight", logits_name)
    return [residual, dense, expert_in, logits]


def moe_combine(g, il: int, residual: Var, dense: Var, routed: Var, out_name: str) -> Var:
    """MoE layer ``il`` after the experts: the routed sum post-normed, added to the dense branch."""
    cfg, p = g.config, f"blk_{il}_"
    routed = g.rms_norm(routed, g.gain(f"blk.{il}.post_ffw_norm_2.weight"), cfg.rms_eps, f"{p}post_ffw_norm_2")
    ffn = mb.add(x=dense, y=routed, name=f"{p}ffn_moe_combined")
    return _ffn_tail(g, il, residual, ffn, out_name)


def expert(g, il: int, index: int, x: Var, stored: dict[str, QuantizedTensor]) -> Var:
    """Expert ``index`` of layer ``il`` on ``x [1, T, D]``: ``down(gelu_tanh(gate x) * up x)``.

    ``stored`` maps each bank of the layer to this expert's stored matrix."""
    cfg, p = g.config, f"blk_{il}_e{index}_"

    def project(inputs: Var, bank: str, name: str) -> Var:
        weight_name = f"{bank.replace('.', '_')}_e{index}"
        return g.project(inputs, emit_weight(stored[bank], weight_name), weight_name, name)

    banks = expert_banks(cfg, il)
    if cfg.fused_gate_up[il]:
        gate_up = project(x, banks[0], f"{p}gate_up")
        gate, up = mb.split(x=gate_up, num_splits=2, axis=-1, name=f"{p}gate_up_halves")
    else:
        gate, up = project(x, banks[0], f"{p}gate"), project(x, banks[1], f"{p}up")
    act = mb.mul(x=mb.gelu(x=gate, mode="TANH_APPROXIMATION", name=f"{p}gelu"), y=up, name=f"{p}geglu")
    return project(act, banks[-1], EXPERT_OUTPUT)
