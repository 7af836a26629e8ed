"""``quantize-tensor`` and ``sweep``: matrices, expert banks and tensors no linear reads."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from anepack.cli import main
from anepack.quant.metrics import output_sqnr_db


def test_bank_output_sqnr_sums_every_experts_routed_rows():
    weight = np.array([[[1.0, 0.0]], [[0.0, 2.0]]], np.float32)  # two experts [1 x 2]
    approx = np.array([[[1.0, 0.5]], [[0.0, 2.0]]], np.float32)  # only expert 0 is off
    routed = [np.array([[2.0, 2.0]], np.float32), np.array([[0.0, 1.0], [0.0, 3.0]], np.float32)]
    # expert 0: exact 2, approx 3 (noise 1); expert 1: exact 2 and 6, no noise; signal 4 + 4 + 36
    assert output_sqnr_db(weight, approx, routed) == pytest.approx(10 * math.log10(44.0))
    assert output_sqnr_db(weight, approx, [routed[0][:0], routed[1]]) == math.inf  # expert 0 unused
    with pytest.raises(ValueError, match="1 experts' activations for a bank of 2"):
        output_sqnr_db(weight, approx, routed[:1])


def test_quantize_tensor_and_sweep_measure_banks_and_skip_output_error_where_no_linear_reads(synthetic_moe_path):
    runner = CliRunner()
    bank = "blk.1.ffn_down_exps.weight"
    result = runner.invoke(main, ["quantize-tensor", str(synthetic_moe_path), bank, "--format", "int8-channel",
                                  "--format", "lut4-g16", "--json"])
    assert result.exit_code == 0, result.output
    by_format = {r["format"]: r for r in json.loads(result.stdout)["results"]}
    assert math.isfinite(by_format["lut4-g16"]["output_sqnr_db"])
    assert by_format["int8-channel"]["output_sqnr_db"] > by_format["lut4-g16"]["output_sqnr_db"] + 10

    result = runner.invoke(main, ["quantize-tensor", str(synthetic_moe_path), "token_embd.weight",
                                  "--format", "lut4-g16", "--json"])
    assert result.exit_code == 0, result.output
    assert "output_sqnr_db" not in json.loads(result.stdout)["results"][0]

    result = runner.invoke(main, ["sweep", str(synthetic_moe_path), "--layers", "1", "--formats", "int8-tensor",
                                  "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["tensor"]: r for r in json.loads(result.stdout)["results"]}
    assert {bank, "blk.1.ffn_gate_up_exps.weight", "blk.1.attn_q.weight"} <= set(rows)
    assert all(math.isfinite(r["output_sqnr_db"]) for r in rows.values())
