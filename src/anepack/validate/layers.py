"""The layer validator: hidden-state cosine after chosen layers, isolated and cumulative, with blame.

For each chosen layer and every position of every calibration prompt:

- isolated: the exact reference's input to the layer, through the quantized layer, against the
  exact layer's output (what one layer costs on its own);
- cumulative: the quantized stack from the embedding up to that layer, against the exact stack
  (what the errors of all earlier layers add up to: the brief's failure hides here);
- blame: the layer run isolated with one tensor quantized at a time; each tensor's share of the
  layer's loss (1 - cosine, summed over positions) says which tensor to give more bits. An
  expert bank is one tensor here, whether its experts are quantized alone or together. Blame
  re-runs the layer once per tensor (on an MoE layer, every routed expert each time), so the
  pre-flight gate blames only the layers that fail it (``blame_below``).

The prompts go through each layer together (``layer_many``: an MoE layer reads each routed
expert once for all of them), and a chosen layer's isolated runs go with them, each from its
own ``embed``: a Gemma 4 layer may read per-sequence state besides its input (per-layer
embeddings, keys and values shared from an earlier layer). Run isolated, a layer that reuses
another layer's keys and values gets them from that layer run isolated on the same prompts first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from anepack.metrics import rowwise_cosine
from anepack.reference import build
from anepack.reference.model import Prompts
from anepack.source.gguf_file import GGUFFile
from anepack.source.weights import source_weights
from anepack.validate.recipes import tensor_layer
from anepack.validate.weights import RecipeWeights


def sample_layers(n_layers: int, count: int = 5) -> list[int]:
    """The first and last layers plus evenly spaced ones between: ``count`` layers in all."""
    if count >= n_layers:
        return list(range(n_layers))
    if count <= 1:
        return [0]
    return sorted({round(i * (n_layers - 1) / (count - 1)) for i in range(count)})


def parse_layer_choice(choice: str, n_layers: int) -> list[int]:
    """``sample``, ``all`` or a comma list like ``0,5,17``."""
    if choice == "all":
        return list(range(n_layers))
    if choice == "sample":
        return sample_layers(n_layers)
    from anepack.validate.recipes import parse_layers

    layers = sorted(parse_layers(choice))
    bad = [layer for layer in layers if layer >= n_layers]
    if bad:
        raise ValueError(f"layer {bad[0]} does not exist (the model has {n_layers})")
    return layers


@dataclass
class LayerCheck:
    layer: int
    isolated: np.ndarray  # cosine per position, all prompts concatenated
    cumulative: np.ndarray
    blame: list[dict]

    def passed(self, threshold: float) -> bool:
        return bool(self.isolated.min() >= threshold and self.cumulative.min() >= threshold)

    def result(self, threshold: float) -> dict:
        return {
            "layer": self.layer,
            "isolated_min": float(self.isolated.min()),
            "isolated_mean": float(self.isolated.mean()),
            "cumulative_min": float(self.cumulative.min()),
            "cumulative_mean": float(self.cumulative.mean()),
            "passed": self.passed(threshold),
            "blame": self.blame,
        }


def exact_states(
    gguf: GGUFFile, token_lists: Sequence[np.ndarray], last_layer: int, source=None
) -> list[list[np.ndarray]]:
    """Per prompt: the exact hidden state entering each layer 0..last_layer+1 (index 0 = embedding).

    ``source`` defaults to the GGUF's own weights; a recipe's ``RecipeWeights.exact`` shares the
    float32 copies the recipe already holds instead of making a second set.
    """
    model = build(gguf.config, source_weights(gguf) if source is None else source)
    prompts = model.embed_many(list(token_lists))
    states = [[hidden] for hidden in prompts.hidden]
    for il in range(last_layer + 1):
        prompts = model.layer_many(il, prompts)
        for per_layer, hidden in zip(states, prompts.hidden):
            per_layer.append(hidden)
    return states


def _kv_sources(config, layers: Sequence[int]) -> list[int]:
    """``layers`` plus the layers whose keys and values they reuse (Gemma 4 KV sharing), in order."""
    has_kv = getattr(config, "has_kv", None)
    needed = set(layers)
    if has_kv is not None:
        needed |= {config.kv_source(il) for il in layers if not has_kv(il)}
    return sorted(needed)


def _isolated(
    model, token_lists: Sequence[np.ndarray], states: list[list[np.ndarray]], layers: Sequence[int]
) -> dict[int, list[np.ndarray]]:
    """Each of ``layers`` of ``model`` on every prompt's exact input state (``states[p][il]``)."""
    # each prompt's per-sequence state (per-layer inputs, shared keys and values)
    prompts = model.embed_many(list(token_lists))
    outputs = {
        il: model.layer_many(il, prompts.at([exact[il] for exact in states])).hidden
        for il in _kv_sources(model.config, layers)
    }
    return {il: outputs[il] for il in layers}


