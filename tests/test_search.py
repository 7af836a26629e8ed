"""Recipe search on a synthetic model: the recipe it writes keeps the target it was given."""

from __future__ import annotations

import numpy as np

from anepack.metrics import rowwise_cosine
from anepack.reference import build
from anepack.source import open_gguf
from anepack.synth import write_synthetic_gguf
from anepack.validate.layers import validate_layers
from anepack.validate.recipes import parse_recipe
from anepack.validate.run import calibration_tokens
from anepack.validate.search import search_recipe
from anepack.validate.weights import RecipeWeights


def test_searched_recipe_keeps_its_target_when_validated_independently(tmp_path):
    path = write_synthetic_gguf(tmp_path / "llama.gguf", "llama", layers=2, seed=4)
    target = 0.995
    with open_gguf(path) as gguf:
        _, tokens = calibration_tokens(gguf)
        result = search_recipe(gguf, tokens, None, target, max_bpw=16.0)
        assert min(result.layer_cosine) >= target
        recipe = parse_recipe(result.recipe.text)
        assert recipe == result.recipe
        specs = {recipe.format_for(f"blk.{il}.{kind}.weight").spec
                 for il in range(2) for kind in ("attn_q", "attn_k", "attn_v", "attn_output",
                                                 "ffn_gate", "ffn_up", "ffn_down")}
        assert specs - {"fp16"}, "the search compressed nothing"
        assert all(recipe.format_for(name).ane_safe for name in ("blk.0.ffn_up.weight", "output.weight"))
        # the layer validator, run on the written recipe, sees what the search promised
        checks = validate_layers(gguf, RecipeWeights(gguf, recipe), tokens, [0, 1], with_blame=False)
        assert min(float(np.min(check.cumulative)) for check in checks) >= target - 1e-6
        assert result.within_budget
        # and the golden bars it searched under (0.97 logit cosine, 0.90 pooled top-1) hold on the
        # calibration prompts through an independent forward pass of the written recipe
        recipe_weights = RecipeWeights(gguf, recipe)
        exact, quantized = build(gguf.config, recipe_weights.exact), build(gguf.config, recipe_weights)
        expected = exact.prompt_logits(tokens)
        logits = quantized.prompt_logits(tokens)
        assert min(float(rowwise_cosine(e, q).min()) for e, q in zip(expected, logits)) >= 0.97 - 1e-6
        agree = np.concatenate([np.argmax(e, axis=1) == np.argmax(q, axis=1) for e, q in zip(expected, logits)])
        assert agree.mean() >= 0.90


def test_final_state_target_holds_for_the_written_recipe(tmp_path):
    from anepack.metrics import rowwise_cosine
    from anepack.reference import build
    from anepack.reference.common import rms_norm

    path = write_synthetic_gguf(tmp_path / "llama.gguf", "llama", layers=2, seed=4)
    final_target = 0.999
    with open_gguf(path) as gguf:
        _, tokens = calibration_tokens(gguf)
        result = search_recipe(gguf, tokens, None, 0.99, max_bpw=16.0, min_final_cosine=final_target)
        assert result.final_cosine >= final_target
        weights = RecipeWeights(gguf, parse_recipe(result.recipe.text))
        exact, quantized = build(gguf.config, weights.exact), build(gguf.config, weights)
        norm = gguf.tensor("output_norm.weight")
        worst = 1.0
        for prompt in tokens:
            finals = []
            for model in (exact, quantized):
                hidden = model.embed(prompt)
                for il in range(gguf.config.n_layers):
                    hidden = model.layer(il, hidden)
                finals.append(rms_norm(hidden, norm, gguf.config.rms_eps))
            worst = min(worst, float(rowwise_cosine(*finals).min()))
        assert worst >= final_target - 1e-6


def test_a_head_format_that_cannot_hold_the_head_is_skipped(tmp_path, monkeypatch):
    from anepack.validate import search

    path = write_synthetic_gguf(tmp_path / "llama.gguf", "llama", layers=2, seed=4)
    with open_gguf(path) as gguf:
        _, tokens = calibration_tokens(gguf)
        vocab = gguf.config.vocab_size
        # one LUT per vocab + 1 rows cannot be stored: the quantizer refuses it
        monkeypatch.setattr(search, "HEAD_LADDER", (f"lut6-g{vocab + 1}", "int8-channel"))
        result = search.search_recipe(gguf, tokens, None, 0.99, max_bpw=16.0)
    assert result.recipe.format_for("output.weight").spec == "int8-channel"
    assert any(line.startswith(f"output.weight skips lut6-g{vocab + 1}") for line in result.log)
