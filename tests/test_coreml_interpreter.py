"""MIL interpreter: small programs built with coremltools' MIL builder, saved as .mlpackage,
run op by op and checked against closed-form numpy; constexpr weights equal
``QuantizedTensor.dequantize()`` bit for bit; the weight.bin reader equals coremltools' own."""

from __future__ import annotations

import math
import shutil

import coremltools as ct
import numpy as np
import pytest
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types
from coremltools.libmilstoragepython import _BlobStorageReader
from coremltools.proto import Model_pb2

from anepack.coreml.interpreter import SUPPORTED_OPS, BlobStorage, MilProgram
from anepack.errors import AnepackError
from anepack.quant import LinearTensor, quantize

fp16 = types.fp16
SPEC_FILE = "Data/com.apple.CoreML/model.mlmodel"
WEIGHT_FILE = "Data/com.apple.CoreML/weights/weight.bin"


def save(program, path, default_passes: bool = False) -> MilProgram:
    """Convert as the shard builder does (iOS18, fp16) and load the saved package. The empty
    pass pipeline keeps every op the test wrote instead of fusing or folding it."""
    model = ct.convert(
        program,
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS18,
        compute_precision=ct.precision.FLOAT16,
        skip_model_load=True,
        pass_pipeline=None if default_passes else ct.PassPipeline.EMPTY,
    )
    model.save(str(path))
    return MilProgram.load(path)


def saved_block(path):
    """The main function's block of the saved spec, read straight from the protobuf."""
    spec = Model_pb2.Model()
    spec.ParseFromString((path / SPEC_FILE).read_bytes())
    function = spec.mlProgram.functions["main"]
    return function.block_specializations[function.opset]


def saved_ops(path) -> list[str]:
    return [op.type for op in saved_block(path).operations]


# Relative error of an op computed in float32 (a few roundings and libm calls of ~2^-23 each).
FLOAT32_OP_ERROR = 2.0**-18


def assert_one_rounding(ours: np.ndarray, exact: np.ndarray, accumulation: np.ndarray | float = 0.0):
    """``ours`` is the float16 rounding of ``exact`` (computed in float64), except where
    ``exact`` lies within float32 error of the tie between two float16 neighbours; there it
    may be the other neighbour. ``accumulation`` bounds the extra float32 error of sums."""
    exact = np.asarray(exact, dtype=np.float64)
    assert ours.dtype == np.float16 and ours.shape == exact.shape
    rounded = exact.astype(np.float16)
    differs = ours != rounded
    tie = (ours.astype(np.float64) + rounded.astype(np.float64)) / 2.0
    float32_error = np.broadcast_to(accumulation, exact.shape) + FLOAT32_OP_ERROR * np.abs(exact)
    neighbours = np.abs(ours.astype(np.float64) - rounded.astype(np.float64)) <= np.spacing(
        np.maximum(np.abs(ours), np.abs(rounded))
    )
    assert np.all(neighbours[differs])
    assert np.all(np.abs(exact - tie)[differs] <= float32_error[differs])


# ---------------------------------------------------------------------------------------
# Compute ops, one rounding each.


