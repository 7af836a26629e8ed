"""The validators on a synthetic model: blame, isolated vs cumulative, the gate, the golden check."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from anepack.source import open_gguf
from anepack.synth import write_synthetic_gguf
from anepack.validate.layers import sample_layers
from anepack.validate.recipes import parse_recipe
from anepack.validate.run import GateFailed, ValidationContext, calibrate, gate_run, golden_run, layers_run, require_gate
from anepack.validate.weights import RecipeWeights


def recipe(*rules: tuple[str, str]) -> str:
    body = "".join(f'\n[[rule]]\ntensors = "{pattern}"\nformat = "{fmt}"\n' for pattern, fmt in rules)
    return parse_recipe('name = "test"\ndescription = "test"\n' + body)


@pytest.fixture(scope="module")
def context(tmp_path_factory):
    path = write_synthetic_gguf(tmp_path_factory.mktemp("validate") / "g3.gguf", "gemma3", layers=6, seed=11)
    gguf = open_gguf(path)
    yield ValidationContext.prepare(gguf, use_importance=False)
    gguf.close()


def test_sample_layers_closed_form():
    assert sample_layers(18) == [0, 4, 8, 13, 17]
    assert sample_layers(30) == [0, 7, 14, 22, 29]
    assert sample_layers(3) == [0, 1, 2]


def test_blame_names_the_one_damaged_tensor(context):
    damaged = recipe(("blk.2.ffn_up.weight", "lut1-tensor"))
    record = layers_run(context, damaged, [2])
    layer = record["layers"][0]
    assert layer["blame"][0]["tensor"] == "blk.2.ffn_up.weight"
    assert layer["blame"][0]["share"] > 0.9
    assert layer["blame"][0]["format"] == "lut1-tensor"
    assert layer["isolated_min"] < 0.99


def test_cumulative_sees_what_isolated_cannot(context):
    # only layer 0 is damaged: layer 3 alone is exact (fp16), but the stack carries layer 0's error
    damaged = recipe(("blk.0.*", "lut2-tensor"))
    record = layers_run(context, damaged, [0, 3], with_blame=False)
    layer0, layer3 = record["layers"]
    assert layer3["isolated_min"] > 0.999
    assert layer3["cumulative_min"] < layer3["isolated_min"] - 0.01
    assert layer0["cumulative_min"] == pytest.approx(layer0["isolated_min"])


def test_gate_stops_a_failing_recipe_and_names_the_blame(context):
    record = gate_run(context, recipe(("blk.*.attn_v.weight", "lut1-tensor")), sample=3)
    assert not record["passed"] and record["kind"] == "gate"
    with pytest.raises(GateFailed) as failure:
        require_gate(record)
    message = str(failure.value)
    assert "attn_v.weight" in message and "pre-flight gate failed" in message and "\n" not in message
    forced = require_gate(record, force=True)
    assert forced["forced"] and any("--force" in note for note in forced["notes"])


def test_a_recipe_that_names_only_some_tensors_says_so(context):
    """6 layers x 7 matrices + the LM head are compressible; blk.0.* names 7 of those 43."""
    from anepack.validate.run import UNMATCHED_NOTE

    notes = context.record("layers", recipe(("blk.0.*", "int8-channel")), {})["notes"]
    assert f"{UNMATCHED_NOTE}: 36 of 43 compressible tensors match no rule of recipe 'test' " \
           "(first: blk.1.attn_q.weight)" in notes
    assert not any(note.startswith(UNMATCHED_NOTE) for note in context.record("layers", recipe(("*", "fp16")), {})["notes"])


def test_golden_check_passes_fp16_and_fails_one_bit(context):
    exact = golden_run(context, recipe(("*", "fp16")))
    assert exact["passed"]
    assert min(p["min_cosine"] for p in exact["prompts"]) > 0.999
    broken = golden_run(context, recipe(("blk.*", "lut1-tensor")))
    assert not broken["passed"]
    assert any(p["first_failing_position"] is not None for p in broken["prompts"])
    assert broken["bits"]["layers_average"] < 1.1


def test_the_build_quantizes_a_matrix_as_the_validators_did(context):
    """``quantized_matrix`` (what the builder stores when no validator cached the matrix) equals
    ``compressed`` (what the validators measured), importance and the LM head's row importance
    included; and the row importance does change a LUT head."""
    gguf = context.gguf
    importance = calibrate(gguf)
    assert importance.rows("output.weight") is not None
    lut_head = recipe(("output.weight", "lut4-tensor"), ("*", "lut4-g16"))
    for name in ("output.weight", "blk.2.ffn_down.weight"):
        built = RecipeWeights(gguf, lut_head, importance).quantized_matrix(name)
        measured = RecipeWeights(gguf, lut_head, importance).compressed(name)
        assert np.array_equal(built.dequantize(), measured.dequantize())
    without_rows = RecipeWeights(gguf, lut_head, dataclasses.replace(importance, output_rows={}))
    assert not np.array_equal(without_rows.compressed("output.weight").dequantize(),
                              RecipeWeights(gguf, lut_head, importance).compressed("output.weight").dequantize())


def test_the_build_stores_lm_head_row_chunks_as_the_validators_measured_them(context):
    """A head in a grouped LUT is built in row chunks, each quantized on its own: every chunk must
    equal the validators' whole head cut to those rows, row importance included."""
    from anepack.coreml.builder import stored_matrix
    from anepack.quant.packing import weight_rows

    gguf = context.gguf
    grouped_head = recipe(("output.weight", "lut4-g16"), ("*", "int8-channel"))
    weights = RecipeWeights(gguf, grouped_head, calibrate(gguf))
    whole = weights.compressed("output.weight")
    for rows in ((0, 64), (512, 1024)):
        chunk = stored_matrix(RecipeWeights(gguf, grouped_head, calibrate(gguf)), "output.weight", rows)
        assert np.array_equal(chunk.dequantize(), weight_rows(whole, *rows).dequantize())
