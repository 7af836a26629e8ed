"""Quantization formats: dequantize() matches coremltools' own decompression bit for bit,
closed-form cases hold, payload accounting is exact, and the brief's failure reproduces."""

from __future__ import annotations

import numpy as np
import pytest

coremltools = pytest.importorskip("coremltools")
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402
from coremltools.optimize.coreml._quantization_passes import WeightDecompressor  # noqa: E402

from anepack.errors import AnepackError  # noqa: E402
from anepack.metrics import cosine, sqnr_db  # noqa: E402
from anepack.quant import (  # noqa: E402
    FormatSpecError,
    LinearTensor,
    PalettizedTensor,
    formats,
    parse_format,
    quantize,
)
from anepack.quant.synthetic import expert_bank  # noqa: E402

# ---------------------------------------------------------------------------------------
# coremltools as the reference: build the constexpr ops from the stored arrays with the MIL
# builder (iOS18 opset) and let coremltools' WeightDecompressor pass (what
# ct.optimize.coreml.decompress_weights runs) materialize the weight.


def _mil_dtype(array: np.ndarray, nbits: int) -> np.ndarray:
    kind = "int" if np.issubdtype(array.dtype, np.signedinteger) else "uint"
    return array.astype(types.nptype_from_builtin(types.string_to_builtin(f"{kind}{nbits}")))


def _constexpr_weight(q):
    nbits = q.format.nbits
    if isinstance(q, LinearTensor):
        offset = None if q.offset is None else _mil_dtype(q.offset, nbits)
        return mb.constexpr_blockwise_shift_scale(
            data=_mil_dtype(q.data, nbits), scale=q.scale, offset=offset
        )
    lut = q.lut
    if q.lut_scale is not None:
        lut = mb.constexpr_blockwise_shift_scale(data=q.lut, scale=q.lut_scale)
    arguments = {"indices": _mil_dtype(q.indices, nbits), "lut": lut}
    if q.vector_axis is not None:
        arguments["vector_axis"] = np.int32(q.vector_axis)
    weight = mb.constexpr_lut_to_dense(**arguments)
    if q.channel_scale is not None:
        weight = mb.constexpr_blockwise_shift_scale(data=weight, scale=q.channel_scale)
    return weight


def coremltools_decompressed(q) -> np.ndarray:
    @mb.program(
        input_specs=[mb.TensorSpec(q.shape, dtype=types.fp16)],
        opset_version=coremltools.target.iOS18,
    )
    def program(x):
        return mb.add(x=x, y=_constexpr_weight(q), name="uses_weight")

    WeightDecompressor(op_selector=lambda op: True).apply(program)
    (consumer,) = program.functions["main"].find_ops(op_type="add")
    assert consumer.y.op.op_type == "const"
    return consumer.y.val


def assert_bit_exact(q):
    ours = q.dequantize()
    reference = coremltools_decompressed(q)
    assert ours.dtype == np.float16 and reference.dtype == np.float16
    assert ours.shape == reference.shape == q.shape
    assert np.array_equal(ours.view(np.uint16), reference.view(np.uint16))


@pytest.fixture(scope="module")
def heavy_tailed():
    rng = np.random.default_rng(7)
    weight = rng.standard_t(4, size=(64, 96)).astype(np.float32) * 0.05
    weight[3, 5] = 1.5  # an outlier, so per-tensor and per-channel scales differ a lot
    importance = rng.gamma(1.0, 1.0, size=96).astype(np.float32)
    return weight, importance


# ---------------------------------------------------------------------------------------
# Bit-exactness, one test per family.

LINEAR_SPECS = [
    "int8-tensor", "int8-channel", "int8-block32", "int4-tensor", "int4-channel",
    "int4-block32", "uint8-channel", "uint4-block16", "int8-channel-affine",
    "uint8-tensor-affine", "int4-block32-affine", "uint4-channel-affine",
]


@pytest.mark.parametrize("spec", LINEAR_SPECS)
def test_linear_matches_coremltools(heavy_tailed, spec):
    weight, importance = heavy_tailed
    for given in (None, importance):
        assert_bit_exact(quantize(weight, spec, given))


@pytest.mark.parametrize(
    "spec",
    ["lut1-tensor", "lut2-g8", "lut3-g16", "lut3-tensor", "lut4-tensor", "lut4-g16", "lut6-g4",
     "lut8-g16"],
)
def test_scalar_lut_matches_coremltools(heavy_tailed, spec):
    weight, importance = heavy_tailed
    assert_bit_exact(quantize(weight, spec))
    assert_bit_exact(quantize(weight, spec, importance))


