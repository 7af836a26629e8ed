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

The on-device E2B/E4B models add two things. Per-layer embeddings: each layer's per-layer input
is its rows of ``per_layer_model_proj`` applied to the token embeddings (input ``embedded``),
normed, plus the host's rows of the per-layer token table (``per_layer_<il>``); after the FFN
residual a gated branch adds ``post_norm(proj(gelu(inp_gate x) * per_layer_input))``. KV
sharing: the last layers project only queries and attend to an earlier layer's keys and values
(``Graph.attention``; docs/coreml-shards.md).
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
# Gemma 4 E2B/E4B: every layers package reads the token embeddings (times alpha) to project its
# layers' per-layer inputs, beside the host's per-layer token rows of each layer (``per_layer_<il>``).
EMBEDDED = "embedded"
PER_LAYER_PROJECTION = "per_layer_model_proj.weight"
PER_LAYER_NORM = "per_layer_proj_norm.weight"


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
    scaling, weightless V norm, V from K's projection on layers without ``attn_v``; a KV-shared
    layer (E2B/E4B) projects only its queries and attends to its source layer's keys and values."""
    cfg, p = g.config, f"blk_{il}_"
    n_head, n_kv, head_dim = g.arch.attention_dims(cfg, il)
    x = g.rms_norm(hidden, g.gain(f"blk.{il}.attn_norm.weight"), g.residual_eps, f"{p}attn_norm")
    q = g.heads(g.linear(x, f"blk.{il}.attn_q.weight", f"{p}q"), n_head, head_dim, f"{p}q_split")
    q = g.rms_norm(q, g.gain(f"blk.{il}.attn_q_norm.weight"), cfg.rms_eps, f"{p}q_norm")
    q = g.rope(q, il, f"{p}q_rope")
    k = v = None
    if cfg.has_kv(il):
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
    """``post_ffw_norm``, the residual add, the per-layer embedding branch (E2B/E4B) and
    ``layer_output_scale``."""
    cfg, p = g.config, f"blk_{il}_"
    ffn = g.rms_norm(ffn, g.gain(f"blk.{il}.post_ffw_norm.weight", g.alpha), cfg.rms_eps, f"{p}post_ffw_norm")
    per_layer, scaled = bool(cfg.n_embd_per_layer), cfg.output_scales[il]
    out = mb.add(x=residual, y=ffn, name=f"{p}ffn_residual" if per_layer or scaled else out_name)
    if per_layer:
        out = mb.add(x=out, y=_per_layer_branch(g, il, out), name=f"{p}per_layer_residual" if scaled else out_name)
    if scaled:
        out = mb.mul(x=out, y=g.gain(f"blk.{il}.layer_output_scale.weight"), name=out_name)
    return out


def _per_layer_input(g, il: int) -> Var:
    """Layer ``il``'s per-layer input ``[1, T, n_embd_per_layer]``: its rows of the projection of
    the token embeddings, normed, plus the host's per-layer token rows, over sqrt(2)."""
    cfg, p = g.config, f"blk_{il}_"
    width = cfg.n_embd_per_layer
    projected = g.linear(g.inputs[EMBEDDED], PER_LAYER_PROJECTION, f"{p}per_layer_projected",
                         (il * width, (il + 1) * width))
    projected = mb.mul(x=projected, y=np.float16(1.0 / math.sqrt(cfg.n_embd)), name=f"{p}per_layer_projected_scaled")
    # the embeddings carry alpha, and so does the projection: the norm's epsilon scales with it
    normed = g.rms_norm(projected, g.gain(PER_LAYER_NORM), g.residual_eps, f"{p}per_layer_projected_norm")
    summed = mb.add(x=normed, y=g.inputs[f"per_layer_{il}"], name=f"{p}per_layer_summed")
    return mb.mul(x=summed, y=np.float16(1.0 / math.sqrt(2.0)), name=f"{p}per_layer_input")


def _per_layer_branch(g, il: int, hidden: Var) -> Var:
    """``post_norm(proj(gelu_tanh(inp_gate(x)) * per_layer_input))`` of the residual stream ``x``."""
    cfg, p = g.config, f"blk_{il}_"
    gate = g.linear(hidden, f"blk.{il}.inp_gate.weight", f"{p}inp_gate")
    if g.alpha != 1.0:  # GELU is not linear: the gate must see x, not alpha * x (alpha: a power of two)
        gate = mb.mul(x=gate, y=np.float16(1.0 / g.alpha), name=f"{p}inp_gate_unscaled")
    gelu = mb.gelu(x=gate, mode="TANH_APPROXIMATION", name=f"{p}per_layer_gelu")
    gated = mb.mul(x=gelu, y=_per_layer_input(g, il), name=f"{p}per_layer_gated")
    projected = g.linear(gated, f"blk.{il}.proj.weight", f"{p}per_layer_proj")
    # the post-norm feeds the residual add: its gain carries alpha
    return g.rms_norm(projected, g.gain(f"blk.{il}.post_norm.weight", g.alpha), cfg.rms_eps, f"{p}per_layer_post_norm")


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