def test_elementwise_and_activation_ops(tmp_path):

    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 32)).astype(np.float16)
    y = rng.uniform(0.5, 2.0, (4, 32)).astype(np.float16)
    row = rng.standard_normal(32).astype(np.float16)

    @mb.program(
        input_specs=[mb.TensorSpec((4, 32), dtype=fp16), mb.TensorSpec((4, 32), dtype=fp16),
                     mb.TensorSpec((32,), dtype=fp16)],
        opset_version=ct.target.iOS18,
    )
    def program(x, y, row):
        return (
            mb.add(x=x, y=y, name="add"), mb.sub(x=x, y=y, name="sub"),
            mb.mul(x=x, y=row, name="mul"), mb.real_div(x=x, y=y, name="real_div"),
            mb.pow(x=y, y=x, name="pow"), mb.maximum(x=x, y=y, name="maximum"),
            mb.minimum(x=x, y=y, name="minimum"), mb.sqrt(x=y, name="sqrt"),
            mb.square(x=x, name="square"), mb.rsqrt(x=y, epsilon=1e-3, name="rsqrt"),
            mb.tanh(x=x, name="tanh"), mb.sigmoid(x=x, name="sigmoid"), mb.silu(x=x, name="silu"),
            mb.gelu(x=x, mode="EXACT", name="gelu_exact"),
            mb.gelu(x=x, mode="TANH_APPROXIMATION", name="gelu_tanh"),
            mb.clip(x=x, alpha=np.float16(-0.5), beta=np.float16(0.75), name="clip"),
        )

    out = save(program, tmp_path / "elementwise.mlpackage").run("main", {"x": x, "y": y, "row": row})
    xe, ye, re = (a.astype(np.float64) for a in (x, y, row))
    erf = np.vectorize(math.erf)
    exact = {
        "add": xe + ye, "sub": xe - ye, "mul": xe * re, "real_div": xe / ye, "pow": ye**xe,
        "maximum": np.maximum(xe, ye), "minimum": np.minimum(xe, ye), "sqrt": np.sqrt(ye),
        "square": xe * xe, "rsqrt": 1.0 / np.sqrt(ye + 1e-3), "tanh": np.tanh(xe),
        "sigmoid": 1.0 / (1.0 + np.exp(-xe)), "silu": xe / (1.0 + np.exp(-xe)),
        "gelu_exact": 0.5 * xe * (1.0 + erf(xe / np.sqrt(2.0))),
        "gelu_tanh": 0.5 * xe * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (xe + 0.044715 * xe**3))),
        "clip": np.clip(xe, -0.5, 0.75),
    }
    assert set(out) == set(exact)
    for name, expected in exact.items():
        assert_one_rounding(out[name], expected)


def test_reductions_normalization_and_softmax(tmp_path):

    rng = np.random.default_rng(2)
    x = (rng.standard_normal((3, 4, 16)) * 3).astype(np.float16)
    gamma = rng.uniform(0.5, 1.5, 16).astype(np.float16)
    beta = rng.standard_normal(16).astype(np.float16)

    @mb.program(input_specs=[mb.TensorSpec((3, 4, 16), dtype=fp16)], opset_version=ct.target.iOS18)
    def program(x):
        return (
            mb.reduce_mean(x=x, axes=[-1], keep_dims=True, name="mean_last"),
            mb.reduce_sum(x=x, axes=[1], keep_dims=False, name="sum_middle"),
            mb.reduce_sum(x=x, name="sum_all"),
            mb.reduce_max(x=x, axes=[0, 2], name="max_outer"),
            mb.layer_norm(x=x, axes=[-1], gamma=gamma, beta=beta, epsilon=np.float16(1e-5),
                          name="layer_norm"),
            mb.softmax(x=x, axis=-1, name="softmax_last"),
            mb.softmax(x=x, axis=1, name="softmax_middle"),
        )

    out = save(program, tmp_path / "reductions.mlpackage").run("main", {"x": x})
    xe = x.astype(np.float64)
    magnitude = np.abs(xe)
    accumulation_eps = 1e-6  # 16-term float32 sums: well under 16 * 2^-24 of the summed magnitude
    assert_one_rounding(out["mean_last"], xe.mean(-1, keepdims=True),
                        accumulation_eps * magnitude.mean(-1, keepdims=True))
    assert_one_rounding(out["sum_middle"], xe.sum(1), accumulation_eps * magnitude.sum(1))
    assert_one_rounding(out["sum_all"], xe.sum(), accumulation_eps * magnitude.sum())
    assert np.array_equal(out["max_outer"], x.max(axis=(0, 2)))  # a maximum is exact
    centered = xe - xe.mean(-1, keepdims=True)
    normed = centered / np.sqrt((centered**2).mean(-1, keepdims=True) + 1e-5)
    assert_one_rounding(out["layer_norm"], normed * gamma + beta, accumulation_eps * 8)
    for name, axis in (("softmax_last", -1), ("softmax_middle", 1)):
        exponentials = np.exp(xe - xe.max(axis, keepdims=True))
        assert_one_rounding(out[name], exponentials / exponentials.sum(axis, keepdims=True))


