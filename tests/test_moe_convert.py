"""``convert`` on the synthetic MoE model: the artifact check compares the shards with the
reference on the same weights routed as the shards routed, reports every position where the
shards chose other experts, and each such choice is a near-tie; the build reuses the experts
the gate quantized, from memory or from the store on disk; trunk matrices go to the store too."""

from __future__ import annotations

import json

import numpy as np
import pytest

from anepack.convert import MIN_ARTIFACT_COSINE, ConvertOptions, convert
from anepack.golden import load_prompts
from anepack.quant import QuantizedTensor, parse_format, quantize
from anepack.source import open_gguf
from anepack.tokenizer import Tokenizer
from anepack.validate.quantized_store import QuantizedStore
from anepack.validate.recipes import parse_recipe
from anepack.validate.run import ValidationContext, gate_run
from anepack.validate.weights import RecipeWeights, dequantized_expert

RECIPE = """
name = "moe-lut4-experts"
[[rule]]
tensors = "*_exps.weight"
format = "lut4-g16"
[[rule]]
tensors = "*"
format = "int8-channel"
"""
# Longer prompts than the shard tests': more routed positions, so near-ties occur.
PROMPTS = ("prose", "code", "list")


@pytest.fixture(scope="module")
def gguf(synthetic_moe_path):
    with open_gguf(synthetic_moe_path) as opened:
        yield opened


def test_artifact_check_routes_the_reference_as_the_shards_did(gguf, tmp_path):
    known = {prompt.name: prompt.text for prompt in load_prompts()}
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"name": name, "text": known[name]}) + "\n" for name in PROMPTS))
    options = ConvertOptions(chunk=16, context=128, gate_sample=2, force=True, use_importance=False)
    record = convert(gguf, parse_recipe(RECIPE), tmp_path / "shards", options, prompts)

    artifact = record["artifact"]
    assert artifact["min_cosine"] >= MIN_ARTIFACT_COSINE, artifact
    routing = artifact["routing"]
    with Tokenizer(gguf.path) as tokenizer:
        tokens = sum(len(tokenizer.encode(known[name])) for name in PROMPTS)
    assert routing["positions"] == sum(gguf.config.moe_layers) * tokens
    # These prompts do reach near-ties (4 of 704 positions measured), so the forcing is exercised.
    assert routing["differing"] > 0 and routing["near_ties"] == routing["differing"], routing
    assert any(note.startswith("routing: the shards chose other experts") for note in record["notes"])


def test_experts_are_quantized_once_and_served_alike_from_memory_or_disk(gguf, tmp_path):
    """An expert cut from the cached bank, read back from the store, or quantized alone
    has the same stored arrays, and dequantizes to the same weight."""
    bank = "blk.1.ffn_down_exps.weight"
    alone = RecipeWeights(gguf, parse_recipe(RECIPE)).quantized_expert(bank, 5)
    cached = RecipeWeights(gguf, parse_recipe(RECIPE))
    whole = cached.compressed(bank)
    reused = cached.quantized_expert(bank, 5)
    assert np.shares_memory(reused.indices, whole.indices)  # a view of the gate's bank, not a copy
    store = QuantizedStore(tmp_path)
    stored = RecipeWeights(gguf, parse_recipe(RECIPE), store=store)
    from_disk = stored.quantized_expert(bank, 5)
    for expert in (reused, from_disk):
        np.testing.assert_array_equal(alone.indices, expert.indices)
        np.testing.assert_array_equal(alone.lut, expert.lut)
    np.testing.assert_array_equal(stored.expert(bank, 5), cached.expert(bank, 5))
    np.testing.assert_array_equal(stored.compressed(bank).indices, whole.indices)
    assert stored.bits_per_weight(bank) == whole.bits_per_weight
    store.close()
    assert not store.directory.exists()


@pytest.mark.parametrize("spec", ["lut4-g16", "lut3-g8", "lut4-tensor", "lut4-g16-int8lut", "int8-channel"])
def test_expert_float32_lookup_equals_lut_to_dense(spec):
    weight = np.random.default_rng(7).standard_normal((64, 96)).astype(np.float32)
    stored = quantize(weight, parse_format(spec))
    expected = stored.dequantize().astype(np.float32)
    np.testing.assert_array_equal(dequantized_expert(QuantizedTensor.stack([stored])), expected)


