"""Recipe search on a synthetic model: the recipe it writes keeps the target it was given."""

from __future__ import annotations

import numpy as np

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
