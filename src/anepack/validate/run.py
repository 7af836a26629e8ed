"""Validation runs end to end: calibrate, quantize by recipe, measure, and fill a run record.

``ValidationContext`` holds what every check of one model shares (the open GGUF, tokenized
calibration and validation prompts, importance); ``layers_run``, ``golden_run`` and
``gate_run`` each return a run record for the history and the report. The pre-flight gate is
the layer check on a sample of layers; ``require_gate`` is what a full build calls first.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from anepack.errors import AnepackError
from anepack.golden import Golden, Prompt, Thresholds as GoldenThresholds, compare, load_prompts, verdict
from anepack.metrics import routing_agreement
from anepack.reference import build
from anepack.reference.gemma4 import RecordedRouting
from anepack.source.default_model import cache_dir
from anepack.source.config import routes_experts
from anepack.source.fingerprint import file_fingerprint
from anepack.source.gguf_file import GGUFFile
from anepack.validate.bits import recipe_bits
from anepack.validate.calibration import Importance, load_or_collect
from anepack.validate.layers import sample_layers, validate_layers
from anepack.validate.quantized_store import QuantizedStore
from anepack.validate.recipes import Recipe
from anepack.validate.record import DEFAULT_THRESHOLDS, RunRecord, new_record
from anepack.validate.weights import RecipeWeights, quantizable_tensors

Progress = Callable[[str], None]


def calibration_prompts_path() -> Path:
    from importlib import resources

    return Path(str(resources.files("anepack") / "data" / "calibration.jsonl"))


def tokenize(gguf: GGUFFile, prompts: list[Prompt]) -> list[np.ndarray]:
    """Token ids of each prompt from the model's own vocabulary."""
    from anepack.tokenizer import Tokenizer

    with Tokenizer(gguf.path) as tokenizer:
        return [np.asarray(tokenizer.encode(p.text), dtype=np.int64) for p in prompts]


def calibration_tokens(gguf: GGUFFile) -> tuple[list[Prompt], list[np.ndarray]]:
    prompts = load_prompts(calibration_prompts_path())
    return prompts, tokenize(gguf, prompts)


def calibrate(gguf: GGUFFile) -> Importance:
    """Importance from the built-in calibration prompts, cached per model in the cache directory."""
    prompts, tokens = calibration_tokens(gguf)
    cache = cache_dir() / "calibration" / f"{file_fingerprint(gguf.path)}.npz"
    return load_or_collect(gguf, prompts, tokens, cache)


# How a record's note begins when the recipe leaves tensors float16 by naming none of them (a
# recipe searched for another model, a misspelt pattern).
UNMATCHED_NOTE = "float16 by omission"


@dataclass
class ValidationContext:
    """One model, its validation prompts (tokenized) and its calibration importance."""

    gguf: GGUFFile
    prompts: list[Prompt]
    tokens: list[np.ndarray]
    importance: Importance | None
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def prepare(
        cls,
        gguf: GGUFFile,
        prompts_path: str | Path | None = None,
        use_importance: bool = True,
        progress: Progress | None = None,
    ) -> ValidationContext:
        step = progress or (lambda _: None)
        started = time.perf_counter()
        prompts = load_prompts(prompts_path)
        tokens = tokenize(gguf, prompts)
        importance = None
        if use_importance:
            step("calibration")
            importance = calibrate(gguf)
        context = cls(gguf, prompts, tokens, importance)
        context.timings["prepare_s"] = time.perf_counter() - started
        return context

    @property
    def routed(self) -> bool:
        """True for an MoE model."""
        return routes_experts(self.gguf.config)

    def weights(self, recipe: Recipe) -> RecipeWeights:
        """The recipe's weights; an MoE model's quantized weights go to a temporary store on
        disk (its banks are gigabytes per layer), a dense model's are cached in memory."""
        return RecipeWeights(self.gguf, recipe, self.importance, store=QuantizedStore() if self.routed else None)

    def record(self, kind: str, recipe: Recipe, thresholds: dict) -> RunRecord:
        record = new_record(kind, self.gguf.path, recipe, {**DEFAULT_THRESHOLDS, **thresholds})
        record["tensors"], record["bits"] = recipe_bits(self.gguf, recipe)
        record["timings"].update(self.timings)
        compressible = quantizable_tensors(self.gguf)
        unmatched = recipe.unmatched(compressible)
        if unmatched:
            record["notes"].append(f"{UNMATCHED_NOTE}: {len(unmatched)} of {len(compressible)} compressible tensors "
                                   f"match no rule of recipe '{recipe.name}' (first: {unmatched[0]})")
        if self.importance is None:
            record["notes"].append("clustering and rounding without calibration importance")
        else:
            record["notes"].append(f"importance from {self.importance.tokens} calibration tokens")
            unreached = self.importance.unreached_note()
            if unreached:
                record["notes"].append(unreached)
        return record


def layers_run(
    context: ValidationContext,
    recipe: Recipe,
    layers: list[int],
    min_layer_cosine: float = DEFAULT_THRESHOLDS["min_layer_cosine"],
    with_blame: bool = True,
    kind: str = "layers",
    weights: RecipeWeights | None = None,
    progress: Progress | None = None,
    blame_below: float | None = None,
) -> RunRecord:
    """The layer validator on ``layers``: isolated and cumulative cosine, blame, verdict."""
    started = time.perf_counter()
    record = context.record(kind, recipe, {"min_layer_cosine": min_layer_cosine})
    weights = weights or context.weights(recipe)
    checks = validate_layers(context.gguf, weights, context.tokens, layers, with_blame, progress, blame_below)
    record["layers"] = [check.result(min_layer_cosine) for check in checks]
    record["passed"] = all(layer["passed"] for layer in record["layers"])
    record["timings"]["layers_s"] = time.perf_counter() - started
    return record