def test_the_gate_blames_only_the_layers_that_fail(gguf, tmp_path):
    known = {prompt.name: prompt.text for prompt in load_prompts()}
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"name": "short", "text": known["short"]}) + "\n")
    context = ValidationContext.prepare(gguf, prompts, use_importance=False)
    damaged = parse_recipe('name = "damaged"\n[[rule]]\ntensors = "blk.2.ffn_down_exps.weight"\n'
                           'format = "lut1-tensor"\n[[rule]]\ntensors = "*"\nformat = "fp16"\n')
    # 0.999: the moe preset's massive residual channels (95% of the stream's energy) hide most of
    # a layer's damage; a 1-bit bank measures about 0.992 in isolation
    gate = gate_run(context, damaged, sample=4, min_layer_cosine=0.999)
    by_layer = {layer["layer"]: layer for layer in gate["layers"]}
    failing = [il for il, layer in by_layer.items() if not layer["passed"]]
    assert 2 in failing and 0 not in failing  # layer 0 runs before the damage, exactly
    assert all(bool(layer["blame"]) == (il in failing) for il, layer in by_layer.items())
    assert by_layer[2]["blame"][0]["tensor"] == "blk.2.ffn_down_exps.weight"


@pytest.mark.parametrize("spec", ["int8-channel", "lut4-g16", "lut6-tensor", "lut3-g16", "lut1-tensor",
                                  "int4-channel", "uint4-channel-affine"])
