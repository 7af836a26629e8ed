"""Gemma 4 forward pass in numpy, following llama.cpp's ``src/models/gemma4.cpp`` step by step.

Embeddings scaled by sqrt(n_embd). Per layer: RMSNorm; Q with a per-head RMSNorm and no query
scaling (attention scale 1); K with its per-head RMSNorm; V from ``attn_v`` or, on layers
without it, K's own projection, normalized by a weightless RMSNorm; NEOX RoPE with the local
base on sliding-window layers and, on global layers, the global base with every pair's angle
divided by ``rope_freqs`` (proportional RoPE: factors of 1e30 leave pairs unrotated); head size
and KV head count per layer; post-attention norm, residual. FFN: a dense GELU-tanh-gated MLP
and, on MoE layers, beside it a routed expert bank (below); post-FFN norm, residual. Then the
per-layer embedding branch, then ``layer_output_scale``. Output norm, the LM head and a final
logit soft-cap close it. GGUF norm weights are used as stored (Gemma 4 has no ``1 + w``).

MoE layer (26B-A4B): the dense MLP on ``ffn_norm(x)`` is post-normed by ``post_ffw_norm_1``;
the router reads the weightless RMSNorm of ``x`` divided by sqrt(n_embd) times
``ffn_gate_inp.scale``, takes a softmax over all experts and the top ``n_expert_used``
renormalized (in float32); each chosen expert computes GELU(gate) * up from
``pre_ffw_norm_2(x)`` (gate and up halves of ``ffn_gate_up_exps``, or the split banks), then
down, times ``ffn_down_exps.scale[e]`` and its routing weight; the sum is post-normed by
``post_ffw_norm_2`` and added to the dense branch.

Routing goes through :attr:`Gemma4.router`, a hook ``(layer, logits, k) -> (experts, weights)``
that defaults to ``route_top_k``: ``RecordedRouting`` keeps the choices an engine made (the shard
runtime takes the same hook), ``ForcedRouting`` makes the reference route to them, so two
engines can be compared on the same experts where a near-tie made them choose differently.

Experts are read one at a time through :meth:`Gemma4.expert`. Every expert matmul is shown to
the observer under the name ``<bank>#e<index>`` (``blk.3.ffn_down_exps.weight#e17``) with only
the rows routed to that expert, so calibration collects importance per expert.

Per-layer embeddings (E2B/E4B) and KV sharing make a layer depend on more than its input
hidden state: ``embed`` computes every layer's per-layer input for the tokens it embeds, and a
layer whose keys and values are shared keeps them for the later layers that reuse them. Both
live in :attr:`Gemma4.sequence`, one sequence's at a time: ``embed`` sets it, then the layers
run in order (``forward`` does exactly that); ``embed_many`` keeps each prompt's and
``layer_many`` switches to it for that prompt's part of a layer. Models without either feature
(the 26B-A4B) keep no state between layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from anepack.errors import AnepackError
from anepack.reference.common import (
    MIN_ROUTING_WEIGHT_SUM, attention, attention_mask, rms_norm, rope, route_top_k, softcap, softmax,
)
from anepack.reference.model import Prompts, ReferenceModel
from anepack.source.config import Gemma4Config
from anepack.source.weights import EMBEDDING, LM_HEAD, PER_LAYER_EMBEDDING


# (layer, router logits [T, E], experts per token k) -> (experts [T, k], routing weights [T, k])
Router = Callable[[int, np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def own_routing(il: int, logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The model's routing: ``route_top_k`` (the layer does not change it)."""
    return route_top_k(logits, k)