def test_linear_and_matmul(tmp_path):

    rng = np.random.default_rng(3)
    weight = rng.standard_normal((48, 64)).astype(np.float16)
    bias = rng.standard_normal(48).astype(np.float16)
    x = rng.standard_normal((2, 5, 64)).astype(np.float16)
    a = rng.standard_normal((2, 3, 5, 16)).astype(np.float16)
    b = rng.standard_normal((3, 16, 7)).astype(np.float16)
    c = rng.standard_normal((3, 16, 5)).astype(np.float16)
    d = rng.standard_normal((3, 7, 16)).astype(np.float16)
    specs = [mb.TensorSpec(array.shape, dtype=fp16) for array in (x, a, b, c, d)]

    @mb.program(input_specs=specs, opset_version=ct.target.iOS18)
    def program(x, a, b, c, d):
        return (
            mb.linear(x=x, weight=weight, bias=bias, name="linear"),
            mb.matmul(x=a, y=b, name="broadcast"),
            mb.matmul(x=c, y=d, transpose_x=True, transpose_y=True, name="transposed"),
        )

    path = tmp_path / "matmul.mlpackage"
    out = save(program, path).run("main", {"x": x, "a": a, "b": b, "c": c, "d": d})
    assert {"linear", "matmul", "const"} <= set(saved_ops(path))
    f = {name: array.astype(np.float64) for name, array in zip("xabcd", (x, a, b, c, d))}
    w, bias64 = weight.astype(np.float64), bias.astype(np.float64)
    eps = 1e-6  # float32 accumulation of <= 64 products, relative to the sum of their magnitudes
    assert_one_rounding(out["linear"], f["x"] @ w.T + bias64,
                        eps * (np.abs(f["x"]) @ np.abs(w).T + np.abs(bias64)))
    assert_one_rounding(out["broadcast"], f["a"] @ f["b"], eps * (np.abs(f["a"]) @ np.abs(f["b"])))
    ct_, dt = np.swapaxes(f["c"], -1, -2), np.swapaxes(f["d"], -1, -2)
    assert_one_rounding(out["transposed"], ct_ @ dt, eps * (np.abs(ct_) @ np.abs(dt)))


# ---------------------------------------------------------------------------------------
# Data movement: exact.


def test_shape_ops_are_exact(tmp_path):
    x = ((np.arange(48).reshape(2, 6, 4) - 20) / 8).astype(np.float16)
    y = -x[:, :, ::-1].copy()

    @mb.program(
        input_specs=[mb.TensorSpec((2, 6, 4), dtype=fp16), mb.TensorSpec((2, 6, 4), dtype=fp16)],
        opset_version=ct.target.iOS18,
    )
    def program(x, y):
        first, second, third = mb.split(x=x, num_splits=3, axis=1, name="thirds")
        narrow, wide = mb.split(x=x, split_sizes=[1, 3], axis=2, name="columns")
        expanded = mb.expand_dims(x=x, axes=[0, -1], name="expanded")
        as_fp32 = mb.cast(x=x, dtype="fp32", name="as_fp32")
        return (
            mb.reshape(x=x, shape=[0, -1, 2], name="reshape_copy"),
            mb.reshape(x=x, shape=[1, 0, 0, -1], name="reshape_right_aligned"),
            mb.transpose(x=x, perm=[2, 0, 1], name="transpose"),
            mb.concat(values=[x, y], axis=-1, name="concat"),
            mb.concat(values=[x, y], axis=1, interleave=True, name="interleave"),
            first, second, third, narrow, wide, expanded,
            mb.squeeze(x=expanded, axes=[0], name="squeeze_axis"),
            mb.squeeze(x=expanded, name="squeeze_all"),
            mb.slice_by_index(x=x, begin=[1, 1, 0], end=[2, 6, 4], stride=[1, 2, 1], name="strided"),
            mb.slice_by_index(x=x, begin=[0, -3, 1], end=[0, 0, 3], begin_mask=[True, False, False],
                              end_mask=[True, True, False], name="masked"),
            mb.slice_by_index(x=x, begin=[1, 0, 2], end=[2, 6, 3], end_mask=[False, True, False],
                              squeeze_mask=[True, False, True], name="picked"),
            mb.slice_by_size(x=x, begin=[0, 2, 1], size=[-1, 3, 2], name="sized"),
            mb.tile(x=x, reps=[1, 2, 1], name="tile"),
            as_fp32,
            mb.cast(x=as_fp32, dtype="fp16", name="round_trip"),
        )

    path = tmp_path / "shapes.mlpackage"
    out = save(program, path).run("main", {"x": x, "y": y})
    interleaved = np.empty((2, 12, 4), np.float16)
    interleaved[:, 0::2], interleaved[:, 1::2] = x, y
    expected = {
        "reshape_copy": x.reshape(2, 12, 2),
        "reshape_right_aligned": x.reshape(1, 2, 6, 4),
        "transpose": x.transpose(2, 0, 1),
        "concat": np.concatenate([x, y], axis=2),
        "interleave": interleaved,
        "thirds_0": x[:, 0:2], "thirds_1": x[:, 2:4], "thirds_2": x[:, 4:6],
        "columns_0": x[:, :, :1], "columns_1": x[:, :, 1:],
        "expanded": x[None, :, :, :, None],
        "squeeze_axis": x[:, :, :, None], "squeeze_all": x,
        "strided": x[1:2, 1:6:2, 0:4], "masked": x[:, 3:, 1:3], "picked": x[1, :, 2],
        "sized": x[:, 2:5, 1:3], "tile": np.concatenate([x, x], axis=1),
        "as_fp32": x.astype(np.float32), "round_trip": x,
    }
    assert set(out) == set(expected)
    for name, value in expected.items():
        assert out[name].dtype == value.dtype and np.array_equal(out[name], value), name
    assert {"split", "slice_by_index", "slice_by_size", "tile", "cast"} <= set(saved_ops(path))


