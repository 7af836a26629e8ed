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

from anepack.golden import Thresholds, compare
from anepack.metrics import rowwise_cosine
from anepack.reference import build
from anepack.source.gguf_file import GGUFFile
from anepack.validate.recipes import Recipe
from anepack.validate.record import RunRecord
from anepack.validate.run import ValidationContext, calibrate, gate_run, require_gate

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
    from anepack.coreml.builder import build_shards, choose_alpha
    from anepack.coreml.lint import lint_shards
    from anepack.coreml.manifest import read_manifest, write_manifest
    from anepack.report.html import write_report
    from anepack.runtime.host_files import write_host_files
    from anepack.runtime.shards import ShardRuntime

    step = progress or (lambda message, fraction=None: None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    step("calibrating", None)
    calibration = calibrate(gguf)
    context = ValidationContext.prepare(gguf, prompts_path, use_importance=False)
    context.importance = calibration if options.use_importance else None

    weights = context.weights(recipe)  # quantized once: the gate, the build and the checks share it
    step("pre-flight gate", None)
    gate = gate_run(context, recipe, options.gate_sample, options.min_layer_cosine, weights,
                    progress=lambda message: step(f"gate: {message}", None))
    require_gate(gate, options.force)

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
    write_host_files(gguf, out_dir)
    build_shards(
        gguf, weights, out_dir, alpha=alpha, chunk=options.chunk, context=options.context,
        max_shard_mb=options.max_shard_mb,
        progress=lambda built: step(f"building {built.file}", (built.index + 1) / built.total),
    )
    record["timings"]["build_s"] = time.perf_counter() - built_started
    record["notes"].append(f"fp16 residual scale alpha = {alpha} (max |hidden| {calibration.max_abs_hidden:.0f})")

    checked_started = time.perf_counter()
    # The references' logits first, then the weights are released before the shards are loaded:
    # peak memory is the larger of the two phases, not their sum.
    simulated = build(gguf.config, weights)
    exact = build(gguf.config, weights.exact)
    expected = []
    for index, (prompt, tokens) in enumerate(zip(context.prompts, context.tokens)):
        step(f"references: {prompt.name}", index / len(context.prompts))
        expected.append((simulated.forward(tokens).logits, exact.forward(tokens).logits))
    del simulated, exact, weights
    gc.collect()

    shards = ShardRuntime(out_dir, "mil")
    thresholds = Thresholds(options.min_logit_cosine, options.min_top1)
    artifact_cosines = []
    for index, (prompt, tokens, (same_weights, source)) in enumerate(zip(context.prompts, context.tokens, expected)):
        step(f"golden check through shards: {prompt.name}", index / len(context.prompts))
        from_shards = shards.logits(tokens)
        artifact_cosines.append(float(rowwise_cosine(same_weights, from_shards).min()))
        record["prompts"].append(compare(prompt.name, source, from_shards).summary(thresholds))
    del shards
    record["timings"]["golden_s"] = time.perf_counter() - checked_started

    step("residency lint", None)
    lint = lint_shards(out_dir)

    record["artifact"] = {
        "bar": MIN_ARTIFACT_COSINE,
        "min_cosine": min(artifact_cosines),
        "per_prompt": dict(zip((p.name for p in context.prompts), artifact_cosines)),
    }
    artifact_ok = min(artifact_cosines) >= MIN_ARTIFACT_COSINE
    golden_ok = all(p["passed"] for p in record["prompts"])
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
        "bits": record["bits"],
        "ane_op_share": lint["totals"]["op_share"],
        "ane_weight_share": lint["totals"]["byte_share"],
        "all_on_ane": lint["all_on_ane"],
    }
    write_manifest(dataclasses.replace(read_manifest(out_dir), validation=validation), out_dir)
    write_report(record, out_dir / "report.html")
    return record
