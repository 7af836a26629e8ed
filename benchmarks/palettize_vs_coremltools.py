"""Palettization: ``anepack.quant.quantize`` against coremltools 9 ``palettize_weights``, one run.

The same fp16 weight and the same LUT format go through both tools: anepack's quantizer,
and coremltools' path for a one-op MIL program (a const weight feeding ``linear``, converted
with ``skip_model_load=True``), whose palettized weight is read back after coremltools' own
``decompress_weights``. For each tensor and format it prints each tool's time and weight
SQNR (against the fp16 weight both received), the time ratio, the SQNR difference, and the
SQNR of exact 1-D k-means (``kmeans_1d_exact``, its LUT rounded to fp16 like the others).

The whole process is pinned to one CPU (``os.sched_setaffinity``) and coremltools runs with
its default ``num_kmeans_workers=1``, so both tools get the same single core. Times are the
process's CPU seconds (``time.process_time``), which other load on a shared machine barely
moves; wall seconds are printed too.

    python benchmarks/palettize_vs_coremltools.py            # synthetic bank + real tensors
    python benchmarks/palettize_vs_coremltools.py --quick    # real tensors only (~2 min)

The full run takes 25-40 minutes, most of it coremltools on the 45056 x 704 bank (2-4 min
at lut4-g16, 9-15 at lut6-g16) and exact k-means of the bank at lut4-g16 (about 3 min).
Exact k-means of the bank at lut6-g16 would take about 13 more minutes and is left out
(shown as "-").
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import time

import numpy as np

from anepack.metrics import sqnr_db
from anepack.quant import parse_format, quantize
from anepack.quant.kmeans import kmeans_1d_exact, nearest_labels
from anepack.quant.synthetic import expert_bank
from anepack.source import open_gguf
from anepack.source.default_model import default_model_path

FORMATS = ("lut4-g16", "lut4-tensor", "lut6-g16")
REAL_TENSORS = ("blk.0.attn_q.weight", "blk.8.ffn_down.weight", "blk.17.ffn_gate.weight")
BANK = "synthetic expert bank"
EXACT_SKIPPED = {(BANK, "lut6-g16")}


def pin_to_one_cpu() -> int:
    cpu = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    return cpu


@contextlib.contextmanager
def quiet():
    """coremltools reports progress bars and missing-runtime warnings on stderr/stdout."""
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        yield


with quiet():
    import coremltools as ct
    import coremltools.optimize.coreml as cto
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.milproto.load import load as load_mil
    from coremltools.converters.mil.mil import types


def timed(function, *args):
    """(result, CPU seconds, wall seconds) of one call."""
    cpu, wall = time.process_time(), time.perf_counter()
    result = function(*args)
    return result, time.process_time() - cpu, time.perf_counter() - wall


def coremltools_config(spec: str):
    fmt = parse_format(spec)
    if fmt.group_size:
        op_config = cto.OpPalettizerConfig(
            nbits=fmt.nbits, mode="kmeans", granularity="per_grouped_channel",
            group_size=fmt.group_size,
        )
    else:
        op_config = cto.OpPalettizerConfig(nbits=fmt.nbits, mode="kmeans", granularity="per_tensor")
    return cto.OptimizationConfig(global_config=op_config)


def one_linear_model(weight16: np.ndarray):
    @mb.program(
        input_specs=[mb.TensorSpec(shape=(1, weight16.shape[1]), dtype=types.fp16)],
        opset_version=ct.target.iOS18,
    )
    def program(x):
        return mb.linear(x=x, weight=weight16, name="y")

    with quiet():
        return ct.convert(
            program, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
            skip_model_load=True,
        )


def linear_weight(model) -> np.ndarray:
    spec = model.get_spec()
    with quiet():
        program = load_mil(spec, specification_version=spec.specificationVersion,
                           file_weights_dir=model.weights_dir)
    (linear,) = [op for op in program.functions["main"].operations if op.op_type == "linear"]
    return np.asarray(linear.weight.val)


def coremltools_run(weight16: np.ndarray, spec: str):
    """(dequantized weight, CPU seconds, wall seconds) of ``palettize_weights``."""
    model = one_linear_model(weight16)
    with quiet():
        palettized, cpu, wall = timed(cto.palettize_weights, model, coremltools_config(spec))
        dense = cto.decompress_weights(palettized)
    return linear_weight(dense), cpu, wall


def exact_dequantized(weight: np.ndarray, spec: str) -> np.ndarray:
    """Exact 1-D k-means per group, LUT rounded to fp16, nearest stored entry per weight."""
    fmt = parse_format(spec)
    rows, cols = weight.shape
    group = fmt.group_size or rows
    grouped = weight.reshape(rows // group, group * cols)
    centroids, _ = kmeans_1d_exact(grouped, 2**fmt.nbits)
    lut = centroids.astype(np.float16)
    labels = nearest_labels(grouped, lut.astype(np.float32))
    return np.take_along_axis(lut, labels.astype(np.int64), axis=1).reshape(rows, cols)


def tensors(quick: bool):
    model = open_gguf(default_model_path())
    if not quick:
        yield BANK, expert_bank(0)
    for name in REAL_TENSORS:
        yield f"gemma3-270m {name}", model.tensor(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="real Gemma 3 270M tensors only")
    args = parser.parse_args()
    cpu = pin_to_one_cpu()
    print(f"pinned to CPU {cpu}; coremltools {ct.__version__}; times are CPU seconds (wall)")
    header = (
        f"{'tensor':38s} {'format':11s} {'anepack s':>15s} {'coremltools s':>17s} {'ratio':>7s}"
        f" {'SQNR anepack':>12s} {'coremltools':>11s} {'diff':>7s} {'exact':>7s} {'to exact':>8s}"
    )
    print(header)
    for name, weight in tensors(args.quick):
        weight16 = weight.astype(np.float16)
        reference = weight16.astype(np.float32)
        label = f"{name} {weight.shape[0]}x{weight.shape[1]}"
        for spec in FORMATS:
            quantized, ours_cpu, ours_wall = timed(quantize, reference, spec)
            ours = sqnr_db(reference, quantized.dequantize())
            theirs_weight, theirs_cpu, theirs_wall = coremltools_run(weight16, spec)
            theirs = sqnr_db(reference, theirs_weight)
            if (name, spec) in EXACT_SKIPPED:
                exact_text, gap_text = f"{'-':>7s}", f"{'-':>8s}"
            else:
                exact = sqnr_db(reference, exact_dequantized(reference, spec))
                exact_text, gap_text = f"{exact:7.3f}", f"{ours - exact:+8.3f}"
            print(
                f"{label:38s} {spec:11s} {ours_cpu:6.2f} ({ours_wall:6.2f}) "
                f"{theirs_cpu:7.2f} ({theirs_wall:7.2f}) {theirs_cpu / ours_cpu:6.1f}x"
                f" {ours:12.3f} {theirs:11.3f} {ours - theirs:+7.3f} {exact_text} {gap_text}",
                flush=True,
            )
    print("targets (issue 3): lut4-g16 on the bank >= 30x faster than coremltools on one core,"
          " SQNR within 0.05 dB of exact 1-D k-means")


if __name__ == "__main__":
    main()