# ---------------------------------------------------------------------------------------
# Constexpr weights: every format family, materialized bit for bit.

CONSTEXPR_SPECS = [
    "int8-channel", "uint8-tensor", "int4-block32", "uint4-channel-affine", "lut1-tensor",
    "lut2-g16", "lut3-tensor", "lut4-g16", "lut6-g8", "lut8-tensor", "lut4-g16-pcs",
    "lut4-g8-int8lut", "vlut2x8",
]
BANK_SPECS = ["int8-channel", "lut4-g16"]


def _mil_integers(array: np.ndarray, nbits: int) -> np.ndarray:
    kind = "int" if np.issubdtype(array.dtype, np.signedinteger) else "uint"
    return array.astype(types.nptype_from_builtin(types.string_to_builtin(f"{kind}{nbits}")))


def _constexpr_weight(q, name: str):
    nbits = q.format.nbits
    if isinstance(q, LinearTensor):
        offset = None if q.offset is None else _mil_integers(q.offset, nbits)
        return mb.constexpr_blockwise_shift_scale(
            data=_mil_integers(q.data, nbits), scale=q.scale, offset=offset, name=name
        )
    lut = q.lut
    if q.lut_scale is not None:
        lut = mb.constexpr_blockwise_shift_scale(data=q.lut, scale=q.lut_scale, name=f"{name}_lut")
    arguments = {"indices": _mil_integers(q.indices, nbits), "lut": lut}
    if q.vector_axis is not None:
        arguments["vector_axis"] = np.int32(q.vector_axis)
    if q.channel_scale is None:
        return mb.constexpr_lut_to_dense(**arguments, name=name)
    dense = mb.constexpr_lut_to_dense(**arguments, name=f"{name}_dense")
    return mb.constexpr_blockwise_shift_scale(data=dense, scale=q.channel_scale, name=name)


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """One package holding a weight of every format (so weight.bin holds every blob dtype),
    each used by a linear (matrices) or matmul (expert banks) on the input."""
    rng = np.random.default_rng(5)
    weights = {
        f"w{i}": quantize(rng.standard_normal((32, 64)), spec) for i, spec in enumerate(CONSTEXPR_SPECS)
    }
    for i, spec in enumerate(BANK_SPECS):
        weights[f"bank{i}"] = quantize(rng.standard_normal((2, 32, 64)), spec)

    @mb.program(input_specs=[mb.TensorSpec((1, 64), dtype=fp16)], opset_version=ct.target.iOS18)
    def program(x):
        outputs = []
        for name, q in weights.items():
            weight = _constexpr_weight(q, name)
            if len(q.shape) == 2:
                outputs.append(mb.linear(x=x, weight=weight, name=f"y_{name}"))
            else:
                outputs.append(mb.matmul(x=x, y=weight, transpose_y=True, name=f"y_{name}"))
        return tuple(outputs)

    path = tmp_path_factory.mktemp("compressed") / "compressed.mlpackage"
    x = rng.standard_normal((1, 64)).astype(np.float16)
    interpreter = save(program, path)
    return path, interpreter, weights, x, interpreter.run("main", {"x": x})


def test_constexpr_weights_equal_dequantize_bit_for_bit(compressed):
    path, interpreter, weights, _, _ = compressed
    ops = set(saved_ops(path))
    assert {"constexpr_lut_to_dense", "constexpr_blockwise_shift_scale"} <= ops
    for name, q in weights.items():
        ours, reference = interpreter.constant("main", name), q.dequantize()
        assert ours.dtype == np.float16 and ours.shape == reference.shape, name
        assert np.array_equal(ours.view(np.uint16), reference.view(np.uint16)), name