def golden_run(
    context: ValidationContext,
    recipe: Recipe,
    golden: Golden | None = None,
    min_logit_cosine: float = DEFAULT_THRESHOLDS["min_logit_cosine"],
    min_top1: float = DEFAULT_THRESHOLDS["min_top1"],
    weights: RecipeWeights | None = None,
    progress: Progress | None = None,
) -> RunRecord:
    """The full quantized stack on every prompt against the golden logits.

    With a golden file the reference logits are llama.cpp's; without one they are the exact
    numpy reference's on the validation prompts (tighter: no llama.cpp activation rounding).
    """
    step = progress or (lambda _: None)
    started = time.perf_counter()
    record = context.record("golden", recipe, {"min_logit_cosine": min_logit_cosine, "min_top1": min_top1})
    thresholds = GoldenThresholds(min_logit_cosine, min_top1)
    weights = weights or context.weights(recipe)
    quantized = build(context.gguf.config, weights)
    # A routed model's quantized stack may send tokens to other experts than the exact model:
    # recorded when the exact model runs (no golden file), it says how much of the loss is routing.
    exact_routing = RecordedRouting() if golden is None and context.routed else None
    if exact_routing is not None:
        quantized.router = RecordedRouting()
    # prompt_logits runs the (streamed) LM head once over every prompt, not once per prompt
    if golden is not None:
        names = [p.name for p in golden.prompts]
        token_lists = [p.tokens for p in golden.prompts]
        expected = [np.asarray(p.logits, np.float32) for p in golden.prompts]
        record["notes"].append(f"golden logits from {golden.referee}")
    else:
        names, token_lists = [p.name for p in context.prompts], context.tokens
        step("exact reference")
        exact = build(context.gguf.config, weights.exact)
        if exact_routing is not None:
            exact.router = exact_routing
        expected = exact.prompt_logits(token_lists)
        record["notes"].append("golden logits from the exact numpy reference of the source model")
    step("quantized stack")
    for name, reference, test in zip(names, expected, quantized.prompt_logits(token_lists)):
        record["prompts"].append(compare(name, reference, test).summary(thresholds))
    record.update(verdict(record["prompts"], thresholds))
    if exact_routing is not None:
        record["routing"] = _routing_agreement(exact_routing, quantized.router)
        record["notes"].append(_routing_agreement_note(record["routing"]))
    record["timings"]["golden_s"] = time.perf_counter() - started
    return record


def _routing_agreement(exact: RecordedRouting, quantized: RecordedRouting) -> list[dict]:
    """Per MoE layer, how often the quantized stack routed a position as the exact model did."""
    test = quantized.choices()
    results = []
    for il, reference in sorted(exact.choices().items()):
        same_experts, shared_experts = routing_agreement(reference, test[il])
        results.append({"layer": il, "same_experts": same_experts, "shared_experts": shared_experts})
    return results


def _routing_agreement_note(routing: list[dict]) -> str:
    worst = min(routing, key=lambda layer: layer["same_experts"])
    mean = sum(layer["same_experts"] for layer in routing) / len(routing)
    return (f"routing: positions sent to the exact model's experts {mean:.1%} on average over {len(routing)} "
            f"MoE layers, fewest on layer {worst['layer']} ({worst['same_experts']:.1%}; "
            f"{worst['shared_experts']:.1%} of the chosen experts kept)")


def gate_run(
    context: ValidationContext,
    recipe: Recipe,
    sample: int = 5,
    min_layer_cosine: float = DEFAULT_THRESHOLDS["min_layer_cosine"],
    weights: RecipeWeights | None = None,
    progress: Progress | None = None,
) -> RunRecord:
    """The pre-flight gate: the layer validator on the first, last and evenly spaced layers,
    with blame on the layers that fail it."""
    layers = sample_layers(context.gguf.config.n_layers, sample)
    return layers_run(context, recipe, layers, min_layer_cosine, True, "gate", weights, progress, min_layer_cosine)


class GateFailed(AnepackError):
    """A build refused because the pre-flight gate failed; names the layers and tensors to blame."""


def blamed_tensors(record: RunRecord) -> list[str]:
    """The most-blamed tensor of every failing layer."""
    return [layer["blame"][0]["tensor"] for layer in record["layers"] if not layer["passed"] and layer["blame"]]


def require_gate(record: RunRecord, force: bool = False) -> RunRecord:
    """Stop a build on a failed gate, naming the blamed tensors; ``force`` overrides and is recorded."""
    if record["passed"]:
        return record
    if force:
        record["forced"] = True
        record["notes"].append("gate failed and was overridden with --force")
        return record
    failing = [layer for layer in record["layers"] if not layer["passed"]]
    worst = min(failing, key=lambda layer: min(layer["isolated_min"], layer["cumulative_min"]))
    raise GateFailed(
        record["model"],
        f"pre-flight gate failed for recipe {record['recipe']['name']!r}: "
        f"layers {', '.join(str(layer['layer']) for layer in failing)} below cosine "
        f"{record['thresholds']['min_layer_cosine']} (worst: layer {worst['layer']}, "
        f"min {min(worst['isolated_min'], worst['cumulative_min']):.4f}); "
        f"blamed tensors: {', '.join(blamed_tensors(record)) or 'none measured'} "
        "(use --force to build anyway)",
    )
