"""Importance-weighted palettization on real Gemma 3 270M tensors, measured on held-out prompts.

Importance comes from the calibration prompts; the output error ``X @ W.T`` vs ``X @ Wq.T`` is
measured on the activations of the golden prompts, which calibration never saw.
"""

from __future__ import annotations

import numpy as np
import pytest

from anepack.golden import load_prompts
from anepack.quant import quantize
from anepack.quant.metrics import output_sqnr_db
from anepack.source import open_gguf
from anepack.validate.calibration import capture_inputs
from anepack.validate.run import calibration_tokens, tokenize
from anepack.validate.calibration import collect_importance

TENSORS = ["blk.0.attn_q.weight", "blk.0.ffn_down.weight", "blk.5.attn_output.weight", "blk.9.ffn_gate.weight"]


@pytest.fixture(scope="module")
def measured(default_model_path):
    with open_gguf(default_model_path) as gguf:
        _, calibration = calibration_tokens(gguf)
        importance = collect_importance(gguf, calibration, "test")
        held_out = capture_inputs(gguf, tokenize(gguf, load_prompts()), set(TENSORS))
        weights = {name: gguf.tensor(name) for name in TENSORS}
    return importance, held_out, weights


def test_importance_is_mean_squared_activation(measured):
    importance, _, weights = measured
    for name in TENSORS:
        columns = importance.get(name)
        assert columns.shape == (weights[name].shape[1],) and (columns >= 0).all()
    # q, k and v read the same normed input, so they share one importance vector
    assert np.array_equal(importance.get("blk.0.attn_q.weight"), importance.get("blk.0.attn_k.weight"))


@pytest.mark.parametrize("name", TENSORS)
def test_importance_lowers_held_out_output_error(measured, name):
    importance, held_out, weights = measured
    weight, activations = weights[name], held_out[name]
    plain = output_sqnr_db(weight, quantize(weight, "lut4-g16").dequantize(), activations)
    weighted = output_sqnr_db(weight, quantize(weight, "lut4-g16", importance.get(name)).dequantize(), activations)
    assert weighted > plain + 0.5, (name, plain, weighted)
