"""Run a saved Core ML ``.mlpackage`` in numpy, op by op, on any OS: the Linux proof that a shard
computes what the numpy reference computes.

    program = MilProgram.load("layers_00_05.mlpackage")
    program.functions["decode"].inputs          # names, shapes, dtypes
    outputs = program.run("decode", {"hidden": h, ...})

Everything is read by this module: ``Manifest.json``, the model protobuf (``mlProgram``), and
the weight files in MIL blob storage format (parsed here, not through coremltools).

Precision: each op computes in float32 from its (float16) inputs and its outputs are then
rounded to the dtype the program declares for them (float16 in anepack shards; integer and
bool tensors keep their type), so rounding happens once per op, as on a float16 device, but
inside an op nothing is rounded (the Neural Engine may round inside softmax, layer_norm or a
long matmul accumulation; this interpreter does not model that). Out-of-range values
become inf, as in float16. Constant ops (``const`` and every ``constexpr_*``) are
materialized bit-exactly as Core ML does (``anepack.quant``'s ``lut_to_dense`` and
``blockwise_shift_scale``), once per program: functions that share weight blobs (prefill and
decode) share the materialized weights.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from anepack.errors import AnepackError
from anepack.quant import blockwise_shift_scale, lut_to_dense, unpack_bits

# ---------------------------------------------------------------------------------------
# Element types: the MIL proto's DataType names, their numpy form in this interpreter, and
# their code in blob storage (coremltools mlmodel/src/MILBlob/Blob/BlobDataType.hpp).


@dataclass(frozen=True)
class _Element:
    numpy: type
    nbits: int
    blob_code: int | None


_ELEMENTS: dict[str, _Element] = {
    "FLOAT16": _Element(np.float16, 16, 1),
    "FLOAT32": _Element(np.float32, 32, 2),
    "UINT8": _Element(np.uint8, 8, 3),
    "INT8": _Element(np.int8, 8, 4),
    "INT16": _Element(np.int16, 16, 6),
    "UINT16": _Element(np.uint16, 16, 7),
    "INT4": _Element(np.int8, 4, 8),
    "UINT1": _Element(np.uint8, 1, 9),
    "UINT2": _Element(np.uint8, 2, 10),
    "UINT4": _Element(np.uint8, 4, 11),
    "UINT3": _Element(np.uint8, 3, 12),
    "UINT6": _Element(np.uint8, 6, 13),
    "INT32": _Element(np.int32, 32, 14),
    "UINT32": _Element(np.uint32, 32, 15),
    "FLOAT64": _Element(np.float64, 64, None),
    "INT64": _Element(np.int64, 64, None),
    "UINT64": _Element(np.uint64, 64, None),
    "BOOL": _Element(np.bool_, 8, None),
}
_BLOB_ELEMENTS = {element.blob_code: name for name, element in _ELEMENTS.items() if element.blob_code}
# Blob codes that exist in the format but that no anepack shard uses.
_UNSUPPORTED_BLOB_CODES = {5: "BFLOAT16", 16: "FLOAT8E4M3FN", 17: "FLOAT8E5M2"}


def _is_signed(element: _Element) -> bool:
    return bool(np.issubdtype(element.numpy, np.signedinteger))


# ---------------------------------------------------------------------------------------
# Blob storage (coremltools mlmodel/src/MILBlob/Blob/StorageFormat.hpp): a 64-byte header
# (uint32 count, uint32 version = 2), then per blob a 64-byte metadata record and its data,
# each 64-byte aligned. Sub-byte values are packed LSB first; the metadata says how many
# padding bits end the last byte.

_STORAGE_ALIGNMENT = 64
_STORAGE_VERSION = 2
_METADATA_SENTINEL = 0xDEADBEEF
_METADATA = np.dtype([
    ("sentinel", "<u4"),
    ("dtype", "<u4"),
    ("size", "<u8"),
    ("offset", "<u8"),
    ("padding_bits", "<u8"),
    ("reserved", "<u8", (4,)),
])


@dataclass(frozen=True)
class BlobInfo:
    """One blob's metadata record: its element type (MIL name), where its data lies, and the
    unused bits at the end of sub-byte data."""

    dtype: str
    data_offset: int
    nbytes: int
    padding_bits: int


class BlobStorage:
    """A MIL blob storage file (``weights/weight.bin``), memory-mapped; blobs are addressed by
    the offset of their metadata record, as the program's ``BlobFileValue`` names them."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._bytes = np.memmap(self.path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as error:
            raise AnepackError(self.path, f"cannot read the weight file ({error})") from error
        if self._bytes.size < _STORAGE_ALIGNMENT:
            raise AnepackError(self.path, "weight file is shorter than its 64-byte header")
        count, version = np.frombuffer(self._bytes, "<u4", 2)
        if version != _STORAGE_VERSION:
            raise AnepackError(self.path, f"blob storage version {version}; only version 2 is known")
        self.count = int(count)

    def info(self, offset: int) -> BlobInfo:
        """The metadata record at ``offset``, checked against the file."""
        if offset % _STORAGE_ALIGNMENT or offset + _METADATA.itemsize > self._bytes.size:
            raise AnepackError(self.path, f"no blob metadata can start at offset {offset}")
        record = np.frombuffer(self._bytes, _METADATA, 1, offset)[0]
        if record["sentinel"] != _METADATA_SENTINEL:
            raise AnepackError(self.path, f"blob metadata at offset {offset} lacks its 0xDEADBEEF sentinel")
        code = int(record["dtype"])
        if code not in _BLOB_ELEMENTS:
            known = _UNSUPPORTED_BLOB_CODES.get(code, "unknown")
            raise AnepackError(self.path, f"blob at offset {offset} has unsupported dtype {code} ({known})")
        data_offset, nbytes = int(record["offset"]), int(record["size"])
        if data_offset + nbytes > self._bytes.size:
            raise AnepackError(self.path, f"blob at offset {offset} runs past the end of the file")
        return BlobInfo(_BLOB_ELEMENTS[code], data_offset, nbytes, int(record["padding_bits"]))

    def offsets(self) -> list[int]:
        """Metadata offsets of every blob, walked from the header as Core ML walks them."""
        offsets, offset = [], _STORAGE_ALIGNMENT
        for _ in range(self.count):
            offsets.append(offset)
            info = self.info(offset)
            offset = -(-(info.data_offset + info.nbytes) // _STORAGE_ALIGNMENT) * _STORAGE_ALIGNMENT
        return offsets

    def read(self, offset: int) -> np.ndarray:
        """The blob at ``offset`` as a flat array: sub-byte values unpacked (uint8, or int8 for
        int4), other types as a read-only view of the mapped file."""
        info = self.info(offset)
        element = _ELEMENTS[info.dtype]
        if element.nbits < 8:
            bits = info.nbytes * 8 - info.padding_bits
            if info.padding_bits >= 8 or bits % element.nbits:
                raise AnepackError(self.path, f"blob at offset {offset} has inconsistent padding")
            raw = self._bytes[info.data_offset : info.data_offset + info.nbytes]
            count = bits // element.nbits
            if 8 % element.nbits == 0 and not _is_signed(element):
                return _unpack_whole_bytes(raw, element.nbits, count)
            return unpack_bits(raw, element.nbits, count, _is_signed(element))
        itemsize = element.nbits // 8
        if info.nbytes % itemsize:
            raise AnepackError(self.path, f"blob at offset {offset} is not whole {info.dtype} values")
        dtype = np.dtype(element.numpy).newbyteorder("<")
        return np.frombuffer(self._bytes, dtype, info.nbytes // itemsize, info.data_offset)


def _unpack_whole_bytes(raw: np.ndarray, nbits: int, count: int) -> np.ndarray:
    """``unpack_bits`` for unsigned codes that tile a byte (1, 2 or 4 bits), in uint8
    throughout: a 26B-A4B expert's 4-bit LUT indices unpack about ten times faster than
    through ``unpack_bits``' 32-bit words, and the runtime unpacks every routed expert."""
    per_byte = 8 // nbits
    values = np.empty(raw.size * per_byte, np.uint8)
    for slot in range(per_byte):  # one long pass per position in the byte, not per byte
        np.bitwise_and(raw >> np.uint8(slot * nbits), np.uint8(2**nbits - 1), out=values[slot::per_byte])
    return values[:count]


# ---------------------------------------------------------------------------------------
# Program values and types, decoded from the protobuf.


@dataclass(frozen=True)
class TensorType:
    """A tensor's element type (the MIL proto name, e.g. ``FLOAT16``) and shape (None for a
    dimension the program leaves open)."""

    element: str
    shape: tuple[int | None, ...]

    @property
    def dtype(self) -> np.dtype:
        if self.element == "STRING":
            return np.dtype(object)
        return np.dtype(_ELEMENTS[self.element].numpy)

    def matches(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == len(self.shape) and all(
            want is None or want == got for want, got in zip(self.shape, shape)
        )


@dataclass(frozen=True)
class FunctionSignature:
    """A function's tensor inputs, state inputs (Core ML state, read and written in place) and
    outputs, each by name in program order."""

    name: str
    inputs: dict[str, TensorType]
    states: dict[str, TensorType]
    outputs: dict[str, TensorType]


@dataclass(frozen=True)
class _BlobValue:
    """A value stored in a weight file, read only when an op needs it."""

    file: Path
    offset: int
    type: TensorType


@dataclass
class _StateSlot:
    """A state input during one run: reads and writes go to the caller's state dict."""

    store: dict
    name: str
    type: TensorType

    def read(self) -> np.ndarray:
        return self.store[self.name]

    def write(self, value: np.ndarray) -> None:
        if not self.type.matches(np.shape(value)):
            raise ValueError(
                f"writes shape {np.shape(value)} into state '{self.name}' of shape {self.type.shape}"
            )
        self.store[self.name] = np.asarray(value).astype(self.type.dtype)


def _tensor_type(value_type: Any) -> TensorType:
    from coremltools.proto import MIL_pb2

    kind = value_type.WhichOneof("type")
    if kind != "tensorType":
        raise ValueError(f"{kind} values are not supported")
    tensor = value_type.tensorType
    element = MIL_pb2.DataType.Name(tensor.dataType)
    if element != "STRING" and element not in _ELEMENTS:
        raise ValueError(f"element type {element} is not supported")
    shape = tuple(
        dim.constant.size if dim.WhichOneof("dimension") == "constant" else None
        for dim in tensor.dimensions
    )
    return TensorType(element, shape)


def _immediate(immediate: Any, tensor_type: TensorType) -> Any:
    if immediate.WhichOneof("value") != "tensor":
        raise ValueError(f"immediate {immediate.WhichOneof('value')} values are not supported")
    tensor = immediate.tensor
    stored = tensor.WhichOneof("value")
    if tensor_type.element == "STRING":
        strings = list(tensor.strings.values)
        return strings[0] if tensor_type.shape == () else strings
    if None in tensor_type.shape:
        raise ValueError("an immediate value has an open dimension")
    count = math.prod(tensor_type.shape)
    element = _ELEMENTS[tensor_type.element]
    if stored == "bytes":
        raw = np.frombuffer(tensor.bytes.values, np.uint8)
        if element.nbits < 8:
            flat = unpack_bits(raw, element.nbits, count, _is_signed(element))
        else:
            flat = raw.view(np.dtype(element.numpy).newbyteorder("<"))
    elif stored is None:
        flat = np.zeros(0, element.numpy)
    else:
        flat = np.array(getattr(tensor, stored).values, dtype=element.numpy)
    if flat.size != count:
        raise ValueError(f"an immediate value holds {flat.size} elements for shape {tensor_type.shape}")
    return flat.reshape(tensor_type.shape)


def _value(value: Any, model_dir: Path) -> Any:
    tensor_type = _tensor_type(value.type)
    if value.WhichOneof("value") == "blobFileValue":
        blob = value.blobFileValue
        file = model_dir / blob.fileName.removeprefix("@model_path/")
        return _BlobValue(file, blob.offset, tensor_type)
    return _immediate(value.immediateValue, tensor_type)


def _binding(binding: Any, model_dir: Path) -> Any:
    """A variable name (str), or the literal value bound in its place."""
    if binding.WhichOneof("binding") == "name":
        return binding.name
    return _value(binding.value, model_dir)


def _literal_key(value: Any) -> tuple:
    """A hashable identity of a literal value, so equal constants in two functions share one
    materialization."""
    if isinstance(value, _BlobValue):
        return ("blob", str(value.file), value.offset)
    if isinstance(value, np.ndarray):
        return ("array", value.dtype.str, value.shape, value.tobytes())
    return ("value", repr(value))


# ---------------------------------------------------------------------------------------
# The op table: op type -> function(inputs, attributes) -> output or tuple of outputs.
# ``inputs`` maps each parameter the op binds to its value (float tensors as float32, except
# for constant ops, which receive their stored arrays); ``values`` of concat is a list.
# Optional parameters the program leaves out take MIL's defaults.

OpFunction = Callable[[dict[str, Any], dict[str, Any]], Any]
OPS: dict[str, OpFunction] = {}

_CONSTANT_OPS = {"const", "constexpr_lut_to_dense", "constexpr_blockwise_shift_scale"}
_VARIADIC_INPUTS = {"values"}
_CAST_TYPES = {
    "fp16": np.float16, "fp32": np.float32, "int32": np.int32, "bool": np.bool_,
    "int8": np.int8, "uint8": np.uint8, "int16": np.int16, "uint16": np.uint16,
}
_SQRT_2_OVER_PI = np.float32(math.sqrt(2.0 / math.pi))
_erf = np.frompyfunc(math.erf, 1, 1)


def _op(name: str) -> Callable[[OpFunction], OpFunction]:
    def register(function: OpFunction) -> OpFunction:
        OPS[name] = function
        return function
    return register


def _ints(value: Any) -> list[int]:
    return [int(v) for v in np.ravel(value)]


def _axes(value: Any, rank: int) -> tuple[int, ...] | None:
    return None if value is None else tuple(sorted(axis % rank for axis in _ints(value)))


def _flag(inputs: dict[str, Any], name: str) -> bool:
    return bool(inputs.get(name, False))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _elementwise(function: Callable) -> OpFunction:
    return lambda inputs, attributes: function(inputs["x"], inputs["y"])


def _unary(function: Callable) -> OpFunction:
    return lambda inputs, attributes: function(inputs["x"])


def _reduction(function: Callable) -> OpFunction:
    def reduce(inputs, attributes):
        x = inputs["x"]
        return function(x, axis=_axes(inputs.get("axes"), x.ndim), keepdims=_flag(inputs, "keep_dims"))
    return reduce


OPS.update({
    "add": _elementwise(np.add),
    "sub": _elementwise(np.subtract),
    "mul": _elementwise(np.multiply),
    "real_div": _elementwise(np.divide),
    "pow": _elementwise(np.power),
    "maximum": _elementwise(np.maximum),
    "minimum": _elementwise(np.minimum),
    "sqrt": _unary(np.sqrt),
    "square": _unary(np.square),
    "tanh": _unary(np.tanh),
    "sigmoid": _unary(_sigmoid),
    "silu": _unary(lambda x: x * _sigmoid(x)),
    "reduce_mean": _reduction(np.mean),
    "reduce_sum": _reduction(np.sum),
    "reduce_max": _reduction(np.max),
})


@_op("const")
def _const(inputs, attributes):
    return attributes["val"]


@_op("constexpr_lut_to_dense")
def _constexpr_lut_to_dense(inputs, attributes):
    if "shape" in inputs:
        raise ValueError("the iOS16 form (packed indices and a shape) is not supported")
    indices = inputs["indices"]
    vector_axis = inputs.get("vector_axis")
    if vector_axis is not None:
        vector_axis = int(vector_axis) % indices.ndim
    return lut_to_dense(indices, inputs["lut"], vector_axis)


@_op("constexpr_blockwise_shift_scale")
def _constexpr_blockwise_shift_scale(inputs, attributes):
    scale = inputs["scale"]
    if scale.dtype != np.float16:
        raise ValueError(f"scale of dtype {scale.dtype} is not supported (float16 only)")
    return blockwise_shift_scale(inputs["data"], scale, inputs.get("offset"))


@_op("linear")
def _linear(inputs, attributes):
    out = inputs["x"] @ inputs["weight"].T
    return out if inputs.get("bias") is None else out + inputs["bias"]


@_op("matmul")
def _matmul(inputs, attributes):
    x, y = inputs["x"], inputs["y"]
    if _flag(inputs, "transpose_x"):
        x = np.swapaxes(x, -1, -2)
    if _flag(inputs, "transpose_y"):
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


@_op("rsqrt")
def _rsqrt(inputs, attributes):
    return 1.0 / np.sqrt(inputs["x"] + np.float32(inputs.get("epsilon", 1e-12)))


@_op("gelu")
def _gelu(inputs, attributes):
    x = inputs["x"]
    mode = inputs.get("mode", "EXACT")
    if mode == "EXACT":
        return 0.5 * x * (1.0 + _erf(x / np.float32(math.sqrt(2.0))).astype(np.float32))
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1.0 + np.tanh(_SQRT_2_OVER_PI * (x + np.float32(0.044715) * x * x * x)))
    if mode == "SIGMOID_APPROXIMATION":
        return x * _sigmoid(np.float32(1.702) * x)
    raise ValueError(f"unknown gelu mode {mode!r}")


@_op("softmax")
def _softmax(inputs, attributes):
    x = inputs["x"]
    axis = int(inputs.get("axis", -1))
    exponentials = np.exp(x - x.max(axis=axis, keepdims=True))
    return exponentials / exponentials.sum(axis=axis, keepdims=True)


@_op("layer_norm")
def _layer_norm(inputs, attributes):
    x = inputs["x"]
    axes = _axes(inputs.get("axes"), x.ndim) or tuple(range(x.ndim))
    centered = x - x.mean(axis=axes, keepdims=True)
    variance = np.mean(centered * centered, axis=axes, keepdims=True)
    out = centered / np.sqrt(variance + np.float32(inputs.get("epsilon", 1e-5)))
    normalized_shape = [x.shape[axis] if axis in axes else 1 for axis in range(x.ndim)]
    if inputs.get("gamma") is not None:
        out = out * inputs["gamma"].reshape(normalized_shape)
    if inputs.get("beta") is not None:
        out = out + inputs["beta"].reshape(normalized_shape)
    return out


@_op("clip")
def _clip(inputs, attributes):
    return np.minimum(np.maximum(inputs["x"], inputs["alpha"]), inputs["beta"])


@_op("cast")
def _cast(inputs, attributes):
    if inputs["dtype"] not in _CAST_TYPES:
        raise ValueError(f"cannot cast to {inputs['dtype']!r}")
    return inputs["x"].astype(_CAST_TYPES[inputs["dtype"]])


@_op("reshape")
def _reshape(inputs, attributes):
    # iOS17 rule (the iOS15 rule when len(shape) == rank): a 0 copies the input dimension
    # aligned from the right, or is 1 where there is none; -1 is inferred.
    x = inputs["x"]
    shape = _ints(inputs["shape"])
    shift = len(shape) - x.ndim
    for position, size in enumerate(shape):
        if size == 0:
            source = position - shift
            shape[position] = x.shape[source] if 0 <= source < x.ndim else 1
    return x.reshape(shape)


@_op("transpose")
def _transpose(inputs, attributes):
    return np.transpose(inputs["x"], _ints(inputs["perm"]))


@_op("concat")
def _concat(inputs, attributes):
    values = inputs["values"]
    axis = int(inputs["axis"]) % values[0].ndim
    if not _flag(inputs, "interleave"):
        return np.concatenate(values, axis=axis)
    stacked = np.stack(values, axis=axis + 1)
    shape = list(values[0].shape)
    shape[axis] *= len(values)
    return stacked.reshape(shape)


@_op("split")
def _split(inputs, attributes):
    x = inputs["x"]
    axis = int(inputs["axis"]) % x.ndim
    if inputs.get("split_sizes") is not None:
        sizes = _ints(inputs["split_sizes"])
    else:
        count = int(inputs["num_splits"])
        if x.shape[axis] % count:
            raise ValueError(f"{count} splits do not divide dimension {x.shape[axis]}")
        sizes = [x.shape[axis] // count] * count
    if sum(sizes) != x.shape[axis]:
        raise ValueError(f"split sizes {sizes} do not add up to dimension {x.shape[axis]}")
    return tuple(np.split(x, np.cumsum(sizes)[:-1], axis=axis))


@_op("slice_by_index")
def _slice_by_index(inputs, attributes):
    x = inputs["x"]
    rank = x.ndim
    begin, end = _ints(inputs["begin"]), _ints(inputs["end"])
    stride = _ints(inputs["stride"]) if inputs.get("stride") is not None else [1] * rank
    masks = {
        name: [False] * rank if inputs.get(name) is None else [bool(v) for v in np.ravel(inputs[name])]
        for name in ("begin_mask", "end_mask", "squeeze_mask")
    }
    index = tuple(
        begin[axis] if masks["squeeze_mask"][axis] else slice(
            None if masks["begin_mask"][axis] else begin[axis],
            None if masks["end_mask"][axis] else end[axis],
            stride[axis],
        )
        for axis in range(rank)
    )
    return x[index]


@_op("slice_by_size")
def _slice_by_size(inputs, attributes):
    x = inputs["x"]
    index = []
    for axis, (start, size) in enumerate(zip(_ints(inputs["begin"]), _ints(inputs["size"]))):
        start %= x.shape[axis]
        index.append(slice(start, None if size == -1 else start + size))
    return x[tuple(index)]


@_op("expand_dims")
def _expand_dims(inputs, attributes):
    return np.expand_dims(inputs["x"], tuple(_ints(inputs["axes"])))


@_op("squeeze")
def _squeeze(inputs, attributes):
    axes = inputs.get("axes")
    return np.squeeze(inputs["x"], axis=None if axes is None else tuple(_ints(axes)))


@_op("tile")
def _tile(inputs, attributes):
    return np.tile(inputs["x"], _ints(inputs["reps"]))


@_op("read_state")
def _read_state(inputs, attributes):
    return inputs["input"].read()


@_op("write_state")
def _write_state(inputs, attributes):
    # What coremltools serializes ``coreml_update_state`` into: a write, then a read_state.
    inputs["input"].write(inputs["data"])


@_op("coreml_update_state")
def _coreml_update_state(inputs, attributes):
    inputs["state"].write(inputs["value"])
    return inputs["value"]


SUPPORTED_OPS = frozenset(OPS)


# ---------------------------------------------------------------------------------------
# The program.


@dataclass
class _Operation:
    index: int
    type: str
    inputs: dict[str, list[Any]]  # parameter -> bindings: a variable name (str) or a literal
    outputs: list[tuple[str, TensorType]]
    attributes: dict[str, Any]
    constant_key: tuple | None = None  # set for const/constexpr ops
    keep: bool = False  # a constant op whose output a computing op reads: cache it

    @property
    def label(self) -> str:
        first = self.outputs[0][0] if self.outputs else "no output"
        return f"op {self.index} ({self.type} -> {first})"


@dataclass
class _Function:
    signature: FunctionSignature
    operations: list[_Operation]  # the ops run on every call, in program order
    constants: dict[str, tuple[_Operation, int]]  # constant variable -> (its op, output index)
    outputs: list[str]


@dataclass
class MilProgram:
    """A saved ML program, ready to run. Build it with ``MilProgram.load(path)``."""

    path: Path
    functions: dict[str, FunctionSignature]
    _functions: dict[str, _Function] = field(repr=False)
    _storages: dict[Path, BlobStorage] = field(default_factory=dict, repr=False)
    _materialized: dict[tuple, tuple] = field(default_factory=dict, repr=False)
    _widened_constants: dict[tuple, np.ndarray] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, path: str | Path) -> "MilProgram":
        """Read ``path`` (an ``.mlpackage`` directory): its manifest, model spec and functions.
        Raises ``AnepackError`` for a malformed package or an op this interpreter lacks."""
        path = Path(path)
        model_file = _root_model_file(path)
        spec = _parse_model(model_file)
        functions = {}
        for name, function_spec in spec.mlProgram.functions.items():
            try:
                functions[name] = _parse_function(name, function_spec, model_file.parent)
            except ValueError as error:
                raise AnepackError(path, f"function {name}: {error}") from error
        for function in functions.values():
            for operation in _all_operations(function):
                if operation.type not in OPS:
                    raise AnepackError(
                        path,
                        f"unsupported MIL op '{operation.type}' in function "
                        f"{function.signature.name} (op {operation.index})",
                    )
        return cls(
            path=path,
            functions={name: function.signature for name, function in functions.items()},
            _functions=functions,
        )

    def run(
        self,
        function_name: str,
        inputs: dict[str, np.ndarray],
        state: dict[str, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        """Execute ``function_name`` on ``inputs`` (each converted to its declared dtype) and
        return its outputs by name. ``state`` holds the function's state inputs; state writes
        replace its entries."""
        function = self._function(function_name)
        env = self._bind(function, inputs, {} if state is None else state)
        with np.errstate(all="ignore"):
            for operation in function.operations:
                arguments = {
                    parameter: self._argument(function, parameter, bindings, env, compute=True)
                    for parameter, bindings in operation.inputs.items()
                }
                results = self._execute(function, operation, arguments)
                env.update(zip((name for name, _ in operation.outputs), results))
        return {name: self._resolve(function, name, env) for name in function.outputs}

    def constant(self, function_name: str, name: str) -> np.ndarray:
        """The value of constant variable ``name`` (a ``const`` or ``constexpr_*`` output) of
        a function, materialized as Core ML materializes it."""
        function = self._function(function_name)
        if name not in function.constants:
            raise AnepackError(self.path, f"function {function_name} has no constant named '{name}'")
        with np.errstate(all="ignore"):
            return self._constant(function, name)

    # --- internals -------------------------------------------------------------------

    def _function(self, name: str) -> _Function:
        if name not in self._functions:
            known = ", ".join(sorted(self._functions))
            raise AnepackError(self.path, f"no function '{name}' (functions: {known})")
        return self._functions[name]

    def _bind(self, function: _Function, inputs: dict, state: dict) -> dict[str, Any]:
        signature = function.signature
        unexpected = sorted(set(inputs) - set(signature.inputs))
        if unexpected:
            raise AnepackError(self.path, f"function {signature.name} has no input '{unexpected[0]}'")
        env: dict[str, Any] = {}
        for kind, given, declared in (("input", inputs, signature.inputs), ("state", state, signature.states)):
            for name, tensor_type in declared.items():
                where = f"{kind} '{name}' of function {signature.name}"
                if name not in given:
                    raise AnepackError(self.path, f"missing {where}, shape {tensor_type.shape}")
                if not tensor_type.matches(np.shape(given[name])):
                    raise AnepackError(
                        self.path, f"{where} has shape {np.shape(given[name])}, expected {tensor_type.shape}"
                    )
                if kind == "input":
                    env[name] = np.asarray(given[name]).astype(tensor_type.dtype)
                else:
                    env[name] = _StateSlot(given, name, tensor_type)
        return env

    def _argument(self, function: _Function, parameter: str, bindings: list, env: dict, compute: bool) -> Any:
        """One parameter's value; ``compute`` widens float16 tensors to the float32 ops work in."""
        if compute:
            values = [self._computed(function, binding, env) for binding in bindings]
        else:
            values = [self._binding(function, binding, env) for binding in bindings]
        return values if parameter in _VARIADIC_INPUTS else values[0]

    def release_constants(self) -> None:
        """Forget every decoded weight and unmap the weight files (their pages count as this
        process's memory once read); the next call reads and decodes again. For packages too
        large to keep decoded, such as a layer's 128 experts (3 GB as float32)."""
        self._materialized.clear()
        self._widened_constants.clear()
        self._storages.clear()

    def _computed(self, function: _Function, binding: Any, env: dict) -> Any:
        """A float32 operand; widened weights are kept, since widening them on every call
        costs more than the matmuls they feed. A kept float32 copy replaces the float16 one:
        both would hold every weight of the shard twice (``constant`` re-materializes)."""
        if not isinstance(binding, str) or binding in env:
            return _widened(self._binding(function, binding, env))
        operation, position = function.constants[binding]
        key = (operation.constant_key, position)
        widened = self._widened_constants.get(key)
        if widened is None:
            materialized = self._constant(function, binding)
            widened = _widened(materialized)
            if operation.keep and isinstance(widened, np.ndarray):
                widened.flags.writeable = False
                self._widened_constants[key] = widened
                if widened is not materialized and len(operation.outputs) == 1:
                    self._materialized.pop(operation.constant_key, None)
        return widened

    def _binding(self, function: _Function, binding: Any, env: dict) -> Any:
        if isinstance(binding, _BlobValue):
            return self._read_blob(binding)
        if isinstance(binding, str):
            return self._resolve(function, binding, env)
        return binding

    def _resolve(self, function: _Function, name: str, env: dict) -> Any:
        if name in env:
            return env[name]
        return self._constant(function, name)

    def _constant(self, function: _Function, name: str) -> np.ndarray:
        operation, position = function.constants[name]
        outputs = self._materialized.get(operation.constant_key)
        if outputs is None:
            arguments = {
                parameter: self._argument(function, parameter, bindings, {}, compute=False)
                for parameter, bindings in operation.inputs.items()
            }
            attributes = {
                key: self._read_blob(value) if isinstance(value, _BlobValue) else value
                for key, value in operation.attributes.items()
            }
            outputs = self._execute(function, operation, arguments, attributes)
            if operation.keep:
                for output in outputs:
                    if isinstance(output, np.ndarray):
                        output.flags.writeable = False  # shared by every run and function
                self._materialized[operation.constant_key] = outputs
        return outputs[position]

    def _read_blob(self, blob: _BlobValue) -> np.ndarray:
        if blob.file not in self._storages:
            self._storages[blob.file] = BlobStorage(blob.file)
        storage = self._storages[blob.file]
        element = storage.info(blob.offset).dtype
        if element != blob.type.element:
            raise AnepackError(
                blob.file, f"blob at offset {blob.offset} holds {element}, the program reads {blob.type.element}"
            )
        values = storage.read(blob.offset)
        if None in blob.type.shape or values.size != math.prod(blob.type.shape):
            raise AnepackError(
                blob.file,
                f"blob at offset {blob.offset} holds {values.size} values, the program reads {blob.type.shape}",
            )
        return values.reshape(blob.type.shape)

    def _execute(
        self, function: _Function, operation: _Operation, arguments: dict, attributes: dict | None = None
    ) -> tuple:
        where = f"function {function.signature.name} {operation.label}"
        try:
            result = OPS[operation.type](arguments, operation.attributes if attributes is None else attributes)
            values = () if result is None else result if isinstance(result, tuple) else (result,)
            if len(values) != len(operation.outputs):
                raise ValueError(f"gives {len(values)} outputs, the program declares {len(operation.outputs)}")
            return tuple(
                _as_declared(value, tensor_type) for value, (_, tensor_type) in zip(values, operation.outputs)
            )
        except KeyError as error:
            raise AnepackError(self.path, f"{where}: missing input {error}") from error
        except ValueError as error:
            raise AnepackError(self.path, f"{where}: {error}") from error


def _widened(value: Any) -> Any:
    if isinstance(value, np.ndarray) and value.dtype == np.float16:
        return value.astype(np.float32)
    return value


def _as_declared(value: Any, tensor_type: TensorType) -> Any:
    """An op's output in the program's declared type: float16 rounding happens here."""
    if tensor_type.element == "STRING":
        return value
    array = np.asarray(value)
    if not tensor_type.matches(array.shape):
        raise ValueError(f"produces shape {array.shape}, the program declares {tensor_type.shape}")
    return array.astype(tensor_type.dtype, copy=False)


def _root_model_file(path: Path) -> Path:
    manifest_file = path / "Manifest.json"
    try:
        manifest = json.loads(manifest_file.read_text())
        root = manifest["itemInfoEntries"][manifest["rootModelIdentifier"]]["path"]
    except FileNotFoundError as error:
        raise AnepackError(path, "not an .mlpackage: Manifest.json is missing") from error
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise AnepackError(manifest_file, f"unreadable package manifest ({error})") from error
    return path / "Data" / root


def _parse_model(model_file: Path) -> Any:
    from google.protobuf.message import DecodeError

    from coremltools.proto import Model_pb2

    spec = Model_pb2.Model()
    try:
        spec.ParseFromString(model_file.read_bytes())
    except (OSError, DecodeError) as error:
        raise AnepackError(model_file, f"unreadable model spec ({error})") from error
    if spec.WhichOneof("Type") != "mlProgram":
        raise AnepackError(model_file, f"holds a {spec.WhichOneof('Type')} model, not an ML program")
    return spec


def _parse_function(name: str, function_spec: Any, model_dir: Path) -> _Function:
    if function_spec.opset not in function_spec.block_specializations:
        raise ValueError(f"no block for its opset {function_spec.opset}")
    block = function_spec.block_specializations[function_spec.opset]
    inputs, states = {}, {}
    for named in function_spec.inputs:
        if named.type.WhichOneof("type") == "stateType":
            states[named.name] = _tensor_type(named.type.stateType.wrappedType)
        else:
            inputs[named.name] = _tensor_type(named.type)
    types = {**inputs, **states}
    operations, constants, constant_keys = [], {}, {}
    for index, operation_spec in enumerate(block.operations):
        if len(operation_spec.blocks):
            raise ValueError(f"op {index} ({operation_spec.type}) has nested blocks (control flow)")
        operation = _Operation(
            index=index,
            type=operation_spec.type,
            inputs={
                parameter: [_binding(binding, model_dir) for binding in argument.arguments]
                for parameter, argument in operation_spec.inputs.items()
            },
            outputs=[(output.name, _tensor_type(output.type)) for output in operation_spec.outputs],
            attributes={key: _value(value, model_dir) for key, value in operation_spec.attributes.items()},
        )
        undefined = [binding for bindings in operation.inputs.values() for binding in bindings
                     if isinstance(binding, str) and binding not in types]
        if undefined:
            raise ValueError(f"{operation.label} reads '{undefined[0]}' before it is defined")
        for output, tensor_type in operation.outputs:
            types[output] = tensor_type
        if operation.type in _CONSTANT_OPS:
            operation.constant_key = _constant_key(operation, constant_keys)
            for position, (output, _) in enumerate(operation.outputs):
                constants[output] = (operation, position)
                constant_keys[output] = (operation.constant_key, position)
        else:
            operations.append(operation)
    read_directly = {binding for operation in operations for bindings in operation.inputs.values()
                     for binding in bindings if isinstance(binding, str)} | set(block.outputs)
    for operation, _ in constants.values():
        operation.keep = any(output in read_directly for output, _ in operation.outputs)
    missing = [output for output in block.outputs if output not in types]
    if missing:
        raise ValueError(f"output '{missing[0]}' is never computed")
    outputs = {output: types[output] for output in block.outputs}
    signature = FunctionSignature(name, inputs, states, outputs)
    return _Function(signature, operations, constants, list(block.outputs))


def _constant_key(operation: _Operation, constant_keys: dict[str, tuple]) -> tuple:
    def binding_key(binding):
        if isinstance(binding, str):
            if binding not in constant_keys:
                raise ValueError(f"{operation.label} reads '{binding}', which is not a constant")
            return constant_keys[binding]
        return _literal_key(binding)

    inputs = tuple(sorted(
        (parameter, tuple(binding_key(binding) for binding in bindings))
        for parameter, bindings in operation.inputs.items()
    ))
    attributes = tuple(sorted(
        (key, _literal_key(value)) for key, value in operation.attributes.items() if key != "name"
    ))
    return (operation.type, inputs, attributes)


def _all_operations(function: _Function) -> list[_Operation]:
    constant_operations = {id(op): op for op, _ in function.constants.values()}
    return sorted([*function.operations, *constant_operations.values()], key=lambda op: op.index)
