"""What a pass over a large model keeps in memory: the GGUF reader's bf16/f16 widening against
gguf-py's dequantizers, the map's pages released once a tensor or expert is read, and an
expert package's codes shared (not copied) by its prefill and decode functions."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import coremltools
import pytest
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from anepack.coreml.weights import emit_weight
from anepack.quant import parse_format, quantize
from anepack.source import open_gguf
from tiny_gguf import write_llama

BANK_SHAPE = (4, 512, 1024)  # 4 experts of 512 x 1024: 4 MB as bf16


def _bank_file(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    bank = (rng.standard_normal(BANK_SHAPE) * 0.02).astype(np.float32)
    bank.flat[::997] = 1e30  # beyond float16's range: a widening through float16 would give inf
    raw = {
        "bf16_bank": gguf_quants.quantize(bank, GGMLQuantizationType.BF16),
        "f16_matrix": np.clip(bank[0], -1, 1).astype(np.float16),
    }
    path = write_llama(tmp_path / "banks.gguf", raw={
        "bf16_bank": (raw["bf16_bank"], GGMLQuantizationType.BF16),
        "f16_matrix": (raw["f16_matrix"].view(np.uint8), GGMLQuantizationType.F16),
    })
    return path, raw


def test_bf16_and_f16_widen_exactly_as_gguf_py_dequantizes(tmp_path):
    path, raw = _bank_file(tmp_path)
    expected_bank = gguf_quants.dequantize(raw["bf16_bank"], GGMLQuantizationType.BF16)
    expected_matrix = gguf_quants.dequantize(raw["f16_matrix"].view(np.uint8), GGMLQuantizationType.F16)
    with open_gguf(path) as gguf:
        np.testing.assert_array_equal(gguf.tensor("bf16_bank").view(np.uint32), expected_bank.view(np.uint32))
        np.testing.assert_array_equal(gguf.expert("bf16_bank", 2), expected_bank[2])
        np.testing.assert_array_equal(gguf.rows("bf16_bank", 700, 900), expected_bank.reshape(-1, 1024)[700:900])
        np.testing.assert_array_equal(gguf.tensor("f16_matrix"), expected_matrix)


def _resident_kb(path: Path) -> int:
    """Resident kB of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if line[:1].isalnum() and "-" in line.split()[0]:
            inside = line.endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_reading_experts_leaves_their_pages_released(tmp_path):
    path, _ = _bank_file(tmp_path)
    bank_kb = np.prod(BANK_SHAPE) * 2 // 1024
    with open_gguf(path) as gguf:
        for expert in range(BANK_SHAPE[0]):
            gguf.expert("bf16_bank", expert)
        gguf.tensor("f16_matrix")
        # The header pages stay (metadata is parsed from them); a tensor's pages do not.
        assert _resident_kb(path) < bank_kb // 8, (_resident_kb(path), bank_kb)
        # Released pages come back from the file when read again.
        first = gguf.expert("bf16_bank", 0)
        np.testing.assert_array_equal(first, gguf.expert("bf16_bank", 0))


def test_prefill_and_decode_share_one_copy_of_the_codes():
    weight = np.random.default_rng(4).standard_normal((64, 128)).astype(np.float32)
    stored = quantize(weight, parse_format("lut4-g16"))
    uint4 = types.nptype_from_builtin(types.string_to_builtin("uint4"))
    constants = []

    for _ in ("prefill", "decode"):  # two programs emit the same stored weight
        @mb.program(input_specs=[mb.TensorSpec(shape=(1, 128), dtype=types.fp16)],
                    opset_version=coremltools.target.iOS18)
        def program(x):
            return mb.linear(x=x, weight=emit_weight(stored, "w"))

        indices = next(op for op in program.functions["main"].operations if op.name == "w_indices")
        constants.append(indices.outputs[0].val)
    assert all(np.shares_memory(array, stored.indices) for array in constants)
    assert all(array.dtype == np.dtype(uint4) and array.dtype.metadata == np.dtype(uint4).metadata
               for array in constants)
