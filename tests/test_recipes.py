"""Recipes: parsing, rule matching, built-ins, and bits per weight counted without quantizing."""

from __future__ import annotations

import numpy as np
import pytest

from anepack.errors import AnepackError
from anepack.quant import formats, quantize
from anepack.source import open_gguf
from anepack.synth import write_synthetic_gguf
from anepack.validate.bits import recipe_bits
from anepack.validate.recipes import builtin_recipe_names, load_recipe, parse_layers, parse_recipe
from anepack.validate.run import ValidationContext, golden_run, layers_run

TEXT = """
name = "mixed"
description = "test"

[[rule]]
tensors = "blk.*.ffn_down.weight"
layers = "0-1,5"
format = "int8-channel"

[[rule]]
tensors = "blk.*"
format = "lut4-g16"

[[rule]]
tensors = "output.weight"
format = "lut6-tensor"
"""


def test_first_matching_rule_wins_and_layers_restrict():
    recipe = parse_recipe(TEXT)
    assert recipe.format_for("blk.0.ffn_down.weight").spec == "int8-channel"
    assert recipe.format_for("blk.5.ffn_down.weight").spec == "int8-channel"
    assert recipe.format_for("blk.2.ffn_down.weight").spec == "lut4-g16"
    assert recipe.format_for("blk.2.attn_q.weight").spec == "lut4-g16"
    assert recipe.format_for("output.weight").spec == "lut6-tensor"
    assert recipe.format_for("token_embd.weight").spec == "fp16"
    assert parse_recipe(recipe.to_toml()) == recipe
    assert parse_layers("3, 0-1") == {0, 1, 3}


def test_bad_recipes_name_file_and_problem(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('name = "x"\n[[rule]]\ntensors = "*"\nformat = "lut5-g16"\n')
    with pytest.raises(AnepackError, match=r"bad.toml: rule 1: LUT indices have .* bits, not 5"):
        load_recipe(path)
    path.write_text('name = "x"\n[[rule]]\ntensors = "*"\nlayers = "4-2"\nformat = "fp16"\n')
    with pytest.raises(AnepackError, match="runs backwards"):
        load_recipe(path)
    with pytest.raises(AnepackError, match="no such recipe file or built-in recipe"):
        load_recipe(tmp_path / "missing.toml")
    # misspelt keys would leave every tensor float16 without a word
    path.write_text('name = "x"\n[[rules]]\ntensors = "*"\nformat = "lut4-g16"\n')
    with pytest.raises(AnepackError, match=r"bad.toml: the recipe has unknown keys 'rules'"):
        load_recipe(path)
    path.write_text('name = "x"\n[[rule]]\ntensors = "*"\nlayer = "0-3"\nformat = "lut4-g16"\n')
    with pytest.raises(AnepackError, match=r"bad.toml: rule 1 has unknown keys 'layer'"):
        load_recipe(path)
    path.write_text('name = "x"\ndescription = "nothing"\n')
    with pytest.raises(AnepackError, match=r"bad.toml: recipe has no \[\[rule\]\] tables"):
        load_recipe(path)


def test_builtin_recipes_reproduce_the_brief():
    names = builtin_recipe_names()
    for name in ("int8-per-tensor", "int8-per-channel", "int4-per-block", "lut4-grouped", "default"):
        assert name in names
    assert load_recipe("int4-per-block").format_for("blk.3.attn_q.weight").spec == "int4-block32"
    assert not load_recipe("int4-per-block").rules[0].format.ane_safe
    assert all(load_recipe(name).rules[0].format.ane_safe for name in ("int8-per-channel", "lut4-grouped"))


def test_counted_bits_equal_the_quantized_payload(tmp_path):
    rng = np.random.default_rng(0)
    for fmt in formats():
        for shape in ((64, 128), (4, 32, 64)):
            weight = rng.standard_normal(shape).astype(np.float32)
            assert quantize(weight, fmt).payload_bytes == fmt.payload_bytes(shape), (fmt.spec, shape)
    path = write_synthetic_gguf(tmp_path / "m.gguf", "llama", layers=2, seed=1)
    with open_gguf(path) as gguf:
        rows, bits = recipe_bits(gguf, parse_recipe(TEXT))
        by_name = {row["name"]: row for row in rows}
        down = gguf.tensor("blk.0.ffn_down.weight")
        assert by_name["blk.0.ffn_down.weight"]["bits_per_weight"] == quantize(down, "int8-channel").bits_per_weight
        head = gguf.tensor("output.weight")
        assert bits["lm_head"] == quantize(head, "lut6-tensor").bits_per_weight
        layer_rows = [row for row in rows if row["layer"] is not None]
        expected = sum(r["bits_per_weight"] * r["parameters"] for r in layer_rows) / sum(r["parameters"] for r in layer_rows)
        assert bits["layers_average"] == pytest.approx(expected, rel=1e-12)


@pytest.mark.slow
def test_default_recipe_passes_the_layer_gate_and_the_golden_check_on_the_default_model(default_model_path):
    """The built-in `default` recipe (searched on the calibration prompts) against the exact numpy
    reference (matched to llama.cpp in test_reference.py) on the held-out golden prompts: every
    layer's isolated and cumulative hidden-state cosine >= 0.97, logit cosine >= 0.97 at every
    position, top-1 agreement >= 0.90 pooled; ANE-safe formats only, the LM head at 6 bits and its LUT."""
    recipe = load_recipe("default")
    assert all(rule.format.ane_safe for rule in recipe.rules)
    with open_gguf(default_model_path) as gguf:
        context = ValidationContext.prepare(gguf)
        weights = context.weights(recipe)
        layers = layers_run(context, recipe, list(range(gguf.config.n_layers)), with_blame=False, weights=weights)
        golden = golden_run(context, recipe, weights=weights)
    worst = min(min(layer["isolated_min"], layer["cumulative_min"]) for layer in layers["layers"])
    assert layers["passed"], worst
    assert all(prompt["min_cosine"] >= 0.97 for prompt in golden["prompts"]), golden["prompts"]
    assert golden["top1_pooled"] >= 0.90 and golden["passed"]
    # 6 bits per index plus the one 64-entry float16 LUT: 1024 bits over 168M weights
    assert golden["bits"]["lm_head"] == pytest.approx(6.0 + 1024 / (262144 * 640))
    assert golden["bits"]["layers_average"] < 8.0  # fewer bits than uniform int8-per-channel (8.02)