def validate_layers(
    gguf: GGUFFile,
    weights: RecipeWeights,
    token_lists: Sequence[np.ndarray],
    layers: Sequence[int],
    with_blame: bool = True,
    progress: Callable[[str], None] | None = None,
    blame_below: float | None = None,
) -> list[LayerCheck]:
    """Isolated and cumulative cosine (and blame) for each of ``layers``; with ``blame_below``,
    blame only the layers whose isolated or cumulative minimum falls below it."""
    layers = sorted(layers)
    step = progress or (lambda _: None)
    step("exact reference")
    states = exact_states(gguf, token_lists, layers[-1], weights.exact)

    quantized = build(gguf.config, weights)
    cumulative: dict[int, np.ndarray] = {}
    isolated: dict[int, np.ndarray] = {}
    stack = quantized.embed_many(list(token_lists))
    alone = quantized.embed_many(list(token_lists))  # the isolated runs' own per-sequence state
    run_alone = set(_kv_sources(gguf.config, layers))
    for il in range(layers[-1] + 1):
        step(f"quantized stack, layer {il + 1} of {layers[-1] + 1}")
        if il in run_alone:
            # The stack and the layer on exact inputs go through together: an MoE layer then
            # reads each routed expert once for both.
            joined = Prompts(stack.hidden + [exact[il] for exact in states], stack.sequences + alone.sequences)
            outputs = quantized.layer_many(il, joined).hidden
            stack = stack.at(outputs[:len(token_lists)])
            if il in layers:
                isolated[il] = _cosines(states, il, outputs[len(token_lists):])
        else:
            stack = quantized.layer_many(il, stack)
        if il in layers:
            cumulative[il] = _cosines(states, il, stack.hidden)

    checks = []
    for il in layers:
        check = LayerCheck(il, isolated[il], cumulative[il], [])
        if with_blame and (blame_below is None or not check.passed(blame_below)):
            check.blame = _blame(gguf, weights, il, token_lists, states, step)
        checks.append(check)
    return checks


def _cosines(states: list[list[np.ndarray]], il: int, outputs: list[np.ndarray]) -> np.ndarray:
    """Per-position cosine of layer ``il``'s outputs against the exact ones, prompts concatenated."""
    return np.concatenate([rowwise_cosine(exact[il + 1], output) for exact, output in zip(states, outputs)])


def _blame(gguf, weights: RecipeWeights, il: int, token_lists, states, step) -> list[dict]:
    tensors = sorted(name for name in weights.quantizable if tensor_layer(name) == il)
    losses = {}
    minimums = {}
    for name in tensors:
        step(f"blame {name}")
        alone = build(gguf.config, weights.restricted({name}))
        cosines = _cosines(states, il, _isolated(alone, token_lists, states, [il])[il])
        losses[name] = float(np.sum(1.0 - cosines))
        minimums[name] = float(cosines.min())
    total = sum(losses.values())
    rows = []
    for name in sorted(tensors, key=lambda n: -losses[n]):
        rows.append({
            "tensor": name,
            "format": weights.recipe.format_for(name).spec,
            "bits_per_weight": float(weights.bits_per_weight(name)),
            "min_cosine": minimums[name],
            "share": losses[name] / total if total > 0 else 0.0,
        })
    return rows
