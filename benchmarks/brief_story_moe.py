"""The brief's section-1 story on the synthetic Gemma 4 MoE model, told by the validators.

    python benchmarks/brief_story_moe.py [--scope banks|all] [--seed 1] [--prompts PROMPTS.jsonl] [--also FORMAT]

Writes the synthetic MoE model (preset ``moe``: 4 layers, hidden 256, 16 experts, top-4, a
dense MLP beside them), calibrates on the built-in calibration prompts, and for each way of
quantizing the expert banks prints one table row: bits per weight of the banks, the worst
expert bank's weight SQNR, the layer validator's isolated minimum cosine on every sampled layer
and its cumulative minimum on the last, and the golden check against the exact reference (worst
per-position logit cosine, top-1 agreement pooled over all positions, the share of positions the
last MoE layer routes to the same experts as the exact model, the worst logit cosine again with
every token forced onto the exact model's experts, verdict at the default thresholds). First it
prints the exact model's realism statistics, the ones that decide how bank error reaches the
verdict, beside Gemma 3 270M's (the default model, on the same prompts,
positions after BOS): next-token peakedness (mean top-1 probability, median top-1 minus top-2
logit), the median update ratio |h_l+1 - h_l| / |h_l| per layer (also outside the highest-energy
channels), and anisotropy: the energy share of the top few residual channels (massive
activations), the mean pairwise cosine of a prompt's positions for the hidden states, the normed
final state and the logits, and |mean embedding row| / RMS row norm.

``--scope banks`` (the default) quantizes the expert banks only and keeps every other weight
float16, so the rows differ only in how the banks are quantized; ``--scope all`` applies the
format to every matrix (the router always stays float16), as the built-in recipes do.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from anepack import synth
from anepack.metrics import rowwise_cosine
from anepack.quant.metrics import weight_error
from anepack.reference import build
from anepack.reference.common import rms_norm
from anepack.reference.gemma4 import ForcedRouting, RecordedRouting
from anepack.source.default_model import resolve_model
from anepack.source.gguf_file import open_gguf
from anepack.validate.layers import sample_layers
from anepack.validate.recipes import parse_recipe
from anepack.validate.run import ValidationContext, golden_run, layers_run, tokenize
from anepack.validate.weights import ExactWeights, RecipeWeights

# (row label, format, banks as one tensor in a per-tensor format)
ROWS = (
    ("int8 per-tensor, whole banks", "int8-tensor", True),
    ("int8 per-tensor, per expert", "int8-tensor", False),
    ("lut4 g16, per expert", "lut4-g16", False),
    # The fewest LUT bits per expert that pass on the synthetic model (seeds 1-3).
    ("lut6 g16, per expert", "lut6-g16", False),
)
SCOPES = {"banks": "*_exps.weight", "all": "*"}


def story_recipe(fmt: str, scope: str):
    return parse_recipe(
        f'name = "{fmt} ({scope})"\ndescription = "brief section 1, {scope}"\n'
        f'[[rule]]\ntensors = "{SCOPES[scope]}"\nformat = "{fmt}"\n'
    )


TOP_CHANNELS = 4  # "a handful": Gemma 3 270M's massive activations sit in 1-3 channels


def pairwise_cosine(rows: np.ndarray) -> float:
    """Mean cosine between distinct rows (positions) of ``[T, D]``."""
    unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    gram = unit @ unit.T
    return float((gram.sum() - len(rows)) / (len(rows) * (len(rows) - 1)))


def mean_row_ratio(gguf, name: str = "token_embd.weight", chunk: int = 16384) -> float:
    """|mean row| / RMS row norm of a (vocab x n_embd) table, read by chunks of rows."""
    n_rows = gguf.info(name).shape[0]
    total, square = 0.0, 0.0
    for start in range(0, n_rows, chunk):
        rows = gguf.rows(name, start, start + chunk).astype(np.float64)
        total = total + rows.sum(axis=0)
        square += float(np.sum(rows**2))
    return float(np.linalg.norm(total / n_rows) / np.sqrt(square / n_rows))


class Realism(NamedTuple):
    """The exact model's statistics on the prompts that decide how weight error reaches a verdict."""

    top_probability: float  # mean top-1 probability
    margin: float  # median top-1 minus top-2 logit
    update_ratio: list[float]  # per layer, median |h_l+1 - h_l| / |h_l|
    update_ratio_others: list[float]  # the same outside the TOP_CHANNELS highest-energy channels
    top_share: list[float]  # per state (embedding, then each layer), energy share of the top channels
    hidden_cosine: list[float]  # per state, mean pairwise cosine of a prompt's positions
    final_cosine: float  # the same for the output-normed final state
    logit_cosine: float  # and for the logit vectors
    mean_row: float  # |mean embedding row| / RMS row norm

    def lines(self, name: str) -> list[str]:
        def row(values):
            return " ".join(f"{value:.2f}" for value in values)

        return [
            f"{name}: mean top-1 probability {self.top_probability:.2f}, median top-1 margin {self.margin:.2f}, "
            f"|mean embedding row| / RMS row {self.mean_row:.2f}",
            f"  median update ratio per layer {row(self.update_ratio)}; outside the top {TOP_CHANNELS} channels "
            f"{row(self.update_ratio_others)}",
            f"  top-{TOP_CHANNELS}-channel energy share, embedding then per layer {row(self.top_share)}",
            f"  mean pairwise cosine of positions: hidden states {row(self.hidden_cosine)}; "
            f"final normed {self.final_cosine:.2f}; logits {self.logit_cosine:.2f}",
        ]