def test_compressed_weights_compute_through_linear_and_matmul(compressed):
    _, _, weights, x, out = compressed
    xe = x.astype(np.float64)
    for name, q in weights.items():
        w = q.dequantize().astype(np.float64)
        exact = xe @ np.swapaxes(w, -1, -2)
        # linear adds a zero bias; 64 float32 products accumulate well under 1e-6 of their magnitudes
        accumulation = 1e-6 * (np.abs(xe) @ np.swapaxes(np.abs(w), -1, -2))
        assert_one_rounding(out[f"y_{name}"], exact, accumulation)


BLOB_READERS = {
    "FLOAT16": "read_fp16_data", "FLOAT32": "read_float_data", "UINT8": "read_uint8_data",
    "INT8": "read_int8_data", "INT4": "read_int4_data", "UINT1": "read_uint1_data",
    "UINT2": "read_uint2_data", "UINT3": "read_uint3_data", "UINT4": "read_uint4_data",
    "UINT6": "read_uint6_data", "INT16": "read_int16_data", "UINT16": "read_uint16_data",
    "INT32": "read_int32_data", "UINT32": "read_uint32_data",
}


def test_weight_file_reader_matches_coremltools_reader(compressed):
    path = compressed[0] / WEIGHT_FILE
    ours, reference = BlobStorage(path), _BlobStorageReader(str(path))
    offsets = ours.offsets()
    assert len(offsets) == ours.count
    dtypes = set()
    for offset in offsets:
        dtype = ours.info(offset).dtype
        dtypes.add(dtype)
        values = ours.read(offset)
        expected = getattr(reference, BLOB_READERS[dtype])(offset)
        if dtype == "FLOAT16":  # coremltools hands fp16 blobs back as their uint16 bits
            values = values.view(np.uint16)
        assert np.array_equal(values, expected), (offset, dtype)
    assert {"FLOAT16", "INT8", "UINT8", "INT4", "UINT1", "UINT2", "UINT3", "UINT4", "UINT6"} <= dtypes


def test_default_pipeline_per_channel_scale_form_stays_bit_exact(tmp_path):
    q = quantize(np.random.default_rng(3).standard_normal((32, 64)), "lut4-g16-pcs")

    @mb.program(input_specs=[mb.TensorSpec((1, 64), dtype=fp16)], opset_version=ct.target.iOS18)
    def program(x):
        return mb.linear(x=x, weight=_constexpr_weight(q, "w"), name="y")

    path = tmp_path / "pcs.mlpackage"
    interpreter = save(program, path, default_passes=True)
    # coremltools moves the channel scale onto a per-row LUT: scale op first, then lut_to_dense.
    ops = saved_ops(path)
    assert ops.index("constexpr_blockwise_shift_scale") < ops.index("constexpr_lut_to_dense")
    (linear,) = [op for op in saved_block(path).operations if op.type == "linear"]
    weight = interpreter.constant("main", linear.inputs["weight"].arguments[0].name)
    assert np.array_equal(weight.view(np.uint16), q.dequantize().view(np.uint16))


def test_functions_sharing_weight_blobs_share_one_materialization(tmp_path):
    """Two functions over one weight, written as the shard builder writes them (its weight
    emitter and package writer): both read the same blobs and get the same materialization."""
    from coremltools.converters.mil.mil import Function

    from anepack.coreml.package import save_package
    from anepack.coreml.weights import emit_weight

    rng = np.random.default_rng(4)

    q = quantize(rng.standard_normal((32, 64)), "lut4-g16-pcs")
    functions = {}
    for name, tokens in (("prefill", 4), ("decode", 1)):
        placeholders = {"x": mb.TensorSpec((tokens, 64), dtype=fp16)}
        with Function(placeholders, opset_version=ct.target.iOS18) as function:
            function.set_outputs([mb.linear(x=function.inputs["x"], weight=emit_weight(q, "w"), name="y")])
        functions[name] = function
    path = tmp_path / "two_functions.mlpackage"
    save_package(functions, path, {})
    program = MilProgram.load(path)
    assert set(program.functions) == {"prefill", "decode"}
    assert program.functions["decode"].inputs["x"].shape == (1, 64)
    x = rng.standard_normal((4, 64)).astype(np.float16)
    prefill = program.run("prefill", {"x": x})["y"]
    decode = program.run("decode", {"x": x[:1]})["y"]
    exact = x.astype(np.float64) @ q.dequantize().astype(np.float64).T
    accumulation = 1e-6 * (np.abs(x.astype(np.float64)) @ np.abs(q.dequantize().astype(np.float64)).T)
    assert_one_rounding(prefill, exact, accumulation)
    assert_one_rounding(decode, exact[:1], accumulation[:1])
    weight = program.constant("prefill", "w")
    assert weight is program.constant("decode", "w") and not weight.flags.writeable
    assert np.array_equal(weight.view(np.uint16), q.dequantize().view(np.uint16))


