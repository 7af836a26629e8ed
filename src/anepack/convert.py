"""``anepack convert``: GGUF in, validated Neural Engine shards and a report out.

The steps, each reported through ``progress``: calibrate (importance and the residual
stream's range), the pre-flight gate on a sample of layers (a failure stops here, naming the
blamed tensors, unless forced), build every shard (resuming: unchanged shards are kept), the
golden check through the built shards with the MIL interpreter (against the reference with
the same dequantized weights, and against the source model), the residency lint, and the
HTML report. The run is recorded in the history; the manifest carries the results.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from anepack.errors import AnepackError
from anepack.golden import Thresholds, compare, verdict
from anepack.reference import build
from anepack.reference.gemma4 import ForcedRouting, RecordedRouting, RoutingDifference
from anepack.source.gguf_file import GGUFFile
from anepack.validate.quantized_store import QuantizedStore, remove_stale_stores
from anepack.validate.recipes import Recipe
from anepack.validate.record import RunRecord
from anepack.validate.run import ValidationContext, calibrate, gate_run, require_gate
from anepack.validate.weights import RecipeWeights

# The built artifact must compute what the reference computes with the same weights.
MIN_ARTIFACT_COSINE = 0.999

Progress = Callable[[str, float | None], None]  # (step description, fraction done or None)


@dataclass
class ConvertOptions:
    chunk: int = 64
    context: int = 512
    max_shard_mb: float = 1024
    gate_sample: int = 5
    min_layer_cosine: float = 0.97
    min_logit_cosine: float = 0.97
    min_top1: float = 0.90
    force: bool = False
    use_importance: bool = True


def convert(
    gguf: GGUFFile,
    recipe: Recipe,
    out_dir: str | Path,
    options: ConvertOptions,
    prompts_path: str | Path | None = None,
    progress: Progress | None = None,
) -> RunRecord:
    """Convert ``gguf`` with ``recipe`` into ``out_dir``; returns the run record (verdict in ``passed``)."""
    from anepack.coreml.builder import build_shards, check_build_options, check_supported, choose_alpha
    from anepack.coreml.lint import lint_shards
    from anepack.coreml.manifest import read_manifest, write_manifest
    from anepack.report.html import write_report
    from anepack.runtime.host_files import write_host_files
    from anepack.runtime.shards import ShardRuntime

    step = progress or (lambda message, fraction=None: None)
    # A model this cannot convert (unknown architecture, wrong shapes, no shards for it) or
    # build options no build can use are refused before anything is written or calibrated.
    check_supported(gguf.config, gguf.path)
    check_build_options(options.chunk, options.context, options.max_shard_mb)
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise AnepackError(out_dir, f"cannot create the output directory ({error.strerror})") from None
    started = time.perf_counter()

    store = None
    try:
        step("calibrating", None)
        calibration = calibrate(gguf)
        context = ValidationContext.prepare(gguf, prompts_path, use_importance=False)
        context.importance = calibration if options.use_importance else None

        # Quantized once: the gate, the build and the checks share it, on disk.
        for stale in remove_stale_stores(out_dir):
            step(f"removed {stale.name}, left by an interrupted run", None)
        store = QuantizedStore(out_dir)
        weights = RecipeWeights(gguf, recipe, context.importance, store=store)
        step("pre-flight gate", None)
        gate = gate_run(context, recipe, options.gate_sample, options.min_layer_cosine, weights,
                        progress=lambda message: step(f"gate: {message}", None))
        require_gate(gate, options.force)
    except BaseException:
        # stopped before building (the gate, bad prompts, an interrupt): leave no empty directory
        if store is not None:
            store.close()
        if created and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise

    record = context.record("convert", recipe, {
        "min_layer_cosine": options.min_layer_cosine,
        "min_logit_cosine": options.min_logit_cosine,
        "min_top1": options.min_top1,
    })
    record["layers"] = gate["layers"]
    record["forced"] = gate["forced"]
    record["notes"] += [note for note in gate["notes"] if "--force" in note]
    record["timings"]["gate_s"] = gate["timings"]["layers_s"]

    alpha = choose_alpha(calibration.max_abs_hidden)
    built_started = time.perf_counter()
    step("building shards", 0.0)
    write_host_files(gguf, out_dir)
    build_shards(
        gguf, weights, out_dir, alpha=alpha, chunk=options.chunk, context=options.context,
        max_shard_mb=options.max_shard_mb,
        progress=lambda built: step(f"building {built.file}", (built.index + 1) / built.total),
    )
    record["timings"]["build_s"] = time.perf_counter() - built_started
    record["notes"].append(f"fp16 residual scale alpha = {alpha} (max |hidden| {calibration.max_abs_hidden:.0f})")

    checked_started = time.perf_counter()
    # A routed model's reference on the same weights must route as the shards did (a near-tie
    # may go either way in float16), so it runs after the shards and keeps the weights.
    routed = context.routed
    # The references' logits first, then the weights are released before the shards are loaded:
    # peak memory is the larger of the two phases, not their sum.
    step("references: same weights", 0.0)
    simulated_logits = ([None] * len(context.tokens) if routed
                        else build(gguf.config, weights).prompt_logits(context.tokens))
    step("references: source model", 0.5)
    exact_logits = build(gguf.config, weights.exact).prompt_logits(context.tokens)
    expected = list(zip(simulated_logits, exact_logits))
    del simulated_logits, exact_logits
    weights = weights if routed else None
    gc.collect()

    step("golden check through shards", 0.0)
    # A routed model's prompts run in one call: each package decoded once, then released.
    runtime = ShardRuntime(out_dir, "mil", hold_weights=not routed)
    recorded = [RecordedRouting() for _ in context.tokens]
    # A routed model runs all prompts together, so each routed expert is decoded once per layer
    # for all of them; a dense one prompt by prompt, so one prompt's logits are held at a time.
    indices = range(len(context.tokens))
    batches = [list(indices)] if routed else [[index] for index in indices]
    thresholds = Thresholds(options.min_logit_cosine, options.min_top1)
    artifact_cosines = []
    routing_differences: list[RoutingDifference] = []
    for number, batch in enumerate(batches, start=1):
        shard_logits = runtime.prompt_logits([context.tokens[i] for i in batch], [recorded[i] for i in batch])
        if number == len(batches):
            del runtime  # its decoded weights go before the routed reference runs
        if routed:
            step("golden check through shards: reference routed as the shards", None)
            forced_logits, differences = _forced_reference(
                gguf, weights, [context.tokens[i] for i in batch], [recorded[i] for i in batch])
            routing_differences += differences
            for index, forced in zip(batch, forced_logits):
                expected[index] = (forced, expected[index][1])
        for index, from_shards in zip(batch, shard_logits):
            prompt, (same_weights, source) = context.prompts[index], expected[index]
            step(f"golden check through shards: {prompt.name}", (index + 1) / len(context.prompts))
            artifact_cosines.append(float(compare(prompt.name, same_weights, from_shards).cosine.min()))
            record["prompts"].append(compare(prompt.name, source, from_shards).summary(thresholds))
    del shard_logits
    record["timings"]["golden_s"] = time.perf_counter() - checked_started

    step("residency lint", None)
    lint = lint_shards(out_dir)

    record["artifact"] = {
        "bar": MIN_ARTIFACT_COSINE,
        "min_cosine": min(artifact_cosines),
        "per_prompt": dict(zip((p.name for p in context.prompts), artifact_cosines)),
    }
    if routed:
        record["artifact"]["routing"] = _routing_summary(routing_differences, gguf.config, context.tokens)
        record["notes"].append(_routing_note(record["artifact"]["routing"]))
    artifact_ok = min(artifact_cosines) >= MIN_ARTIFACT_COSINE and all(d.near_tie for d in routing_differences)
    golden = verdict(record["prompts"], thresholds)
    record["top1_pooled"] = golden["top1_pooled"]
    golden_ok = golden["passed"]
    record["passed"] = bool(artifact_ok and golden_ok and (gate["passed"] or gate["forced"]))
    record["notes"].append(
        f"artifact vs simulation (same dequantized weights): min logit cosine {min(artifact_cosines):.6f} "
        f"(bar {MIN_ARTIFACT_COSINE})"
    )
    record["notes"].append(f"residency lint: {lint['totals']['op_share']:.1%} of ops and "
                           f"{lint['totals']['byte_share']:.1%} of weight bytes predicted on the ANE")
    record["timings"]["total_s"] = time.perf_counter() - started

    validation = {
        "passed": record["passed"],
        "gate_passed": gate["passed"],
        "forced": record["forced"],
        "artifact_min_cosine": min(artifact_cosines),
        "golden": [{k: p[k] for k in ("name", "min_cosine", "top1_agreement", "passed")} for p in record["prompts"]],
        "top1_pooled": record["top1_pooled"],
        "bits": record["bits"],
        "ane_op_share": lint["totals"]["op_share"],
        "ane_weight_share": lint["totals"]["byte_share"],
        "all_on_ane": lint["all_on_ane"],
    }
    write_manifest(dataclasses.replace(read_manifest(out_dir), validation=validation), out_dir)
    write_report(record, out_dir / "report.html")
    return record


def _forced_reference(gguf: GGUFFile, weights, token_lists, recorded: list[RecordedRouting]) -> tuple:
    """Each prompt's logits from the reference on the recipe's weights, routed to the experts
    the shards chose, and the positions where the reference's own choice differs. The prompts
    run together (``prompt_logits``), so each routed expert is dequantized once per layer."""
    choices = [routing.choices() for routing in recorded]
    model = build(gguf.config, weights)
    model.router = forced = ForcedRouting({il: np.concatenate([c[il] for c in choices]) for il in choices[0]})
    return model.prompt_logits(token_lists), forced.differences()


def _routing_summary(differences: list[RoutingDifference], config, token_lists) -> dict:
    routed_layers = sum(config.moe_layers)
    return {
        "positions": routed_layers * sum(len(tokens) for tokens in token_lists),
        "differing": len(differences),
        "near_ties": sum(d.near_tie for d in differences),
        "largest_gap": max((d.gap for d in differences), default=0.0),
    }


def _routing_note(routing: dict) -> str:
    return (f"routing: the shards chose other experts than the reference at {routing['differing']} of "
            f"{routing['positions']} routed positions, {routing['near_ties']} of them near-ties (largest gap "
            f"{routing['largest_gap']:.2%}); the reference on the same weights routed as the shards did")