def realism(gguf, tokens: list[np.ndarray]) -> Realism:
    """Realism statistics of ``gguf``'s exact model on ``tokens``; positions after BOS only.

    BOS is left out because real models treat it apart (attention sink, its own massive values).
    Pairwise cosines are averaged within each prompt, then over prompts.
    """
    config = gguf.config
    model = build(config, ExactWeights(gguf))
    output_norm = gguf.tensor("output_norm.weight")
    top_probability, margin, states_per_prompt, cosines = [], [], [], []
    for ids in tokens:
        result = model.forward(ids)
        logits = result.logits[1:].astype(np.float64)
        probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
        top_probability.append(probabilities.max(axis=1) / probabilities.sum(axis=1))
        ordered = np.sort(logits, axis=1)
        margin.append(ordered[:, -1] - ordered[:, -2])
        states = [state[1:].astype(np.float64) for state in (model.embed(ids), *result.hidden_states)]
        states_per_prompt.append(states)
        final = rms_norm(result.hidden_states[-1], output_norm, config.rms_eps)[1:].astype(np.float64)
        cosines.append([*map(pairwise_cosine, states), pairwise_cosine(final), pairwise_cosine(logits)])
    per_state = [np.concatenate(layer) for layer in zip(*states_per_prompt)]
    energy = [np.sum(state**2, axis=0) for state in per_state]

    def update_ratio(before, after):
        return float(np.median(np.linalg.norm(after - before, axis=1) / np.linalg.norm(before, axis=1)))

    def others(state_energy):  # every channel but the state's TOP_CHANNELS highest-energy ones
        return np.argsort(state_energy)[:-TOP_CHANNELS]

    mean_cosines = np.mean(cosines, axis=0)
    return Realism(
        float(np.mean(np.concatenate(top_probability))),
        float(np.median(np.concatenate(margin))),
        [update_ratio(a, b) for a, b in zip(per_state, per_state[1:])],
        [update_ratio(a[:, others(e)], b[:, others(e)]) for a, b, e in zip(per_state, per_state[1:], energy[1:])],
        [float(np.sort(e)[::-1][:TOP_CHANNELS].sum() / e.sum()) for e in energy],
        [float(c) for c in mean_cosines[:-2]],
        float(mean_cosines[-2]),
        float(mean_cosines[-1]),
        mean_row_ratio(gguf),
    )


def exact_runs(gguf, token_lists) -> list[tuple[np.ndarray, dict[int, np.ndarray]]]:
    """Per prompt, the exact model's logits and its experts per MoE layer."""
    exact = build(gguf.config, ExactWeights(gguf))
    runs = []
    for tokens in token_lists:
        exact.router = recorded = RecordedRouting()
        runs.append((exact.forward(tokens).logits, recorded.choices()))
    return runs


def exact_routing_cosine(gguf, weights: RecipeWeights, token_lists, exact) -> float:
    """Worst per-position logit cosine of the quantized stack made to route every token to the
    exact model's experts (``exact_runs``; weighted by its own router probabilities over them):
    what the golden check would see if quantization moved no token to another expert."""
    quantized = build(gguf.config, weights)
    worst = 1.0
    for tokens, (reference, choices) in zip(token_lists, exact):
        quantized.router = ForcedRouting(choices)
        worst = min(worst, float(rowwise_cosine(reference, quantized.forward(tokens).logits).min()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scope", choices=sorted(SCOPES), default="banks")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--prompts", help="validation prompts (JSONL); default: the built-in golden prompts")
    parser.add_argument("--also", action="append", default=[], metavar="FORMAT",
                        help="one more row: the banks in FORMAT, per expert (repeatable)")
    args = parser.parse_args()
    rows = ROWS + tuple((f"{fmt}, per expert", fmt, False) for fmt in args.also)

    dims, _ = synth.preset("gemma4", "moe")
    with tempfile.TemporaryDirectory() as folder:
        path = synth.write_synthetic_gguf(Path(folder) / "moe.gguf", "gemma4", seed=args.seed, **dims)
        with open_gguf(path) as gguf:
            context = ValidationContext.prepare(gguf, args.prompts)
            layers = sample_layers(gguf.config.n_layers)
            banks = sorted(name for name in gguf.tensors if name.endswith("_exps.weight"))
            print(f"synthetic gemma4 moe (seed {args.seed}), scope {args.scope}, sampled layers {layers}, "
                  f"{len(context.prompts)} prompts, {sum(map(len, context.tokens))} positions")
            for line in realism(gguf, context.tokens).lines("synthetic exact model"):
                print(line)
            with open_gguf(resolve_model(None)) as reference:
                for line in realism(reference, tokenize(reference, context.prompts)).lines("Gemma 3 270M"):
                    print(line)
            for note in context.record("layers", story_recipe("fp16", args.scope), {})["notes"]:
                print(f"note: {note}")
            exact = exact_runs(gguf, context.tokens)
            header = (f"{'expert banks':30} {'bits':>5} {'bank SQNR':>9}  {'isolated min per layer':28} "
                      f"{'cumul.':>6} {'logit cos':>9} {'top-1':>5} {'routed':>6} {'forced':>6}  golden")
            print(header)
            print("-" * len(header))
            for label, fmt, whole_banks in rows:
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
                      f"{golden['top1_pooled']:5.2f} {golden['routing'][-1]['same_experts']:6.2f} "
                      f"{exact_routing_cosine(gguf, weights, context.tokens, exact):6.4f}  "
                      f"{'pass' if golden['passed'] else 'FAIL'}  ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