class RecordedRouting:
    """Routes as the model does and keeps every MoE layer's choices, in call order (an engine
    that runs a prompt in chunks calls once per chunk)."""

    def __init__(self):
        self.calls: dict[int, list[np.ndarray]] = {}

    def __call__(self, il: int, logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        chosen, weights = route_top_k(logits, k)
        self.calls.setdefault(il, []).append(chosen)
        return chosen, weights

    def choices(self) -> dict[int, np.ndarray]:
        """Per MoE layer, the experts chosen for every position ``[T, k]``."""
        return {il: np.concatenate(calls) for il, calls in self.calls.items()}


# Two engines may choose differently only where the k-th and (k+1)-th experts' probabilities are
# this close (relative gap): float16 router logits are off by ~1e-2 at most.
NEAR_TIE = 0.05


@dataclass(frozen=True)
class RoutingDifference:
    """A position where forced experts are not the model's own top-k; ``gap`` is the model's
    k-th minus (k+1)-th expert probability relative to the k-th (small: a near-tie)."""

    layer: int
    position: int
    gap: float

    @property
    def near_tie(self) -> bool:
        return self.gap < NEAR_TIE


class ForcedRouting:
    """Routes to given experts (per MoE layer ``[T, k]``), weighted by the model's own
    probabilities renormalized over them as ``route_top_k`` renormalizes; keeps those
    probabilities to say where the model's own choice differs and by how much.

    The rows of a layer's choices are taken in call order, as ``RecordedRouting`` records them:
    one prompt's positions, or several prompts' run together (``prompt_logits``) one after the
    other; a difference's position counts in that order."""

    def __init__(self, choices: dict[int, np.ndarray]):
        self.choices = choices
        self.probabilities: dict[int, list[np.ndarray]] = {}

    def __call__(self, il: int, logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        probs = softmax(logits.astype(np.float32))
        calls = self.probabilities.setdefault(il, [])
        done = sum(len(call) for call in calls)
        calls.append(probs)
        chosen = self.choices[il][done:done + len(probs)]
        if len(chosen) != len(probs):
            raise ValueError(f"layer {il}: {len(self.choices[il])} forced positions, asked for {done + len(probs)}")
        picked = np.take_along_axis(probs, chosen, axis=-1)
        total = np.maximum(picked.sum(axis=-1, keepdims=True), np.float32(MIN_ROUTING_WEIGHT_SUM))
        return chosen, picked / total

    def differences(self) -> list[RoutingDifference]:
        """Every position of every routed layer where the forced experts differ from the model's own."""
        found = []
        for il, calls in sorted(self.probabilities.items()):
            probs = np.concatenate(calls)
            forced = self.choices[il][:len(probs)]
            k = forced.shape[1]
            own = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
            ranked = -np.sort(-probs, axis=-1)
            for t in np.flatnonzero([set(a) != set(b) for a, b in zip(own, forced)]):
                gap = (ranked[t, k - 1] - ranked[t, k]) / ranked[t, k - 1]
                found.append(RoutingDifference(il, int(t), float(gap)))
        return found


@dataclass
class SequenceState:
    """What later layers of one sequence read besides the hidden state."""

    n_tokens: int
    per_layer_inputs: np.ndarray | None  # [T, n_layers, n_embd_per_layer]
    # layer -> (positions, keys [T, Hkv, d] after norm and RoPE, values [T, Hkv, d])
    shared_kv: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)


class Gemma4(ReferenceModel):
    """Gemma 4 decoder over a weight source (``name -> float32 array``, numpy order)."""

    config: Gemma4Config
    sequence: SequenceState | None = None
    router: Router = staticmethod(own_routing)

    def expert(self, name: str, index: int) -> np.ndarray:
        """Expert ``index`` of the 3-D bank ``name`` as float32 ``[out, in]``.

        A weight source with an ``expert(name, index)`` method (a streaming GGUF source) is asked
        for that expert alone, on every use and without caching, so memory stays at one expert
        however many banks a run touches; any other source is asked for the whole bank once, which
        is cached and sliced.
        """
        read_one = getattr(self._source, "expert", None)
        if read_one is None:
            return self.weight(name)[index]
        return self.precision.weight(np.asarray(read_one(name, index), dtype=np.float32))

    def expert_linear(self, x: np.ndarray, name: str, index: int) -> np.ndarray:
        """``x @ W_e.T`` for expert ``index`` of bank ``name``, seen by the observer as ``name#e<index>``.

        Emulated arithmetic takes the activation type from the bank's storage type; Q4_1/Q5_1
        banks cannot be emulated (their correction term would need one expert's mins).
        """
        if self.observer is not None:
            self.observer(f"{name}#e{index}", x)
        weight = self.expert(name, index)
        if self.emulate is not None:
            return self.emulate.linear(x, weight, name)
        # An expert sees a few rows: BLAS is several times faster on W @ x.T than on x @ W.T there.
        return (weight @ x.T).T

    # -- embedding --------------------------------------------------------------------------

    def embed_tokens(self, tokens: np.ndarray) -> np.ndarray:
        cfg = self.config
        rows = self.gather(EMBEDDING, tokens)
        hidden = self.round(rows * np.float32(cfg.embed_scale), None, "embed")
        per_layer = self._per_layer_inputs(tokens, hidden) if cfg.n_embd_per_layer else None
        self.sequence = SequenceState(len(tokens), per_layer)
        return hidden

    def _per_layer_inputs(self, tokens: np.ndarray, hidden: np.ndarray) -> np.ndarray:
        """llama.cpp's ``project_per_layer_inputs``: ``[T, n_layers, n_embd_per_layer]``."""
        cfg, r = self.config, self.round
        shape = (len(tokens), cfg.n_layers, cfg.n_embd_per_layer)
        selected = self.gather(PER_LAYER_EMBEDDING, tokens).reshape(shape)
        selected = r(selected * np.float32(math.sqrt(cfg.n_embd_per_layer)), None, "per_layer_embd")
        projected = self.linear(hidden, "per_layer_model_proj.weight") * np.float32(1.0 / math.sqrt(cfg.n_embd))
        projected = r(projected, None, "per_layer_proj").reshape(shape)
        projected = r(rms_norm(projected, self.weight("per_layer_proj_norm.weight"), cfg.rms_eps), None,
                      "per_layer_proj_norm")
        return r((projected + selected) * np.float32(1.0 / math.sqrt(2.0)), None, "per_layer_inputs")

    # -- layer ------------------------------------------------------------------------------

    def block(self, il: int, hidden: np.ndarray, positions: np.ndarray) -> np.ndarray:
        residual, dense, routed_inputs = self._before_experts(il, hidden, positions)
        routed = self._expert_outputs(il, *routed_inputs) if routed_inputs is not None else None
        return self._after_experts(il, residual, dense, routed)

    def layer_many(self, il: int, prompts: Prompts) -> Prompts:
        """An MoE layer runs each prompt's attention, dense MLP and routing on its own, then every
        routed expert once over the rows all prompts routed to it (one read of each expert per
        layer instead of one per prompt), then each prompt's post-norms."""
        if not self.config.moe_layers[il]:
            return super().layer_many(il, prompts)
        parts = []
        for hidden, sequence in zip(prompts.hidden, prompts.sequences):
            self.sequence = sequence
            positions = self.precision.positions = np.arange(hidden.shape[0])
            with self._numerics():
                parts.append(self._before_experts(il, np.asarray(hidden, dtype=np.float32), positions))
        self.precision.positions = np.concatenate([np.arange(h.shape[0]) for h in prompts.hidden])
        joined = [np.concatenate(arrays) for arrays in zip(*(routed_inputs for _, _, routed_inputs in parts))]
        with self._numerics():
            routed = self._expert_outputs(il, *joined)
        ends = np.cumsum([h.shape[0] for h in prompts.hidden])[:-1]
        outputs = []
        for (residual, dense, _), routed_rows, sequence in zip(parts, np.split(routed, ends), prompts.sequences):
            self.sequence = sequence
            self.precision.positions = np.arange(residual.shape[0])
            with self._numerics():
                outputs.append(self._after_experts(il, residual, dense, routed_rows))
        return prompts.at(outputs)

    def _before_experts(self, il: int, hidden: np.ndarray, positions: np.ndarray) -> tuple:
        """Attention and the dense MLP; on an MoE layer also the routing: ``(residual, dense,
        (expert input, chosen experts, routing weights) or None)``."""
        cfg, r, w = self.config, self.round, self.layer_weight
        n_tokens, hd = hidden.shape[0], cfg.head_dim(il)

        x = r(rms_norm(hidden, w(il, "attn_norm"), cfg.rms_eps), il, "attn_norm")
        q = r(self.linear(x, f"blk.{il}.attn_q.weight"), il, "q").reshape(n_tokens, cfg.n_head[il], hd)
        q = r(rms_norm(q, w(il, "attn_q_norm"), cfg.rms_eps), il, "q_norm")
        q = r(self._rope(il, q, positions), il, "q_rope")
        k, v = self._keys_values(il, x, positions)

        mask = attention_mask(positions, positions, cfg.sliding_window if cfg.is_sliding(il) else None)
        mixed = attention(q, k, v, mask, 1.0, self.precision, il)
        attn_out = r(self.linear(mixed, f"blk.{il}.attn_output.weight"), il, "attn_output")
        attn_out = r(rms_norm(attn_out, w(il, "post_attention_norm"), cfg.rms_eps), il, "post_attention_norm")
        residual = r(attn_out + hidden, il, "attn_residual")

        dense = self._mlp(il, r(rms_norm(residual, w(il, "ffn_norm"), cfg.rms_eps), il, "ffn_norm"))
        if not cfg.moe_layers[il]:
            return residual, dense, None
        dense = r(rms_norm(dense, w(il, "post_ffw_norm_1"), cfg.rms_eps), il, "post_ffw_norm_1")
        return residual, dense, self._route(il, residual)

    def _after_experts(self, il: int, residual: np.ndarray, dense: np.ndarray, routed: np.ndarray | None) -> np.ndarray:
        """The routed experts' sum (MoE layers) joins the dense branch; post-FFN norm, residual,
        the per-layer embedding branch, ``layer_output_scale``."""
        cfg, r, w = self.config, self.round, self.layer_weight
        if routed is not None:
            routed = r(rms_norm(routed, w(il, "post_ffw_norm_2"), cfg.rms_eps), il, "post_ffw_norm_2")
            dense = r(dense + routed, il, "ffn_moe_combined")
        ffn_out = r(rms_norm(dense, w(il, "post_ffw_norm"), cfg.rms_eps), il, "post_ffw_norm")
        out = r(ffn_out + residual, il, "ffn_residual")

        if cfg.n_embd_per_layer:
            out = r(out + self._per_layer_embedding(il, out), il, "per_layer_residual")
        if cfg.output_scales[il]:
            out = r(out * w(il, "layer_output_scale"), il, "layer_output_scale")
        return out

    def _rope(self, il: int, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        cfg = self.config
        if cfg.is_sliding(il):
            return rope(x, positions, cfg.rope_base_local, neox=True, n_rot=cfg.n_rot(il))
        return rope(x, positions, cfg.rope_base, neox=True, n_rot=cfg.n_rot(il), freq_scale=cfg.rope_freq_scale,
                    freq_factors=self.weight("rope_freqs.weight"))

    def _keys_values(self, il: int, x: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cfg, r = self.config, self.round
        if not cfg.has_kv(il):
            return self._shared_keys_values(il, positions)
        shape = (x.shape[0], cfg.n_head_kv[il], cfg.head_dim(il))
        k = r(self.linear(x, f"blk.{il}.attn_k.weight"), il, "k").reshape(shape)
        v = r(self.linear(x, f"blk.{il}.attn_v.weight"), il, "v").reshape(shape) if cfg.value_projections[il] else k
        v = r(rms_norm(v, None, cfg.rms_eps), il, "v_norm")
        k = r(rms_norm(k, self.layer_weight(il, "attn_k_norm"), cfg.rms_eps), il, "k_norm")
        k = r(self._rope(il, k, positions), il, "k_rope")
        if any(cfg.kv_source(later) == il for later in range(cfg.first_shared_layer, cfg.n_layers)):
            self._state(il).shared_kv[il] = (positions, k, v)
        return k, v

    def _shared_keys_values(self, il: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        source = self.config.kv_source(il)
        stored = self._state(il).shared_kv.get(source)
        if stored is None or not np.array_equal(stored[0], positions):
            raise AnepackError(
                None, f"layer {il} reuses the keys and values of layer {source}: run layer {source} on this sequence first"
            )
        return stored[1], stored[2]

    def _state(self, il: int) -> SequenceState:
        if self.sequence is None:
            raise AnepackError(None, f"layer {il} needs per-sequence state: call embed(tokens) before running it")
        return self.sequence

    def _mlp(self, il: int, x: np.ndarray) -> np.ndarray:
        r = self.round
        gate = r(self.linear(x, f"blk.{il}.ffn_gate.weight"), il, "ffn_gate")
        up = r(self.linear(x, f"blk.{il}.ffn_up.weight"), il, "ffn_up")
        act = r(r(self.gelu_tanh(gate), il, "ffn_gelu") * up, il, "ffn_geglu")
        return r(self.linear(act, f"blk.{il}.ffn_down.weight"), il, "ffn_down")

    def _route(self, il: int, residual: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The expert bank's input ``pre_ffw_norm_2(residual)``, the chosen experts ``[T, k]`` and
        their routing weights ``[T, k]``."""
        cfg, r = self.config, self.round
        x = r(rms_norm(residual, self.layer_weight(il, "pre_ffw_norm_2"), cfg.rms_eps), il, "pre_ffw_norm_2")
        router_in = rms_norm(residual, None, cfg.rms_eps) * np.float32(1.0 / math.sqrt(cfg.n_embd))
        router_in = r(router_in * self.weight(f"blk.{il}.ffn_gate_inp.scale"), il, "router_in")
        logits = r(self.linear(router_in, f"blk.{il}.ffn_gate_inp.weight"), il, "router_logits")
        chosen, routing = self.router(il, logits, cfg.n_expert_used[il])
        return x, chosen, routing

    def _expert_outputs(self, il: int, x: np.ndarray, chosen: np.ndarray, routing: np.ndarray) -> np.ndarray:
        """The routed expert bank's weighted sum, before ``post_ffw_norm_2``: each chosen expert
        read once and run on the rows routed to it."""
        cfg, r = self.config, self.round
        n_ff = cfg.n_ff_exp[il]
        down_name = f"blk.{il}.ffn_down_exps.weight"
        scales = self.weight(f"blk.{il}.ffn_down_exps.scale") if cfg.expert_scales[il] else None
        out = np.zeros_like(x)
        for e in np.unique(chosen):
            rows, slots = np.nonzero(chosen == e)
            x_e = x[rows]
            if cfg.fused_gate_up[il]:
                gate_up = r(self.expert_linear(x_e, f"blk.{il}.ffn_gate_up_exps.weight", e), il, "ffn_moe_gate_up")
                gate, up = gate_up[:, :n_ff], gate_up[:, n_ff:]
            else:
                gate = r(self.expert_linear(x_e, f"blk.{il}.ffn_gate_exps.weight", e), il, "ffn_moe_gate")
                up = r(self.expert_linear(x_e, f"blk.{il}.ffn_up_exps.weight", e), il, "ffn_moe_up")
            act = r(r(self.gelu_tanh(gate), il, "ffn_moe_gelu") * up, il, "ffn_moe_geglu")
            down = r(self.expert_linear(act, down_name, e), il, "ffn_moe_down")
            weight = routing[rows, slots] if scales is None else routing[rows, slots] * scales[e]
            out[rows] += r(down * weight[:, None], il, "ffn_moe_weighted")
        return r(out, il, "ffn_moe_out")

    def _per_layer_embedding(self, il: int, hidden: np.ndarray) -> np.ndarray:
        cfg, r = self.config, self.round
        state = self._state(il)
        if state.n_tokens != hidden.shape[0]:
            raise AnepackError(
                None, f"layer {il} got {hidden.shape[0]} tokens but the last embed() had {state.n_tokens}"
            )
        gate = r(self.gelu_tanh(self.linear(hidden, f"blk.{il}.inp_gate.weight")), il, "per_layer_gate")
        gated = r(gate * state.per_layer_inputs[:, il, :], il, "per_layer_gated")
        projected = r(self.linear(gated, f"blk.{il}.proj.weight"), il, "per_layer_proj")
        return r(rms_norm(projected, self.layer_weight(il, "post_norm"), cfg.rms_eps), il, "per_layer_post_norm")

    # -- head -------------------------------------------------------------------------------

    def head(self, hidden: np.ndarray) -> np.ndarray:
        cfg = self.config
        x = self.round(rms_norm(hidden, self.weight("output_norm.weight"), cfg.rms_eps), None, "output_norm")
        logits = self.round(self.linear(x, LM_HEAD), None, "logits")
        if cfg.final_logit_softcap is None:
            return logits
        return self.round(softcap(logits, cfg.final_logit_softcap), None, "logits_softcapped")
