"""The lazy GGUF reader against gguf-py's own reader, and its one-line errors on bad input."""

from __future__ import annotations

import struct
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader
from gguf import quants as gguf_quants

from anepack.errors import AnepackError
from anepack.source import open_gguf
from anepack.source.config import LlamaConfig
from tiny_gguf import llama_tensors, write_llama


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "anepack.cli", *args], capture_output=True, text=True)


def test_reader_matches_gguf_py(tmp_path):
    path = write_llama(tmp_path / "tiny.gguf", n_layers=2)
    reference = GGUFReader(path)
    with open_gguf(path) as gguf:
        assert list(gguf.tensors) == [t.name for t in reference.tensors]
        for ref in reference.tensors:
            info = gguf.tensors[ref.name]
            assert info.shape == tuple(reversed([int(d) for d in ref.shape]))
            assert info.ggml_type == ref.tensor_type
            np.testing.assert_array_equal(gguf.tensor(ref.name), ref.data.reshape(info.shape))
        for field in reference.fields.values():
            if field.name.startswith("GGUF."):
                continue
            assert field.name in gguf.metadata
        assert gguf.metadata["tokenizer.ggml.tokens"] == [f"t{i}" for i in range(48)]
        assert gguf.metadata["llama.block_count"] == 2
        assert isinstance(gguf.config, LlamaConfig) and gguf.config.n_layers == 2
        assert gguf.config.tied_embeddings


def test_quantized_tensor_and_expert_slices(tmp_path):
    rng = np.random.default_rng(1)
    bank = rng.standard_normal((4, 8, 64)).astype(np.float32)
    packed = gguf_quants.quantize(bank, GGMLQuantizationType.Q8_0)
    path = write_llama(tmp_path / "q.gguf", raw={"bank": (packed, GGMLQuantizationType.Q8_0)})
    expected = gguf_quants.dequantize(packed, GGMLQuantizationType.Q8_0)
    with open_gguf(path) as gguf:
        assert gguf.tensors["bank"].shape == (4, 8, 64)
        np.testing.assert_array_equal(gguf.tensor("bank"), expected)
        for e in range(4):
            np.testing.assert_array_equal(gguf.expert("bank", e), expected[e])
        np.testing.assert_array_equal(gguf.rows("bank", 5, 11), expected.reshape(32, 64)[5:11])
        assert np.abs(gguf.tensor("bank") - bank).max() < 0.05


def _bad_files(tmp_path):
    """(file, expected phrase) for every kind of bad input the reader must name."""
    good = write_llama(tmp_path / "good.gguf")
    data = good.read_bytes()
    cases = {}

    missing = tmp_path / "missing.gguf"
    cases["missing"] = (missing, "no such file")

    text = tmp_path / "text.gguf"
    text.write_text("this is not a model at all, just some text\n")
    cases["not-gguf"] = (text, "not a GGUF file")

    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) - 1000])
    cases["truncated"] = (truncated, "truncated")

    truncated_header = tmp_path / "truncated_header.gguf"
    truncated_header.write_bytes(data[:200])
    cases["truncated-header"] = (truncated_header, "truncated")

    absurd = tmp_path / "absurd.gguf"
    absurd.write_bytes(data[:8] + struct.pack("<Q", 1 << 60) + data[16:])
    cases["absurd-count"] = (absurd, "more than the file can hold")

    absurd_kv = tmp_path / "absurd_kv.gguf"
    absurd_kv.write_bytes(data[:16] + struct.pack("<Q", 1 << 40) + data[24:])
    cases["absurd-kv"] = (absurd_kv, "more than the file can hold")

    cases["unknown-arch"] = (write_llama(tmp_path / "arch.gguf", arch="mamba9"), "unknown architecture 'mamba9'")

    q81 = np.zeros((4, 40 * 2), dtype=np.uint8)  # Q8_1: 32 values in 40 bytes; gguf-py cannot dequantize it
    cases["unsupported-type"] = (
        write_llama(tmp_path / "q81.gguf", raw={"blk.0.extra.weight": (q81, GGMLQuantizationType.Q8_1)}),
        "cannot dequantize",
    )

    tensors = llama_tensors()
    del tensors["blk.0.ffn_up.weight"]
    cases["missing-tensor"] = (write_llama(tmp_path / "missing_tensor.gguf", tensors=tensors), "missing required tensor 'blk.0.ffn_up.weight'")

    tensors = llama_tensors()
    tensors["blk.0.attn_q.weight"] = np.zeros((16, 32), np.float32)
    cases["wrong-shape"] = (write_llama(tmp_path / "shape.gguf", tensors=tensors), "has shape [16, 32], expected [32, 32]")
    return cases


def test_bad_inputs_raise_one_line_errors(tmp_path):
    for label, (path, phrase) in _bad_files(tmp_path).items():
        with pytest.raises(AnepackError) as caught:
            with open_gguf(path) as gguf:
                gguf.config  # architecture and tensor checks
                for name in gguf.tensors:
                    gguf.tensor(name)
        message = str(caught.value)
        assert phrase in message, (label, message)
        assert str(path) in message and "\n" not in message, label


def test_cli_bad_inputs_exit_nonzero_without_traceback(tmp_path):
    for label, (path, phrase) in _bad_files(tmp_path).items():
        if label == "unsupported-type":
            continue  # the type is only reached when a tensor is dequantized: checked via dequant below
        result = run_cli("inspect", str(path), "--no-stats")
        assert result.returncode == 2, (label, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and phrase in lines[0] and str(path) in lines[0], (label, result.stderr)
        assert "Traceback" not in result.stderr and result.stdout == ""
    path, phrase = _bad_files(tmp_path)["unsupported-type"]
    target = tmp_path / "never.gguf"
    result = run_cli("dequant", str(path), str(target))
    assert result.returncode == 2 and phrase in result.stderr and "Traceback" not in result.stderr
    assert not target.exists() and not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("command", [
    ["recipes"], ["golden", "record", "--out", "{tmp}/x.golden"], ["convert", "--out", "{tmp}/shards"],
    ["validate", "layers", "--recipe", "int8-per-channel"], ["recipe", "search", "--out", "{tmp}/x.toml"],
    ["quantize-tensor", "blk.0.attn_q.weight", "--format", "lut4-g16"],
])
def test_every_model_command_names_a_bad_model_in_one_line_and_writes_nothing(tmp_path, command):
    """Each command reads the model's architecture and shapes before llama.cpp or an output sees it."""
    from click.testing import CliRunner

    from anepack.cli import main

    cases = _bad_files(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    args = [part.format(tmp=out) for part in command]
    for label in ("unknown-arch", "wrong-shape", "missing-tensor", "truncated"):
        path, phrase = cases[label]
        # the model argument goes right after the command's own words
        words = 2 if command[0] in ("golden", "validate", "recipe") else 1
        result = CliRunner().invoke(main, [*args[:words], str(path), *args[words:], "--db", str(out / "runs.sqlite")]
                                    if command[0] in ("convert", "validate") else [*args[:words], str(path), *args[words:]])
        assert result.exit_code == 2, (label, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and phrase in lines[0] and str(path) in lines[0], (label, result.stderr)
        assert list(out.iterdir()) == [], (label, list(out.iterdir()))
