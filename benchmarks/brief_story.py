"""The brief's story on a model, in numbers: one row per recipe from the layer and golden validators.

    python benchmarks/brief_story.py [MODEL] [--recipes int8-per-tensor,int8-per-channel,lut4-grouped,default]

Each row: bits per weight (layers, LM head), the layer validator over every layer (worst
isolated and cumulative hidden-state cosine, the layers below 0.97, the most-blamed tensor of
the worst layer), and the golden validator (worst per-position logit cosine, top-1 agreement
over all positions, which the verdict uses, and the worst prompt's), both verdicts, and the
seconds each took. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import time

from anepack.source.default_model import resolve_model
from anepack.source.gguf_file import open_gguf
from anepack.validate.recipes import load_recipe
from anepack.validate.run import ValidationContext, golden_run, layers_run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?")
    parser.add_argument("--recipes", default="int8-per-tensor,int8-per-channel,lut4-grouped,default")
    args = parser.parse_args()
    rows = []
    with open_gguf(resolve_model(args.model)) as gguf:
        context = ValidationContext.prepare(gguf)
        for name in args.recipes.split(","):
            recipe = load_recipe(name)
            weights = context.weights(recipe)
            started = time.perf_counter()
            layers = layers_run(context, recipe, list(range(gguf.config.n_layers)), weights=weights)
            layers_s = time.perf_counter() - started
            started = time.perf_counter()
            golden = golden_run(context, recipe, weights=weights)
            golden_s = time.perf_counter() - started
            worst = min(layers["layers"], key=lambda l: min(l["isolated_min"], l["cumulative_min"]))
            failing = [l["layer"] for l in layers["layers"] if not l["passed"]]
            rows.append(
                f"| `{name}` | {layers['bits']['layers_average']:.2f} / {layers['bits']['lm_head']:.2f} "
                f"| {min(l['isolated_min'] for l in layers['layers']):.4f} "
                f"| {min(l['cumulative_min'] for l in layers['layers']):.4f} "
                f"| {', '.join(map(str, failing)) or 'none'} "
                f"| {worst['blame'][0]['tensor'] if worst['blame'] else '-'} "
                f"| {'pass' if layers['passed'] else 'FAIL'} "
                f"| {min(p['min_cosine'] for p in golden['prompts']):.4f} "
                f"| {golden['top1_pooled']:.3f} / {min(p['top1_agreement'] for p in golden['prompts']):.3f} "
                f"| {'pass' if golden['passed'] else 'FAIL'} | {layers_s:.0f} + {golden_s:.0f} |"
            )
            print(rows[-1], flush=True)
    print()
    print("| recipe | bits/weight layers / LM head | min isolated cos | min cumulative cos | layers < 0.97 "
          "| most blamed (worst layer) | layer gate | min logit cos | top-1 all / worst prompt | golden | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
