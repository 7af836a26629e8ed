"""Outlier statistics against closed-form cases, and the inspect command's JSON."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np

from anepack.inspection import outlier_stats
from anepack.source import open_gguf
from tiny_gguf import llama_tensors, write_llama


def test_outlier_stats_closed_form(tmp_path):
    tensors = llama_tensors()
    signs = np.where(np.arange(64 * 32).reshape(64, 32) % 2 == 0, 1.0, -1.0).astype(np.float32)
    tensors["blk.0.ffn_up.weight"] = signs * 0.5  # two symmetric values: kurtosis -2, exact in int8
    spike = np.zeros((64, 32), np.float32)
    spike[:, 0] = 1.0
    spike[3, 5] = 100.0
    tensors["blk.0.ffn_gate.weight"] = spike
    path = write_llama(tmp_path / "stats.gguf", tensors=tensors)
    with open_gguf(path) as gguf:
        flat = outlier_stats(gguf, "blk.0.ffn_up.weight")
        assert math.isclose(flat["excess_kurtosis"], -2.0, abs_tol=1e-9)
        assert math.isclose(flat["max_abs_over_std"], 1.0, rel_tol=1e-9)
        assert flat["int8_tensor_sqnr_db"] == math.inf and flat["int8_channel_sqnr_db"] == math.inf

        stats = outlier_stats(gguf, "blk.0.ffn_gate.weight")
        values = spike.astype(np.float64).ravel()
        assert math.isclose(stats["max_abs_over_std"], 100.0 / values.std(), rel_tol=1e-6)
        # Core ML stores the scale in fp16: s = fp16(100/127). Every 1.0 takes code 1 (value s);
        # the spike takes code 127 (value fp16(127 s)). Per tensor all 64 ones are off by 1 - s.
        scale = float(np.float16(100.0 / 127.0))
        spike_error = (100.0 - float(np.float16(127 * scale))) ** 2
        signal = float(values @ values)
        noise = 64 * (1.0 - scale) ** 2 + spike_error
        assert math.isclose(stats["int8_tensor_sqnr_db"], 10 * math.log10(signal / noise), rel_tol=1e-5)
        # per channel only row 3 (the spike's row) has that scale; every other row is exact
        noise_channel = (1.0 - scale) ** 2 + spike_error
        assert math.isclose(stats["int8_channel_sqnr_db"], 10 * math.log10(signal / noise_channel), rel_tol=1e-5)


def test_inspect_json(tmp_path):
    path = write_llama(tmp_path / "tiny.gguf", n_layers=2)
    result = subprocess.run([sys.executable, "-m", "anepack.cli", "inspect", str(path), "--json"],
                            capture_output=True, text=True, check=True)
    doc = json.loads(result.stdout)
    assert doc["architecture"] == "llama" and doc["hyperparameters"]["n_layers"] == 2
    assert doc["parameters"] == sum(a.size for a in llama_tensors(2).values())
    assert doc["by_kind"]["attn_q.weight"]["tensors"] == 2
    stats = {t["name"]: t for t in doc["tensors"] if "excess_kurtosis" in t}
    assert len(stats) == 1 + 2 * 7  # every matrix: embedding plus seven per layer
