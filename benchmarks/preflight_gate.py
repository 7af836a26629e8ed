"""The pre-flight gate's wall time on a model, against validating every layer, in one run.

    python benchmarks/preflight_gate.py [MODEL] [--recipe int8-per-channel]

Prints the gate's seconds (5 sampled layers, with blame; calibration cached beforehand, as
after a first run), the seconds of the same check over all layers, and their ratio. The
issue's target for the default model is a gate under 2 minutes on this 2-core machine.
"""

from __future__ import annotations

import argparse
import time

from anepack.source.default_model import resolve_model
from anepack.source.gguf_file import open_gguf
from anepack.validate.recipes import load_recipe
from anepack.validate.run import ValidationContext, calibrate, gate_run, layers_run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?")
    parser.add_argument("--recipe", default="int8-per-channel")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe)
    with open_gguf(resolve_model(args.model)) as gguf:
        started = time.perf_counter()
        calibrate(gguf)
        calibration_s = time.perf_counter() - started

        started = time.perf_counter()
        context = ValidationContext.prepare(gguf)
        gate = gate_run(context, recipe)
        gate_s = time.perf_counter() - started

        started = time.perf_counter()
        context = ValidationContext.prepare(gguf)
        full = layers_run(context, recipe, list(range(gguf.config.n_layers)))
        full_s = time.perf_counter() - started
    print(f"model {gguf.path}, recipe {recipe.name}")
    print(f"calibration (first run only, then cached): {calibration_s:7.1f} s")
    print(f"pre-flight gate, layers {[l['layer'] for l in gate['layers']]}: {gate_s:7.1f} s  "
          f"verdict {'pass' if gate['passed'] else 'fail'}")
    print(f"all {len(full['layers'])} layers (baseline):           {full_s:7.1f} s  "
          f"verdict {'pass' if full['passed'] else 'fail'}")
    print(f"gate / all layers: {gate_s / full_s:.2f}x   target: gate < 120 s")


if __name__ == "__main__":
    main()
