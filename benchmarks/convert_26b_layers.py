"""Seconds per layer of ``anepack convert`` (the library function the CLI runs) on a GGUF with
Gemma 4 26B-A4B's dimensions, its extrapolation to the real model's 30 layers, and peak memory
with the step where it sits, against reading and dequantizing the same tensors in the same run.

    anepack synth --arch gemma4 --dims 26b-a4b --layers 2 --out /tmp/g4_26b.gguf
    python benchmarks/convert_26b_layers.py /tmp/g4_26b.gguf --recipe RECIPE.toml [--prompts FILE] [--out DIR]

Baseline: every tensor of a layer read from the GGUF and dequantized to float32, expert by
expert: the floor of any conversion; beside it, quantizing a layer's experts in the recipe's
formats, weighted by the calibration's importance (from a sample of experts), which convert does
once, on first use, in the gate.
Convert's steps are timed through its progress callback: calibration, the pre-flight gate,
each package of the build, the checks through the shards.
Memory is sampled from /proc/self/status every 0.2 s (resident, anonymous, file pages).

Extrapolation to 30 layers: the build's mean seconds per layer times 30 plus the embeddings and
LM head; calibration and the checks grow with depth, so their per-layer share times 30; the gate
runs its exact and quantized stacks through every layer up to the last sampled one and checks at
most 5 layers, so its per-layer share times 30 bounds it from above, except its blame: that runs
only on sampled layers that fail (here every gated layer fails: the synthetic experts are random),
so at most 5 times its per-layer share. The issue's target: the full model in under 45 minutes on
this 2-core machine, peak memory under 4 GB.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import tempfile
import threading
import time

from anepack.convert import ConvertOptions, convert
from anepack.source.gguf_file import open_gguf
from anepack.validate.recipes import load_recipe
from anepack.validate.run import calibrate
from anepack.validate.weights import RecipeWeights, one_scale_per_tensor

REAL_LAYERS = 30
_LAYER_FILE = re.compile(r"building (?:layers|experts)_(\d+)_")
GATE_SAMPLE = ConvertOptions().gate_sample
_PHASES = (("calibrating", "calibration"), ("gate: blame", "blame"), ("gate", "gate"), ("pre-flight", "gate"),
           ("building", "build"), ("references", "checks"), ("golden check", "checks"), ("residency", "lint"))


def read_and_dequantize(gguf, il: int) -> float:
    """Seconds to read and dequantize every tensor of layer ``il``, one expert at a time."""
    started = time.perf_counter()
    for name, info in gguf.tensors.items():
        if not name.startswith(f"blk.{il}."):
            continue
        if len(info.shape) == 3:
            for expert in range(info.shape[0]):
                gguf.expert(name, expert)
        else:
            gguf.tensor(name)
    return time.perf_counter() - started


def quantize_experts(gguf, recipe, importance, il: int, sample: int = 8) -> float:
    """Seconds to quantize all of layer ``il``'s experts in the recipe's formats, weighted by the
    calibration's importance as convert weighs them, one expert at a time (convert runs one per
    core), from ``sample`` experts of each bank (every expert of a bank has the same shape and
    format). A format with one scale or LUT over the bank quantizes the whole bank at once: timed once."""
    weights = RecipeWeights(gguf, recipe, importance)
    seconds = 0.0
    for name, info in gguf.tensors.items():
        if name.startswith(f"blk.{il}.") and len(info.shape) == 3 and name in weights.quantizable:
            started = time.perf_counter()
            if one_scale_per_tensor(recipe.format_for(name)):
                weights.compressed(name)
                seconds += time.perf_counter() - started
                continue
            for expert in range(sample):
                weights.quantized_expert(name, expert)
            seconds += (time.perf_counter() - started) * info.shape[0] / sample
    return seconds


def memory_mb() -> dict[str, float]:
    """Resident, anonymous and file-backed memory of this process, in MB."""
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0]) / 1024
    return fields


class MemoryWatch(threading.Thread):
    """Samples memory until stopped; keeps the peak resident sample and the step it fell in."""

    def __init__(self, interval: float = 0.2):
        super().__init__(daemon=True)
        self.interval = interval
        self.step = "start"
        self.peak = {"VmRSS": 0.0}
        self.peak_step = self.step
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.interval):
            sample = memory_mb()
            if sample["VmRSS"] > self.peak["VmRSS"]:
                self.peak, self.peak_step = sample, self.step

    def stop(self) -> None:
        self._done.set()
        self.join()


def phase_of(message: str) -> str:
    return next((phase for prefix, phase in _PHASES if message.startswith(prefix)), message)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--recipe", required=True, help="built-in recipe name or TOML file")
    parser.add_argument("--prompts", help="validation prompts (JSONL); default: the built-in ones")
    parser.add_argument("--out", help="shard directory (default: a temporary one)")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe)
    watch = MemoryWatch()
    with open_gguf(args.model) as gguf, tempfile.TemporaryDirectory() as scratch:
        layers = gguf.config.n_layers
        baseline = [read_and_dequantize(gguf, il) for il in range(layers)]
        importance = calibrate(gguf)
        quantizing = [quantize_experts(gguf, recipe, importance, il) for il in range(layers)]
        baseline_peak = memory_mb()["VmRSS"]

        # (seconds, message) at each progress step: a step lasts until the next one.
        steps: list[tuple[float, str]] = []

        def progress(message: str, fraction: float | None) -> None:
            steps.append((time.perf_counter(), message))
            watch.step = message

        watch.start()
        started = time.perf_counter()
        record = convert(gguf, recipe, args.out or scratch, ConvertOptions(force=True), args.prompts, progress)
        ended = time.perf_counter()
        watch.stop()

    # Each step lasts until the next one; a "building <file>" step is reported when its package
    # is written, so that package took the time since the step before.
    phases: dict[str, float] = {}
    build_layers = [0.0] * layers
    build_fixed = 0.0
    timeline = [(started, "start")] + steps + [(ended, "end")]
    for (before, _), (at, message), (after, _) in zip(timeline, timeline[1:], timeline[2:]):
        phases[phase_of(message)] = phases.get(phase_of(message), 0.0) + after - at
        if message.startswith("building ") and message.endswith(".mlpackage"):
            layer = _LAYER_FILE.match(message)
            if layer:
                build_layers[int(layer.group(1))] += at - before
            else:
                build_fixed += at - before

    print(f"model {args.model}, recipe {recipe.name}, {layers} layers, "
          f"{len(record['prompts'])} validation prompts; passed {record['passed']} (gate forced: {record['forced']})")
    for il in range(layers):
        print(f"layer {il}: build {build_layers[il]:7.1f} s   read+dequantize {baseline[il]:6.1f} s   "
              f"ratio {build_layers[il] / baseline[il]:5.1f}x")
    print(f"embeddings + LM head: {build_fixed:.1f} s")
    print(f"quantizing one layer's experts one at a time (convert: once, one per core, inside the gate here): "
          f"{', '.join(f'{seconds:.1f}' for seconds in quantizing)} s")
    for phase, seconds in phases.items():
        print(f"{phase:12s} {seconds:7.1f} s   {seconds / layers:6.1f} s per layer")
    unbuilt = [(step, after) for step, after in zip(timeline[1:], timeline[2:]) if not step[1].startswith("building")]
    longest = sorted(unbuilt, key=lambda pair: pair[0][0] - pair[1][0])[:8]
    print("longest steps: " + "; ".join(f"{message} {after - at:.0f} s" for (at, message), (after, _) in longest))
    total = ended - started
    print(f"convert: {total:.1f} s, {(total - build_fixed) / layers:.1f} s per layer")
    blame = phases.get("blame", 0.0)
    extrapolated = REAL_LAYERS * (total - build_fixed - blame) / layers + GATE_SAMPLE * blame / layers + build_fixed
    build_only = REAL_LAYERS * sum(build_layers) / layers + build_fixed
    print(f"{REAL_LAYERS} layers extrapolated: convert {extrapolated / 60:.1f} min (build alone "
          f"{build_only / 60:.1f} min)   target: < 45 min")
    artifact = record["artifact"]
    print(f"artifact vs simulation min cosine {artifact['min_cosine']:.6f}; routing {artifact.get('routing')}")
    # The machine is shared: the load says how far the seconds above are from an idle run's.
    print("load average (1, 5, 15 min) at the end: " + ", ".join(f"{load:.1f}" for load in os.getloadavg()))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak_mb:.0f} MB (read+dequantize alone {baseline_peak:.0f} MB)   target: < 4096 MB")
    print(f"sampled peak {watch.peak['VmRSS']:.0f} MB ({watch.peak.get('RssAnon', 0):.0f} anonymous, "
          f"{watch.peak.get('RssFile', 0):.0f} file) during: {watch.peak_step}")


if __name__ == "__main__":
    main()
