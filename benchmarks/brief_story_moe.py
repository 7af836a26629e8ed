"""The brief's section-1 story on the synthetic Gemma 4 MoE model, told by the validators.

    python benchmarks/brief_story_moe.py [--scope banks|all] [--seed 1] [--prompts PROMPTS.jsonl]

Writes the synthetic MoE model (preset ``moe``: 4 layers, hidden 256, 16 experts, top-4, a
dense MLP beside them), calibrates on the built-in calibration prompts, and for each way of
quantizing the expert banks prints one table row: bits per weight of the banks, the worst
expert bank's weight SQNR, the layer validator's isolated minimum cosine on every sampled layer
and its cumulative minimum on the last, and the golden check against the exact reference (worst
per-position logit cosine, top-1 agreement pooled over all positions, verdict at the default
thresholds). First it prints the exact model's realism statistics, the ones that decide how
bank error reaches the verdict, beside Gemma 3 270M's (measured the same way on the golden
prompts): mean top-1 probability (0.51), median top-1 minus top-2 logit margin (1.29), and the
median update ratio |h_l+1 - h_l| / |h_l| per layer (4.8 and 7.0 at layers 0 and 1, then 0.35).

``--scope banks`` (the default) quantizes the expert banks only and keeps every other weight
float16, so the rows differ only in how the banks are quantized; ``--scope all`` applies the
format to every matrix (the router always stays float16), as the built-in recipes do.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from anepack import synth
from anepack.quant.metrics import weight_error
from anepack.reference import build
from anepack.source.gguf_file import open_gguf
from anepack.validate.layers import sample_layers
from anepack.validate.recipes import parse_recipe
from anepack.validate.run import ValidationContext, golden_run, layers_run
from anepack.validate.weights import ExactWeights, RecipeWeights

# (row label, format, banks as one tensor in a per-tensor format)
ROWS = (
    ("int8 per-tensor, whole banks", "int8-tensor", True),
    ("int8 per-tensor, per expert", "int8-tensor", False),
    ("lut4 g16, per expert", "lut4-g16", False),
    # Control: near-lossless banks. What it still loses is the synthetic model's own fragility
    # (flat next-token logits, a rare top-k routing swap), not the banks' format.
    ("lut8 g16, per expert (control)", "lut8-g16", False),
)
SCOPES = {"banks": "*_exps.weight", "all": "*"}


def story_recipe(fmt: str, scope: str):
    return parse_recipe(
        f'name = "{fmt} ({scope})"\ndescription = "brief section 1, {scope}"\n'
        f'[[rule]]\ntensors = "{SCOPES[scope]}"\nformat = "{fmt}"\n'
    )


def realism(context: ValidationContext) -> str:
    """The exact model's next-token peakedness and residual-stream update ratios on the prompts."""
    model = build(context.gguf.config, ExactWeights(context.gguf))
    top_probability, margin, ratios = [], [], []
    for tokens in context.tokens:
        result = model.forward(tokens)
        logits = result.logits.astype(np.float64)
        probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
        top_probability.append(probabilities.max(axis=1) / probabilities.sum(axis=1))
        ordered = np.sort(logits, axis=1)
        margin.append(ordered[:, -1] - ordered[:, -2])
        states = [model.embed(tokens), *result.hidden_states]
        ratios.append([np.linalg.norm(after - before, axis=1) / np.linalg.norm(before, axis=1)
                       for before, after in zip(states, states[1:])])
    per_layer = np.concatenate(ratios, axis=1)
    return (f"exact model: mean top-1 probability {np.mean(np.concatenate(top_probability)):.2f}, "
            f"median top-1 margin {np.median(np.concatenate(margin)):.2f}, median update ratio per layer "
            + " ".join(f"{np.median(layer):.2f}" for layer in per_layer))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scope", choices=sorted(SCOPES), default="banks")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--prompts", help="validation prompts (JSONL); default: the built-in golden prompts")
    args = parser.parse_args()

    dims, _ = synth.preset("gemma4", "moe")
    with tempfile.TemporaryDirectory() as folder:
        path = synth.write_synthetic_gguf(Path(folder) / "moe.gguf", "gemma4", seed=args.seed, **dims)
        with open_gguf(path) as gguf:
            context = ValidationContext.prepare(gguf, args.prompts)
            layers = sample_layers(gguf.config.n_layers)
            banks = sorted(name for name in gguf.tensors if name.endswith("_exps.weight"))
            print(f"synthetic gemma4 moe (seed {args.seed}), scope {args.scope}, sampled layers {layers}, "
                  f"{len(context.prompts)} prompts, {sum(map(len, context.tokens))} positions")
            print(realism(context))
            for note in context.record("layers", story_recipe("fp16", args.scope), {})["notes"]:
                print(f"note: {note}")
            header = (f"{'expert banks':30} {'bits':>5} {'bank SQNR':>9}  {'isolated min per layer':28} "
                      f"{'cumul.':>6} {'logit cos':>9} {'top-1':>5}  golden")
            print(header)
            print("-" * len(header))
            for label, fmt, whole_banks in ROWS:
                started = time.perf_counter()
                recipe = story_recipe(fmt, args.scope)
                weights = RecipeWeights(gguf, recipe, context.importance, whole_banks=whole_banks)
                stored = {bank: weights.compressed(bank) for bank in banks}
                sqnr = min(weight_error(gguf.tensor(bank), q.dequantize())["sqnr_db"] for bank, q in stored.items())
                bits = 8 * sum(q.payload_bytes for q in stored.values()) / sum(gguf.info(b).n_elements for b in banks)
                layer_record = layers_run(context, recipe, layers, with_blame=False, weights=weights)
                golden = golden_run(context, recipe, weights=weights)
                isolated = " ".join(f"{layer['isolated_min']:.4f}" for layer in layer_record["layers"])
                print(f"{label:30} {bits:5.2f} {sqnr:7.1f}dB  {isolated:28} "
                      f"{layer_record['layers'][-1]['cumulative_min']:6.4f} "
                      f"{min(p['min_cosine'] for p in golden['prompts']):9.4f} "
                      f"{golden['top1_pooled']:5.2f}  "
                      f"{'pass' if golden['passed'] else 'FAIL'}  ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