def test_matrices_are_stored_once_and_read_back_unchanged(gguf, tmp_path, spec):
    """A trunk matrix put in the store on first use comes back with the same stored arrays as
    quantizing it directly (``quantize``, no store, no cache), and later requests read the
    store's file instead of quantizing again."""
    matrix = "blk.0.attn_q.weight"
    recipe = parse_recipe(f'name = "m"\n[[rule]]\ntensors = "*"\nformat = "{spec}"\n')
    direct = quantize(gguf.tensor(matrix), parse_format(spec))
    store = QuantizedStore(tmp_path)
    stored = RecipeWeights(gguf, recipe, store=store)
    first = stored.compressed(matrix)
    assert matrix in store
    assert not stored._quantized  # nothing kept in memory
    files = sorted(store.directory.glob(f"{matrix}.*"))
    assert files
    # the codes (LUT indices, integer data) take their bits on disk, not a byte each
    for field, (array, bits) in direct.storage_bits().items():
        if field in ("indices", "data"):
            stored_bytes = (store.directory / f"{matrix}.{field}").stat().st_size
            assert stored_bytes == (array.size * bits // 8 if bits < 8 else array.nbytes), field
    mtimes = [f.stat().st_mtime_ns for f in files]
    assert stored.compressed(matrix) is first  # the last one read is kept: row chunks share it
    stored.compressed("blk.1.attn_q.weight")
    again = stored.quantized_matrix(matrix)
    assert again is not first  # read back from the file
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    for tensor in (first, again):
        assert type(tensor) is type(direct) and tensor.shape == direct.shape
        for field in ("data", "scale", "indices", "lut"):
            if hasattr(direct, field):
                np.testing.assert_array_equal(getattr(tensor, field), getattr(direct, field))
        np.testing.assert_array_equal(tensor.dequantize(), direct.dequantize())
    np.testing.assert_array_equal(stored(matrix), direct.dequantize().astype(np.float32))


def test_a_store_that_cannot_be_written_fails_in_one_line(gguf, tmp_path):
    """A full disk or a removed directory: an AnepackError naming the store's directory."""
    from anepack.errors import AnepackError

    store = QuantizedStore(tmp_path)
    store.close()  # the directory is gone
    weights = RecipeWeights(gguf, parse_recipe(RECIPE), store=store)
    for request in (lambda: weights.compressed("blk.0.attn_q.weight"),
                    lambda: weights.quantized_expert("blk.0.ffn_down_exps.weight", 0)):
        with pytest.raises(AnepackError, match="cannot store quantized weights here") as error:
            request()
        assert str(store.directory) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("spec", ["int8-tensor", "lut4-tensor"])
def test_a_bank_with_one_scale_is_stored_whole_and_read_by_experts(gguf, tmp_path, spec):
    """One scale or LUT over a whole bank (the brief's failure): quantized once, kept on disk,
    not in memory; each expert read back equals its slice of the in-memory bank, with the
    bank's one scale or LUT, and the bits count it once."""
    bank = "blk.1.ffn_gate_up_exps.weight"
    recipe = parse_recipe(f'name = "t"\n[[rule]]\ntensors = "*_exps.weight"\nformat = "{spec}"\n')
    whole = RecipeWeights(gguf, recipe).compressed(bank)
    codes, shared = ("data", "scale") if spec.startswith("int") else ("indices", "lut")
    assert getattr(whole, shared).shape[0] == 1  # one scale or LUT over the bank
    stored = RecipeWeights(gguf, recipe, store=QuantizedStore(tmp_path))
    dense = whole.dequantize()
    for index in (0, 7, gguf.info(bank).shape[0] - 1):
        expert = stored.quantized_expert(bank, index)
        np.testing.assert_array_equal(getattr(expert, codes), getattr(whole, codes)[index:index + 1])
        np.testing.assert_array_equal(getattr(expert, shared), getattr(whole, shared))
        np.testing.assert_array_equal(stored.expert(bank, index), dense[index].astype(np.float32))
    assert not stored._quantized
    assert stored.bits_per_weight(bank) == whole.bits_per_weight
    np.testing.assert_array_equal(getattr(stored.compressed(bank), codes), getattr(whole, codes))
    with pytest.raises(IndexError):
        stored.quantized_expert(bank, gguf.info(bank).shape[0])


@pytest.mark.parametrize("spec", ["int8-tensor", "uint8-tensor", "int4-tensor"])
def test_a_bank_with_one_linear_scale_is_quantized_by_passes_over_its_rows(gguf, spec, monkeypatch):
    """Reading the bank a part at a time (the float32 bank never held) gives the tensor that
    ``quantize`` gives on the whole bank; the parts are small enough here that there are many."""
    from anepack.quant import linear, quantize_bank_streamed

    bank = "blk.2.ffn_gate_up_exps.weight"
    shape = gguf.info(bank).shape
    importance = np.random.default_rng(3).gamma(1.0, 1.0, shape[-1]).astype(np.float32)
    whole = quantize(gguf.tensor(bank), spec, importance, whole_bank=True)
    reads = []

    def read_rows(start, stop):
        reads.append((start, stop))
        return gguf.rows(bank, start, stop)

    monkeypatch.setattr(linear, "ROW_CHUNK_ELEMENTS", 1 << 16)  # parts of a few hundred rows
    streamed = quantize_bank_streamed(read_rows, shape, spec, importance)
    assert max(stop - start for start, stop in reads) < shape[0] * shape[1] // 8  # never the whole bank
    np.testing.assert_array_equal(streamed.data, whole.data)
    np.testing.assert_array_equal(streamed.scale, whole.scale)
    assert (streamed.offset is None) == (whole.offset is None)
    if whole.offset is not None:
        np.testing.assert_array_equal(streamed.offset, whole.offset)
    assert quantize_bank_streamed(read_rows, shape, "lut4-tensor") is None  # a LUT needs the whole bank


def test_packed_codes_closed_form():
    """LSB first, as Core ML packs sub-byte weights: 6-bit codes 1, 2, 3, 63 are the 24-bit
    integer 1 + 2 * 2**6 + 3 * 2**12 + 63 * 2**18; signed 4-bit -1, 3 is the byte 0x3F."""
    from anepack.validate.quantized_store import _file_bytes, _unpacked

    six = _file_bytes(np.array([1, 2, 3, 63], np.uint8), 6)
    assert int.from_bytes(six, "little") == 1 + 2 * 2**6 + 3 * 2**12 + 63 * 2**18 and len(six) == 3
    assert _file_bytes(np.array([-1, 3], np.int8), 4) == bytes([0x3F])
    np.testing.assert_array_equal(_unpacked(np.frombuffer(bytes([0x3F]), np.uint8), 4, 2, np.int8), [-1, 3])
    three = _file_bytes(np.arange(8, dtype=np.uint8), 3)
    assert int.from_bytes(three, "little") == sum(value << (3 * value) for value in range(8))


@pytest.mark.parametrize("spec", ["lut4-g16", "int4-channel", "uint4-block32", "lut3-g16", "lut6-g16", "lut1-tensor",
                                  "int8-channel"])
def test_sub_byte_codes_are_stored_packed_and_read_back_unchanged(gguf, tmp_path, spec):
    """Codes of 1-6 bits (LUT indices, signed and unsigned int4 data and offsets) take their bits
    on disk; every expert and the whole bank read back equal what was written."""
    bank = "blk.0.ffn_down_exps.weight"
    experts = [quantize(gguf.expert(bank, e), spec) for e in range(gguf.info(bank).shape[0])]
    store = QuantizedStore(tmp_path)
    store.write(bank, experts)
    written = QuantizedTensor.stack(experts)
    for field, (array, bits) in written.storage_bits().items():
        size = (store.directory / f"{bank}.{field}").stat().st_size
        assert size == (array.size * bits // 8 if bits < 8 else array.nbytes), (field, bits)
    for index in (0, 5, len(experts) - 1):
        read = store.expert(bank, index)
        for field, (array, _) in written.storage_bits().items():
            np.testing.assert_array_equal(getattr(read, field), array[index:index + 1])
            assert getattr(read, field).dtype == array.dtype
    whole = store.get(bank)
    for field, (array, _) in written.storage_bits().items():
        np.testing.assert_array_equal(getattr(whole, field), array)
    np.testing.assert_array_equal(whole.dequantize(), written.dequantize())