@pytest.mark.parametrize("spec", ["lut4-g16-pcs", "lut3-tensor-pcs", "lut6-g8-pcs"])
def test_lut_with_per_channel_scale_matches_coremltools(heavy_tailed, spec):
    weight, importance = heavy_tailed
    q = quantize(weight, spec, importance)
    assert q.channel_scale.shape == (weight.shape[0], 1)
    assert_bit_exact(q)


@pytest.mark.parametrize("spec", ["lut8-g8-int8lut", "lut4-g16-int8lut", "lut4-g16-pcs-int8lut"])
def test_int8_lut_matches_coremltools(heavy_tailed, spec):
    weight, _ = heavy_tailed
    q = quantize(weight, spec)
    assert q.lut.dtype == np.int8 and q.lut_scale.shape == q.lut.shape[:2] + (1, 1)
    assert_bit_exact(q)


@pytest.mark.parametrize("spec", ["vlut2x8", "vlut4x4", "vlut3x2"])
def test_vector_lut_matches_coremltools(heavy_tailed, spec):
    weight, importance = heavy_tailed
    q = quantize(weight, spec, importance)
    size = q.format.vector_size
    assert q.indices.shape == (weight.shape[0] // size, weight.shape[1])
    assert q.lut.shape == (1, 1, q.format.entries, size)
    assert_bit_exact(q)


@pytest.mark.parametrize("spec", ["int8-tensor", "int4-block32", "lut4-g16-pcs-int8lut", "vlut2x8"])
def test_expert_banks_match_coremltools(spec):
    bank = np.random.default_rng(3).standard_normal((3, 32, 64)).astype(np.float32)
    bank[1] *= 10.0
    for whole_bank in (False, True):
        assert_bit_exact(quantize(bank, spec, whole_bank=whole_bank))


# ---------------------------------------------------------------------------------------
# Bank semantics: per expert by default, one tensor on request.


def test_bank_is_per_expert_unless_whole_bank():
    rng = np.random.default_rng(4)
    bank = rng.standard_normal((4, 16, 32)).astype(np.float32)
    bank[2] *= 100.0
    per_expert = quantize(bank, "int8-tensor")
    whole = quantize(bank, "int8-tensor", whole_bank=True)
    assert per_expert.scale.shape == (4, 1, 1) and whole.scale.shape == (1, 1, 1)
    for e in range(4):
        alone = quantize(bank[e], "int8-tensor")
        assert np.array_equal(per_expert.dequantize()[e], alone.dequantize())
    # One scale for all: the small experts collapse onto few levels.
    whole_db = sqnr_db(bank[0], whole.dequantize()[0])
    assert whole_db < sqnr_db(bank[0], per_expert.dequantize()[0]) - 30


# ---------------------------------------------------------------------------------------
# Closed-form cases.


def test_lut4_g16_reproduces_sixteen_values_per_group_exactly():
    rng = np.random.default_rng(5)
    groups, cols = 4, 40
    palettes = np.sort(rng.standard_normal((groups, 16)), axis=1).astype(np.float16)
    picks = rng.integers(0, 16, size=(groups, 16 * cols))
    picks[:, :16] = np.arange(16)  # every palette value occurs
    weight = np.take_along_axis(palettes, picks, axis=1).reshape(groups * 16, cols)
    q = quantize(weight.astype(np.float32), "lut4-g16")
    assert np.array_equal(q.dequantize(), weight)


@pytest.mark.parametrize(
    "spec, steps", [("int4-channel", 7), ("int8-tensor", 127), ("uint4-channel", 7)]
)
def test_weights_on_the_grid_are_exact(spec, steps):
    rng = np.random.default_rng(6)
    scales = (2.0 ** rng.integers(-8, 0, size=(24, 1))).astype(np.float32)
    if spec.endswith("tensor"):
        scales[:] = scales[0]
    codes = rng.integers(-steps, steps + 1, size=(24, 48))
    codes[:, 0] = steps  # the largest code sets the scale to exactly this grid's step
    weight = (codes * scales).astype(np.float32)
    assert np.array_equal(quantize(weight, spec).dequantize(), weight.astype(np.float16))


def test_int8_channel_error_is_at_most_half_a_step():
    rng = np.random.default_rng(8)
    row_scales = rng.uniform(0.01, 3.0, size=(40, 1))
    weight = (rng.standard_t(3, size=(40, 80)) * row_scales).astype(np.float32)
    q = quantize(weight, "int8-channel")
    step = q.scale.astype(np.float64)  # [Cout, 1]
    error = np.abs(weight - q.dequantize().astype(np.float64))
    # Rounding to the nearest level, then the final rounding of the product to float16.
    fp16_half_ulp = np.spacing(np.abs(weight).max(axis=1, keepdims=True).astype(np.float16)) / 2
    assert np.all(error.max(axis=1, keepdims=True) <= step / 2 + fp16_half_ulp.astype(np.float64))
    assert np.allclose(step, np.abs(weight).max(axis=1, keepdims=True) / 127, rtol=2**-10)


def test_affine_covers_one_sided_ranges_better_than_symmetric():
    weight = np.random.default_rng(9).uniform(0.0, 1.0, size=(8, 64)).astype(np.float32)
    symmetric = sqnr_db(weight, quantize(weight, "int4-channel").dequantize())
    affine = sqnr_db(weight, quantize(weight, "int4-channel-affine").dequantize())
    # 15 levels over [0, 1] instead of 7: about 20 log10(15 / 7) = 6.6 dB better.
    assert 5.0 < affine - symmetric < 8.0


# ---------------------------------------------------------------------------------------
# Importance: the weighted error it targets goes down.


@pytest.mark.parametrize("spec", ["int4-channel", "lut3-g16", "lut4-g16-pcs", "vlut4x4"])
def test_importance_reduces_weighted_error(heavy_tailed, spec):
    weight, _ = heavy_tailed
    importance = np.ones(weight.shape[1], np.float32)
    importance[:8] = 1000.0  # a few columns matter far more (as with activation outliers)

    def weighted_error(q):
        return float(np.sum(importance * (weight - q.dequantize().astype(np.float32)) ** 2))

    plain = weighted_error(quantize(weight, spec))
    assert weighted_error(quantize(weight, spec, importance)) < plain


# ---------------------------------------------------------------------------------------
# Payload accounting, by hand.


def test_bits_per_weight_counts_every_stored_byte():
    weight = np.random.default_rng(10).standard_normal((64, 128)).astype(np.float32)
    n = 64 * 128
    expected = {
        # 4-bit indices + 4 groups x 16 fp16 entries
        "lut4-g16": (4 * n + 16 * 16 * 4) / n,
        "lut4-g16-pcs": (4 * n + 16 * 16 * 4 + 16 * 64) / n,
        # 8-bit indices + 8 groups x 256 int8 entries + 8 fp16 LUT scales
        "lut8-g8-int8lut": (8 * n + 8 * 256 * 8 + 8 * 16) / n,
        "lut3-tensor": (3 * n + 8 * 16) / n,
        "int8-tensor": (8 * n + 16) / n,
        "int8-channel": (8 * n + 16 * 64) / n,
        # 4-bit data + per 32 columns one fp16 scale and one 4-bit offset
        "int4-block32-affine": (4 * n + (16 + 4) * 64 * 4) / n,
        "uint8-channel": (8 * n + (16 + 8) * 64) / n,
        # 2-bit index per 8 weights + 4 vectors of 8 fp16
        "vlut2x8": (2 * n / 8 + 4 * 8 * 16) / n,
        "fp16": 16.0,
    }
    for spec, bits in expected.items():
        assert quantize(weight, spec).bits_per_weight == pytest.approx(bits, rel=1e-12), spec


def test_bits_round_up_to_whole_bytes_per_array():
    weight = np.random.default_rng(11).standard_normal((3, 5)).astype(np.float32)
    q = quantize(weight, "lut3-tensor")  # 15 x 3 bits = 45 bits -> 6 bytes; LUT 16 bytes
    assert q.payload_bytes == 6 + 16


# ---------------------------------------------------------------------------------------
# Format values and the grammar.


def test_every_standard_format_round_trips_and_quantizes():
    weight = np.random.default_rng(12).standard_normal((32, 64)).astype(np.float32)
    for fmt in formats():
        assert parse_format(fmt.spec) == fmt
        out = quantize(weight, fmt.spec).dequantize()
        assert out.dtype == np.float16 and out.shape == weight.shape


def test_grammar_values():
    assert parse_format("int8-channel-affine") == parse_format("INT8-channel-affine")
    fmt = parse_format("uint4-block64-affine")
    assert (fmt.nbits, fmt.signed, fmt.block_size, fmt.affine) == (4, False, 64, True)
    assert fmt.code_range == (0, 15)
    assert parse_format("int8-channel").code_range == (-127, 127)
    assert parse_format("int4-tensor").code_range == (-7, 7)
    assert parse_format("uint8-channel").code_range == (0, 254)
    lut = parse_format("lut4-g16-pcs-int8lut")
    assert (lut.nbits, lut.group_size, lut.per_channel_scale, lut.int8_lut) == (4, 16, True, True)


@pytest.mark.parametrize(
    "spec, safe",
    [
        ("int8-tensor", True), ("int4-channel", True), ("int4-block32", False),
        ("uint8-block32-affine", False), ("lut4-g16", True), ("lut8-g8-int8lut", True),
        ("lut4-g16-pcs", True), ("vlut2x8", True), ("vlut4x16", True), ("vlut6x8", False),
        ("vlut1x32", False), ("fp16", True),
    ],
)
def test_ane_safety(spec, safe):
    assert parse_format(spec).ane_safe is safe


@pytest.mark.parametrize(
    "spec", ["int8", "int16-channel", "int8-block0", "int8-block032", "lut5-g16", "lut4-g0",
             "lut4-g16-int8lut-pcs", "vlut4x1", "vlut5x8", "lut4", "float16"]
)
def test_bad_specs_are_one_line_user_errors(spec):
    with pytest.raises(FormatSpecError) as caught:
        parse_format(spec)
    assert isinstance(caught.value, AnepackError) and "\n" not in str(caught.value)


def test_shapes_the_format_cannot_hold_are_user_errors():
    weight = np.zeros((24, 40), np.float32)
    for spec in ("lut4-g16", "int4-block32", "vlut2x16"):
        with pytest.raises(FormatSpecError):
            quantize(weight, spec)
    with pytest.raises(AnepackError):
        quantize(np.full((4, 4), np.nan, np.float32), "int8-channel")
    with pytest.raises(AnepackError):
        quantize(weight, "int8-channel", importance=np.ones(7))


def test_zero_rows_stay_zero_in_linear_formats():
    weight = np.zeros((16, 32), np.float32)
    weight[3] = np.linspace(-1, 1, 32)
    for spec in ("int8-channel", "int4-block16-affine", "uint8-channel", "int8-tensor-affine"):
        out = quantize(weight, spec).dequantize()
        assert not out[np.arange(16) != 3].any(), spec


# ---------------------------------------------------------------------------------------
# The brief's failure, in numbers, on the full synthetic 45056 x 704 bank.


def test_per_tensor_int8_fails_on_a_big_expert_bank_where_finer_granularity_holds():
    bank = expert_bank(0)
    assert bank.shape == (45056, 704)
    per_tensor = cosine(bank, quantize(bank, "int8-tensor").dequantize())
    per_channel = cosine(bank, quantize(bank, "int8-channel").dequantize())
    lut4 = cosine(bank, quantize(bank, "lut4-g16").dequantize())
    assert per_tensor < 0.95
    assert per_channel > 0.999
    assert lut4 > 0.99


@pytest.mark.parametrize("spec", ["lut4-g16", "lut3-tensor", "lut6-g8-pcs", "vlut2x8", "vlut4x4"])
def test_blocked_clustering_and_decoding_change_nothing(heavy_tailed, spec, monkeypatch):
    """Large tensors (an LM head) are clustered and decoded a block of groups / rows at a time;
    blocks of a few rows here give the same codes and LUTs and stay bit-exact with coremltools."""
    from anepack.quant import lut as lut_module

    weight, importance = heavy_tailed
    rows = np.random.default_rng(3).gamma(1.0, 1.0, size=weight.shape[0]).astype(np.float32)
    row_importance = None if spec.startswith("vlut") else rows
    whole = quantize(weight, spec, importance, row_importance=row_importance)
    monkeypatch.setattr(lut_module, "_WEIGHTS_BLOCK_ELEMENTS", 3 * 8 * weight.shape[1])
    monkeypatch.setattr(lut_module, "_DECODE_BLOCK_ELEMENTS", 5 * weight.shape[1])
    blocked = quantize(weight, spec, importance, row_importance=row_importance)
    assert np.array_equal(blocked.indices, whole.indices) and np.array_equal(blocked.lut, whole.lut)
    assert np.array_equal(blocked.dequantize().view(np.uint16), whole.dequantize().view(np.uint16))
    assert_bit_exact(blocked)