# ---------------------------------------------------------------------------------------
# State, errors.


def test_state_is_read_and_written_in_the_callers_dict(tmp_path):
    @mb.program(
        input_specs=[mb.StateTensorSpec((2, 8), dtype=fp16), mb.TensorSpec((2, 8), dtype=fp16)],
        opset_version=ct.target.iOS18,
    )
    def program(cache, x):
        total = mb.add(x=mb.read_state(input=cache), y=x)
        mb.coreml_update_state(state=cache, value=total)
        return mb.mul(x=total, y=np.float16(2.0), name="doubled")

    interpreter = save(program, tmp_path / "state.mlpackage")
    signature = interpreter.functions["main"]
    assert signature.states["cache"].shape == (2, 8) and signature.inputs["x"].shape == (2, 8)
    state = {"cache": np.ones((2, 8), np.float16)}
    x = np.full((2, 8), 0.5, np.float16)
    first = interpreter.run("main", {"x": x}, state)["doubled"]
    second = interpreter.run("main", {"x": x}, state)["doubled"]
    assert np.array_equal(first, np.full((2, 8), 3.0, np.float16))
    assert np.array_equal(second, np.full((2, 8), 4.0, np.float16))
    assert np.array_equal(state["cache"], np.full((2, 8), 2.0, np.float16))


def test_unsupported_op_is_a_one_line_error_naming_it(tmp_path):
    @mb.program(input_specs=[mb.TensorSpec((4,), dtype=fp16)], opset_version=ct.target.iOS18)
    def program(x):
        return mb.cos(x=mb.sqrt(x=x))

    path = tmp_path / "cos.mlpackage"
    with pytest.raises(AnepackError) as raised:
        save(program, path)
    index = saved_ops(path).index("cos")
    assert str(raised.value) == f"{path}: unsupported MIL op 'cos' in function main (op {index})"
    assert "cos" not in SUPPORTED_OPS


def test_user_errors_are_one_line(tmp_path):
    @mb.program(input_specs=[mb.TensorSpec((2, 32), dtype=fp16)], opset_version=ct.target.iOS18)
    def program(x):
        return mb.linear(x=x, weight=np.ones((4, 32), np.float16), name="y")

    path = tmp_path / "small.mlpackage"
    interpreter = save(program, path)
    problems = []
    for call in (
        lambda: interpreter.run("main", {"x": np.zeros((3, 32))}),
        lambda: interpreter.run("main", {}),
        lambda: interpreter.run("main", {"x": np.zeros((2, 32)), "extra": np.zeros(1)}),
        lambda: interpreter.run("prefill", {"x": np.zeros((2, 32))}),
        lambda: MilProgram.load(tmp_path),
    ):
        with pytest.raises(AnepackError) as raised:
            call()
        problems.append(str(raised.value))
    assert all("\n" not in problem for problem in problems)
    assert "(3, 32)" in problems[0] and "'x'" in problems[1] and "'extra'" in problems[2]
    assert "'prefill'" in problems[3] and "Manifest.json" in problems[4]

    broken = tmp_path / "broken.mlpackage"
    shutil.copytree(path, broken)
    weight_file = broken / WEIGHT_FILE
    data = bytearray(weight_file.read_bytes())
    data[64:68] = b"\0\0\0\0"  # the first blob's sentinel
    weight_file.write_bytes(bytes(data))
    with pytest.raises(AnepackError, match="0xDEADBEEF"):
        MilProgram.load(broken).run("main", {"x": np.zeros((2, 32))})


def test_every_op_the_shard_builder_emits_is_supported():
    from anepack.coreml.builder import EMITTED_OPS

    assert set(EMITTED_OPS) <= set(SUPPORTED_OPS)
