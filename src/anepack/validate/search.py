"""Mixed-bit recipe search, after Apple's mixed-bit palettization (ml-stable-diffusion).

1. Score each tensor alone, end to end as Apple does: the model's final hidden state (after the
   output norm, the LM head's input) with only that tensor compressed at the cheapest candidate
   format, against the exact one, on the calibration prompts.
2. Add tensors cumulatively, least damaging first: each gets the fewest bits whose quantized
   stack (every tensor assigned so far) keeps every layer's cumulative hidden-state cosine at or
   above the layer target and, when one is given, the final hidden state's cosine at or above
   the final target; a tensor no candidate satisfies stays float16. The ladder is bisected
   (more bits never hurt), so a tensor costs about two trials, not one per rung.
3. The LM head gets the fewest-bit candidate whose logits, with all layers as assigned, keep
   the golden bars on the calibration prompts (cosine at every position, pooled top-1).

Only ANE-safe formats are candidates unless GPU formats are allowed. The search runs on the
calibration prompts; the validators then check the result on the held-out golden prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from anepack.metrics import rowwise_cosine, top1_agreement
from anepack.quant import quantize
from anepack.quant.formats import Format, parse_format
from anepack.reference import build
from anepack.reference.common import rms_norm
from anepack.source.gguf_file import GGUFFile
from anepack.source.weights import LM_HEAD, stored_name
from anepack.validate.bits import recipe_bits
from anepack.validate.calibration import Importance
from anepack.validate.layers import exact_states
from anepack.validate.recipes import Recipe, Rule, tensor_layer
from anepack.validate.weights import quantizable_tensors

LAYER_LADDER = ("lut3-g16", "lut4-g16", "lut6-g16", "int8-channel")
GPU_LADDER = ("int4-block32",)
HEAD_LADDER = ("lut4-g16", "lut6-tensor", "int8-channel")
FP16 = parse_format("fp16")


@dataclass
class SearchResult:
    recipe: Recipe
    bits: dict[str, float]
    alone: dict[str, float]  # tensor -> loss (sum of 1 - cosine) alone at the cheapest candidate
    layer_cosine: list[float]  # cumulative min cosine per layer on the calibration prompts
    final_cosine: float  # min cosine of the final (normed) hidden state on the calibration prompts
    head_cosine: float
    head_top1: float
    log: list[str] = field(default_factory=list)
    within_budget: bool = True  # the layers' average bits is at most the requested maximum


class _Quantized:
    """Dequantized tensors by (name, format), each computed once."""

    def __init__(self, gguf: GGUFFile, importance: Importance | None):
        self.gguf = gguf
        self.importance = importance
        self.exact: dict[str, np.ndarray] = {}
        self.dense: dict[tuple[str, str], np.ndarray] = {}

    def original(self, name: str) -> np.ndarray:
        stored = stored_name(self.gguf, name)
        if stored not in self.exact:
            self.exact[stored] = self.gguf.tensor(stored)
        return self.exact[stored]

    def get(self, name: str, fmt: Format) -> np.ndarray:
        key = (name, fmt.spec)
        if key not in self.dense:
            columns = None if self.importance is None else self.importance.get(name)
            self.dense[key] = quantize(self.original(name), fmt, columns).dequantize().astype(np.float32)
        return self.dense[key]

    def source(self, assignment: dict[str, Format]) -> Callable[[str], np.ndarray]:
        return lambda name: self.get(name, assignment[name]) if name in assignment else self.original(name)


def search_recipe(
    gguf: GGUFFile,
    tokens: Sequence[np.ndarray],
    importance: Importance | None,
    min_layer_cosine: float,
    max_bpw: float,
    name: str = "searched",
    allow_gpu_formats: bool = False,
    min_logit_cosine: float = 0.97,
    min_top1: float = 0.90,
    progress: Callable[[str], None] | None = None,
    min_final_cosine: float | None = None,
) -> SearchResult:
    step = progress or (lambda _: None)
    config = gguf.config
    ladder = [parse_format(spec) for spec in LAYER_LADDER + (GPU_LADDER if allow_gpu_formats else ())]
    ladder.sort(key=lambda fmt: fmt.payload_bytes((64, 1024)))
    cache = _Quantized(gguf, importance)
    layer_tensors = [t for t in quantizable_tensors(gguf) if t != LM_HEAD]
    output_norm = gguf.tensor("output_norm.weight")
    log: list[str] = []

    step("exact reference")
    states = exact_states(gguf, tokens, config.n_layers - 1)

    def normed(hidden: np.ndarray) -> np.ndarray:
        return rms_norm(hidden, output_norm, config.rms_eps)

    exact_final = [normed(s[-1]) for s in states]

    def cosines(outputs, il: int) -> np.ndarray:
        return np.concatenate([rowwise_cosine(s[il + 1], out) for s, out in zip(states, outputs)])

    def final_cosines(last: list[np.ndarray]) -> np.ndarray:
        return np.concatenate([rowwise_cosine(e, normed(h)) for e, h in zip(exact_final, last)])

    # quantized-stack inputs per layer under the current assignment; index il = input to layer il
    current = [[s[il] for s in states] for il in range(config.n_layers + 1)]

    def run_from(il_start: int, trial: dict[str, Format], inputs) -> tuple[float, np.ndarray, list[list[np.ndarray]]]:
        """(worst layer cosine, final-state cosine per position, per-layer outputs) from ``il_start`` on."""
        model = build(config, cache.source(trial))
        worst, hidden, new_states = 1.0, inputs, []
        for il in range(il_start, config.n_layers):
            hidden = [model.layer(il, x) for x in hidden]
            new_states.append(hidden)
            worst = min(worst, float(cosines(hidden, il).min()))
        return worst, final_cosines(hidden), new_states

    # The order needs each tensor's end-to-end damage at the cheapest candidate only.
    cheapest = ladder[0]
    alone: dict[str, float] = {}
    for count, tensor in enumerate(layer_tensors, start=1):
        il = tensor_layer(tensor)
        step(f"scoring {count}/{len(layer_tensors)} {tensor} at {cheapest.spec}")
        final = run_from(il, {tensor: cheapest}, [s[il] for s in states])[1]
        alone[tensor] = float(np.sum(1.0 - final))

    def keeps_targets(worst_layer: float, final: np.ndarray) -> bool:
        return worst_layer >= min_layer_cosine and (min_final_cosine is None or float(final.min()) >= min_final_cosine)

    assignment: dict[str, Format] = {}
    order = sorted(layer_tensors, key=lambda t: alone[t])
    for count, tensor in enumerate(order, start=1):
        il = tensor_layer(tensor)
        trials: dict[int, list[list[np.ndarray]]] = {}
        low, high = 0, len(ladder)  # the answer is in [low, high]; len(ladder) means float16
        while low < high:
            middle = (low + high) // 2
            step(f"adding {count}/{len(order)} {tensor} {ladder[middle].spec}")
            worst, final, new_states = run_from(il, {**assignment, tensor: ladder[middle]}, current[il])
            if keeps_targets(worst, final):
                trials[middle], high = new_states, middle
            else:
                low = middle + 1
        chosen = ladder[low] if low < len(ladder) else FP16
        if low not in trials:
            trials[low] = run_from(il, {**assignment, tensor: chosen}, current[il])[2]
        current[il + 1:] = trials[low]
        assignment[tensor] = chosen
        log.append(f"{tensor}: {chosen.spec}")
    layer_cosine = [float(cosines(current[il + 1], il).min()) for il in range(config.n_layers)]
    final_cosine = float(final_cosines(current[-1]).min())

    exact_model = build(config, cache.source({}))
    expected = [exact_model.final(s[-1]) for s in states]
    head_choice, head_cos, head_top1 = FP16, 1.0, 1.0
    for spec in HEAD_LADDER:
        fmt = parse_format(spec)
        step(f"LM head {spec}")
        model = build(config, cache.source({**assignment, LM_HEAD: fmt}))
        logits = [model.final(h) for h in current[-1]]
        cos = min(float(rowwise_cosine(e, l).min()) for e, l in zip(expected, logits))
        top1 = float(np.concatenate([top1_agreement(e, l) for e, l in zip(expected, logits)]).mean())
        if cos >= min_logit_cosine and top1 >= min_top1:
            head_choice, head_cos, head_top1 = fmt, cos, top1
            break
    assignment[LM_HEAD] = head_choice
    log.append(f"{LM_HEAD}: {head_choice.spec}")

    recipe = _as_recipe(name, assignment, min_layer_cosine, min_final_cosine, max_bpw)
    _, bits = recipe_bits(gguf, recipe)
    return SearchResult(recipe, bits, alone, layer_cosine, final_cosine, head_cos, head_top1, log,
                        within_budget=bits["layers_average"] <= max_bpw)


def _as_recipe(
    name: str, assignment: dict[str, Format], min_cos: float, min_final: float | None, max_bpw: float
) -> Recipe:
    """One exact-name rule per tensor, grouped into per-kind rules where a kind shares a format."""
    by_kind: dict[str, dict[str, list[int]]] = {}
    for tensor, fmt in assignment.items():
        layer = tensor_layer(tensor)
        kind = tensor if layer is None else tensor.split(".", 2)[2]
        by_kind.setdefault(kind, {}).setdefault(fmt.spec, []).append(-1 if layer is None else layer)
    rules = []
    for kind, formats in sorted(by_kind.items()):
        for spec, layers in sorted(formats.items()):
            pattern = kind if layers == [-1] else f"blk.*.{kind}"
            rules.append(Rule(pattern, parse_format(spec), None if layers == [-1] else frozenset(layers)))
    final = "" if min_final is None else f", the final hidden state's >= {min_final}"
    description = (f"mixed-bit recipe from 'anepack recipe search': every layer's cumulative hidden-state "
                   f"cosine >= {min_cos}{final} on the calibration prompts; budget {max_bpw} bits per weight")
    recipe = Recipe(name, description, tuple(rules))
    return Recipe(name, description, tuple(rules), recipe.to_toml())
