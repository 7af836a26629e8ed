"""Mixed-bit recipe search, after Apple's mixed-bit palettization pre-analysis (ml-stable-diffusion).

Apple scores each layer compressed alone, then compresses layers cumulatively from the least
damaging on, measuring the whole model at each step. Here, from the exact model down:

1. The LM head gets the fewest-bit candidate whose logits, over the exact layers, keep the
   golden bars on the calibration prompts (logit cosine at every position, pooled top-1). It
   goes first because a tied 262k-row head is most of the shipped bytes.
2. The layer tensors go down the ladder one rung at a time (float16, int8-channel, lut6-g16,
   lut4-g16). At each rung, every tensor that reached the rung above is scored alone, end to
   end as Apple scores: the model's final hidden state (after the output norm, the LM head's
   input) with only that tensor at the rung, against the exact one; loss = sum over positions
   of 1 - cosine. Tensors are ordered by the loss they add per bit they save.
3. The longest prefix of that order whose whole quantized stack keeps every target is found
   by bisection: every layer's cumulative hidden-state cosine, the final hidden state's (if
   asked), and the logit bars with the chosen head. The tensor that broke the prefix is
   skipped and the rest bisected again, a few rounds. Only the tensors kept at a rung are
   scored at the next.

The exact model keeps every target, so the result is never worse than float16, and every
compression kept was checked as a whole, not predicted from the scores (errors of different
tensors add only roughly). Scoring a rung only for the tensors that reached the one above keeps
the cost near two scores per tensor when the low rungs are out of reach. Only ANE-safe formats
are candidates unless GPU formats are allowed. The search runs on the calibration prompts; the
validators then check the result on the held-out golden prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from anepack.metrics import rowwise_cosine, top1_agreement
from anepack.quant.formats import Format, FormatSpecError, parse_format
from anepack.reference import build
from anepack.reference.common import rms_norm
from anepack.source.gguf_file import GGUFFile
from anepack.source.weights import LM_HEAD, stored_name
from anepack.validate.bits import recipe_bits
from anepack.validate.calibration import Importance
from anepack.validate.layers import exact_states
from anepack.validate.recipes import Recipe, Rule, tensor_layer
from anepack.validate.weights import quantizable_tensors, quantize_tensor

LAYER_LADDER = ("lut4-g16", "lut6-g16", "int8-channel")
GPU_LADDER = ("int4-block32",)
# In bits order; lut6-g4096 (one LUT per 4096 vocabulary rows) costs 0.0004 bits over lut6-tensor
# and on Gemma 3 270M's head keeps the top-1 bar that lut6-tensor misses (0.911 vs 0.880).
HEAD_LADDER = ("lut4-g16", "lut6-tensor", "lut6-g4096", "lut6-tensor-pcs", "int8-channel")
FP16 = parse_format("fp16")
# After the bisection finds where the cheapest-first order first breaks a target, the breaking
# move is dropped and the rest bisected again, this many times.
RETRY_ROUNDS = 3
LOGIT_BLOCK_POSITIONS = 64


@dataclass
class SearchResult:
    recipe: Recipe
    bits: dict[str, float]
    alone: dict[str, float]  # tensor -> loss (sum of 1 - cosine) alone at the last rung it was scored at
    layer_cosine: list[float]  # cumulative min cosine per layer on the calibration prompts
    final_cosine: float  # min cosine of the final (normed) hidden state on the calibration prompts
    head_cosine: float  # min logit cosine, every weight as assigned, on the calibration prompts
    head_top1: float  # pooled top-1 agreement, every weight as assigned, on the calibration prompts
    log: list[str] = field(default_factory=list)
    within_budget: bool = True  # the layers' average bits is at most the requested maximum


@dataclass(frozen=True)
class _Check:
    passed: bool
    layer_cosine: list[float]
    final_cosine: float
    logit_cosine: float
    top1: float


class _Quantized:
    """Dequantized tensors by (name, format), each computed once and kept in float16.

    Core ML's dequantization produces float16 values, so keeping them so loses nothing and
    halves what the search holds (a rung's candidates, the assigned formats and the head).
    """

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
            quantized = quantize_tensor(self.original(name), fmt, self.importance, name)
            dense = quantized.dequantize()
            assert dense.dtype == np.float16, dense.dtype
            self.dense[key] = dense
        return self.dense[key].astype(np.float32)

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
    ladder.sort(key=lambda fmt: fmt.payload_bytes((64, 1024)), reverse=True)  # most bits first
    cache = _Quantized(gguf, importance)
    layer_tensors = [t for t in quantizable_tensors(gguf) if t != LM_HEAD]
    output_norm = gguf.tensor("output_norm.weight")
    log: list[str] = []

    step("exact reference")
    states = exact_states(gguf, tokens, config.n_layers - 1)
    exact_final = [rms_norm(s[-1], output_norm, config.rms_eps) for s in states]
    exact_last = np.concatenate([s[-1] for s in states])
    expected = build(config, cache.source({})).final(exact_last)

    def logit_bars(model, last: np.ndarray) -> tuple[float, float]:
        # A block of positions at a time: all ~500 calibration positions' logits over a 262k
        # vocabulary would be 0.5 GB beside the exact ones.
        cosines, agree = [], []
        for start in range(0, len(last), LOGIT_BLOCK_POSITIONS):
            logits = model.final(last[start:start + LOGIT_BLOCK_POSITIONS])
            cosines.append(rowwise_cosine(expected[start:start + LOGIT_BLOCK_POSITIONS], logits))
            agree.append(top1_agreement(expected[start:start + LOGIT_BLOCK_POSITIONS], logits))
        return float(np.concatenate(cosines).min()), float(np.concatenate(agree).mean())

    # 1. The LM head, over the exact layers.
    head = FP16
    for spec in HEAD_LADDER:
        step(f"LM head {spec}")
        try:
            cosine, top1 = logit_bars(build(config, cache.source({LM_HEAD: parse_format(spec)})), exact_last)
        except FormatSpecError as error:  # e.g. a LUT group that does not divide the vocabulary
            log.append(f"{LM_HEAD} skips {spec}: {error}")
            continue
        log.append(f"{LM_HEAD} alone at {spec}: logit cosine {cosine:.4f}, top-1 {top1:.3f}")
        if cosine >= min_logit_cosine and top1 >= min_top1:
            head = parse_format(spec)
            break
        cache.dense.pop((LM_HEAD, spec), None)  # a 262k-row head is 335 MB per candidate

    def alone_loss(tensor: str, fmt: Format) -> float:
        """Sum over positions of 1 - cosine of the final state, only ``tensor`` compressed."""
        il = tensor_layer(tensor)
        model = build(config, cache.source({tensor: fmt}))
        hidden = [s[il] for s in states]
        for layer in range(il, config.n_layers):
            hidden = [model.layer(layer, x) for x in hidden]
        finals = [rms_norm(h, output_norm, config.rms_eps) for h in hidden]
        return float(sum(np.sum(1.0 - rowwise_cosine(e, f)) for e, f in zip(exact_final, finals)))

    def check(assignment: dict[str, Format]) -> _Check:
        model = build(config, cache.source({**assignment, LM_HEAD: head}))
        worst_layer, last = [1.0] * config.n_layers, []
        for state in states:
            hidden = state[0]
            for il in range(config.n_layers):
                hidden = model.layer(il, hidden)
                worst_layer[il] = min(worst_layer[il], float(rowwise_cosine(state[il + 1], hidden).min()))
            last.append(hidden)
        final = float(min(rowwise_cosine(e, rms_norm(h, output_norm, config.rms_eps)).min()
                          for e, h in zip(exact_final, last)))
        cosine, top1 = logit_bars(model, np.concatenate(last))
        passed = (min(worst_layer) >= min_layer_cosine and cosine >= min_logit_cosine and top1 >= min_top1
                  and (min_final_cosine is None or final >= min_final_cosine))
        return _Check(passed, worst_layer, final, cosine, top1)

    def payload_bits(tensor: str, fmt: Format) -> float:
        return 8.0 * fmt.payload_bytes(gguf.info(stored_name(gguf, tensor)).shape)

    # 2-3. Rung by rung down the ladder: score the tensors that reached the rung above, then keep
    # the longest passing prefix of the cheapest-first order.
    assignment: dict[str, Format] = {}
    current_loss = {tensor: 0.0 for tensor in layer_tensors}
    alone: dict[str, float] = {}
    best = check({})
    candidates = list(layer_tensors)
    for fmt in ladder:
        loss = {}
        for count, tensor in enumerate(candidates, start=1):
            step(f"scoring {count}/{len(candidates)} {tensor} at {fmt.spec}")
            try:
                loss[tensor] = alone[tensor] = alone_loss(tensor, fmt)
            except FormatSpecError as error:
                log.append(f"{tensor} skips {fmt.spec}: {error}")
        candidates = list(loss)
        added = {tensor: (loss[tensor] - current_loss[tensor])
                 / max(payload_bits(tensor, assignment.get(tensor, FP16)) - payload_bits(tensor, fmt), 1.0)
                 for tensor in candidates}
        remaining = sorted(candidates, key=lambda tensor: added[tensor])
        kept: list[str] = []
        for _ in range(RETRY_ROUNDS + 1):
            low, high = 0, len(remaining)  # the longest passing prefix has a length in [low, high]
            while low < high:
                middle = (low + high + 1) // 2
                step(f"{fmt.spec}: checking the stack with {len(kept) + middle} of {len(candidates)} tensors")
                result = check(assignment | {tensor: fmt for tensor in kept + remaining[:middle]})
                if result.passed:
                    low, best = middle, result
                else:
                    high = middle - 1
            kept += remaining[:low]
            if low == len(remaining):
                break
            log.append(f"{remaining[low]} at {fmt.spec} breaks a target: skipped")
            remaining = remaining[low + 1:]
        assignment |= {tensor: fmt for tensor in kept}
        current_loss |= {tensor: loss[tensor] for tensor in kept}
        # only the assigned formats are read again
        cache.dense = {key: value for key, value in cache.dense.items()
                       if key[0] == LM_HEAD or (key[0] in assignment and key[1] == assignment[key[0]].spec)}
        log.append(f"{fmt.spec}: {len(kept)} of {len(candidates)} tensors; stack: min layer cosine "
                   f"{min(best.layer_cosine):.4f}, logit cosine {best.logit_cosine:.4f}, top-1 {best.top1:.3f}")
        candidates = kept
        if not candidates:
            break

    assignment = {tensor: FP16 for tensor in layer_tensors} | assignment | {LM_HEAD: head}
    log += [f"{tensor}: {fmt.spec}" for tensor, fmt in assignment.items()]
    final = "" if min_final_cosine is None else f", the final hidden state's >= {min_final_cosine}"
    targets = (f"every layer's cumulative hidden-state cosine >= {min_layer_cosine}{final}, logit cosine >= "
               f"{min_logit_cosine} at every position and top-1 >= {min_top1} on the calibration prompts")
    recipe = _as_recipe(name, assignment, f"{targets}; budget {max_bpw} bits per weight")
    _, bits = recipe_bits(gguf, recipe)
    return SearchResult(recipe, bits, alone, best.layer_cosine, best.final_cosine, best.logit_cosine, best.top1,
                        log, within_budget=bits["layers_average"] <= max_bpw)


def _as_recipe(name: str, assignment: dict[str, Format], targets: str) -> Recipe:
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
    description = f"mixed-bit recipe from 'anepack recipe search': {targets}"
    recipe = Recipe(name, description, tuple(rules))
    return Recipe(name, description, tuple(rules), recipe.to_toml())
