"""llama.cpp's CPU arithmetic on a quantized GGUF, reproduced inside the numpy reference.

On a quantized model llama.cpp does not compute what the exact reference computes, so the two
disagree by more than the model file explains. ``LlamaCppArithmetic(gguf)``, passed to
``anepack.reference.build(..., emulate=...)``, makes the reference compute what llama.cpp
computes (ggml's CPU backend as vendored in llama-cpp-python 0.3.36, x86 AVX2/AVX-512 build):

- Activation quantization. Before a matmul, ggml converts the input rows to the weight type's
  ``vec_dot_type`` (``type_traits_cpu`` in ggml-cpu.c) and takes integer dot products against
  the weight blocks. Q4_0, Q5_0, Q8_0, IQ4_NL, MXFP4, NVFP4, Q1_0 weights read Q8_0 rows;
  Q4_1 and Q5_1 read Q8_1; the K-quants, IQ2/IQ3/IQ1/IQ4_XS and TQ types read Q8_K; F16 and
  BF16 weights read rows rounded to F16 / BF16; F32 weights read F32. A block's integer dot
  product times its scales equals the dot product of the dequantized blocks, so rounding the
  rows through the activation type and multiplying by the dequantized weight gives llama.cpp's
  result up to float summation order. One term is not a dequantized dot product: Q4_1/Q5_1
  weights add ``min * s`` per block, where Q8_1's ``s`` is ``fp16(d * sum(q))`` rather than
  ``fp16(d) * sum(q)``; that difference is added from the weight file's stored mins.
- GELU through ggml's float16 table (``GGML_GELU_FP16``): the input rounded to float16, the
  tanh-GELU of that value rounded to float16; inputs <= -10 give 0 and inputs >= 10 pass through.
  The table is rebuilt bit for bit (the C library's ``tanhf``, GCC's fused multiply-add).

Given llama.cpp's own input rows, each emulated matmul matches llama.cpp's output to 1e-6 of
its largest value on Q4_0, Q5_0, Q8_0, Q4_1, Q5_1, Q4_K, Q6_K, F16 and BF16 weights (the exact
product misses by 2e-4 to 1.5e-2), and the GELU table matches bit for bit.

Not reproduced, each below 1e-6 in logit cosine on an F32 model, where no quantizer amplifies
them: float summation order (SIMD lanes, tiled GEMM), RMSNorm's scale (ggml squares in float32
and rounds the mean, ``+ eps``, ``sqrtf`` and ``1 / x`` to float32 one by one), RoPE angles
built by repeated float32 multiplication, SIMD ``expf`` in softmax and SiLU. ARM builds scale
Q8_0 rows by ``1 / d`` instead of ``127 / amax`` (a rare one-step change in a quant), and
ggml's 4-row Q8_K packer breaks an exact ``+a``/``-a`` tie for the block maximum by sign where
the row quantizer takes the first. The emulation describes llama.cpp running this GGUF's own
weights: a weight source substituting other weights keeps the file's activation types (and,
for Q4_1/Q5_1, the file's mins).

So the emulation reproduces each op, not a whole forward pass: the activation quantizer is
discontinuous, and any one-ulp difference left upstream of it flips a quant now and then
(9 of the 17920 layer-0 attention inputs of the default model, from RMSNorm's rounding); each
flip moves its row by a full quantization step, and the next layers' quantizers multiply the
flips. One ulp on the embeddings moves the emulated Gemma 3 270M logits to cosine 0.98-0.99
(json prompt) while the exact reference stays at 1 - 1e-11, so neither gets closer to
llama.cpp end to end than cosine 0.95-0.96 at the worst golden position of the Q4_K_M file.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable

import numpy as np
from gguf import GGMLQuantizationType as GGMLType
from gguf import GGML_QUANT_SIZES

from anepack.errors import UnsupportedModelError
from anepack.source.gguf_file import GGUFFile
from anepack.source.weights import stored_name

QK8_0 = 32  # values per Q8_0 / Q8_1 block
QK_K = 256  # values per Q8_K super-block
GELU_TABLE_LIMIT = np.float32(10.0)
GELU_COEF_A = np.float32(0.044715)  # ggml's constants, as float32
SQRT_2_OVER_PI = np.float32(0.79788456080286535587989211986876)

_Q8_0_WEIGHTS = (GGMLType.Q4_0, GGMLType.Q5_0, GGMLType.Q8_0, GGMLType.IQ4_NL, GGMLType.MXFP4,
                 GGMLType.NVFP4, GGMLType.Q1_0)
_Q8_K_WEIGHTS = (GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K,
                 GGMLType.IQ2_XXS, GGMLType.IQ2_XS, GGMLType.IQ2_S, GGMLType.IQ3_XXS, GGMLType.IQ3_S,
                 GGMLType.IQ1_S, GGMLType.IQ1_M, GGMLType.IQ4_XS, GGMLType.TQ1_0, GGMLType.TQ2_0)

# ggml-cpu.c ``type_traits_cpu[weight type].vec_dot_type``: what a matmul's input rows become.
VEC_DOT_TYPE: dict[GGMLType, GGMLType] = {
    GGMLType.F32: GGMLType.F32,
    GGMLType.F16: GGMLType.F16,
    GGMLType.BF16: GGMLType.BF16,
    GGMLType.Q4_1: GGMLType.Q8_1,
    GGMLType.Q5_1: GGMLType.Q8_1,
    **{weight_type: GGMLType.Q8_0 for weight_type in _Q8_0_WEIGHTS},
    **{weight_type: GGMLType.Q8_K for weight_type in _Q8_K_WEIGHTS},
}

# Byte offset of the float16 ``m`` (block minimum) inside a Q4_1 / Q5_1 block: after ``d``.
_MIN_OFFSET = 2


def _blocks(x: np.ndarray, size: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.shape[-1] % size:
        raise ValueError(f"row length {x.shape[-1]} is not a multiple of the block size {size}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // size, size)


def quantize_q8_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's x86 ``quantize_row_q8_0`` over the last axis: int8 quants ``[..., n/32, 32]`` and
    float16 scales ``[..., n/32]``.

    Per block of 32: ``d = amax / 127`` stored as float16; quants are ``x * (127 / amax)``
    rounded half to even (``_mm256_round_ps``), so the block maximum maps to +-127 exactly.
    """
    blocks = _blocks(x, QK8_0)
    amax = np.max(np.abs(blocks), axis=-1)
    multiplier = np.divide(np.float32(127), amax, out=np.zeros_like(amax), where=amax != 0)
    quants = np.rint(blocks * multiplier[..., None]).astype(np.int8)
    return quants, (amax / np.float32(127)).astype(np.float16)


def quantize_q8_1(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's x86 ``quantize_row_q8_1``: Q8_0's quants and scale, plus ``s = fp16(d * sum(q))``
    per block, where ``d`` is the float32 scale before its rounding to float16."""
    blocks = _blocks(x, QK8_0)
    quants, scale16 = quantize_q8_0(x)
    d = np.max(np.abs(blocks), axis=-1) / np.float32(127)
    block_sums = quants.sum(axis=-1, dtype=np.int32).astype(np.float32)
    return quants, scale16, (d * block_sums).astype(np.float16)


def quantize_q8_k(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's ``quantize_row_q8_K`` over the last axis: int8 quants ``[..., n/256, 256]`` and
    float32 scales ``[..., n/256]``.

    Per super-block of 256: ``max`` is the first value of largest magnitude, ``iscale =
    -127 / max``, quants are ``x * iscale`` rounded half to even and capped at 127, and the
    stored scale is ``1 / iscale`` in float32. An all-zero block has scale 0.
    """
    blocks = _blocks(x, QK_K)
    first_largest = np.argmax(np.abs(blocks), axis=-1)[..., None]
    signed_max = np.take_along_axis(blocks, first_largest, axis=-1)[..., 0]
    nonzero = signed_max != 0
    iscale = np.divide(np.float32(-127), signed_max, out=np.zeros_like(signed_max), where=nonzero)
    quants = np.minimum(np.rint(blocks * iscale[..., None]), 127).astype(np.int8)
    scale = np.divide(np.float32(1), iscale, out=np.zeros_like(iscale), where=nonzero)
    return quants, scale


def _dequantized(quants: np.ndarray, scale: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return (scale.astype(np.float32)[..., None] * quants.astype(np.float32)).reshape(shape)


def round_activations(x: np.ndarray, activation_type: GGMLType) -> np.ndarray:
    """``x`` (float32, rows on the last axis) as the values ggml's dot products see after
    converting it to ``activation_type``: quantized then dequantized, or rounded."""
    rounding = _ROUNDING.get(activation_type)
    if rounding is None:
        raise ValueError(f"{activation_type.name} is not an activation type of ggml's CPU matmul")
    return rounding(np.asarray(x, dtype=np.float32))


def _round_to_bfloat16(x: np.ndarray) -> np.ndarray:
    # ggml's GGML_FP32_TO_BF16: round half to even on the upper 16 bits; NaN stays NaN (quiet)
    bits = x.view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))
    kept = np.where(np.isnan(x), bits | np.uint32(0x400000), rounded) & np.uint32(0xFFFF0000)
    return kept.astype(np.uint32).view(np.float32)


# The rounding each activation type applies; Q8_1 rows hold Q8_0's quants and scale.
_ROUNDING: dict[GGMLType, Callable[[np.ndarray], np.ndarray]] = {
    GGMLType.F32: lambda x: x,
    GGMLType.F16: lambda x: x.astype(np.float16).astype(np.float32),
    GGMLType.BF16: _round_to_bfloat16,
    GGMLType.Q8_0: lambda x: _dequantized(*quantize_q8_0(x), x.shape),
    GGMLType.Q8_1: lambda x: _dequantized(*quantize_q8_0(x), x.shape),
    GGMLType.Q8_K: lambda x: _dequantized(*quantize_q8_k(x), x.shape),
}


def gelu_fp16_table(x: np.ndarray) -> np.ndarray:
    """ggml's float32 GELU with ``GGML_GELU_FP16``: a lookup in a float16 table of tanh-GELU."""
    x = np.asarray(x, dtype=np.float32)
    looked_up = _gelu_table()[x.astype(np.float16).view(np.uint16)].astype(np.float32)
    return np.where(x <= -GELU_TABLE_LIMIT, np.float32(0), np.where(x >= GELU_TABLE_LIMIT, x, looked_up))


@functools.cache
def _gelu_table() -> np.ndarray:
    """``ggml_table_gelu_f16``: the tanh-GELU of every float16 bit pattern, stored as float16.

    Computed as the compiled ``ggml_gelu_f32`` computes it, so that every entry is bit-exact:
    float32 arithmetic, ``1 + a*x*x`` contracted into one fused multiply-add (GCC's default on
    FMA targets), and the C library's own ``tanhf``, whose last bit numpy's tanh does not
    always share (234 of the entries would differ).
    """
    x = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        # float64 holds the product of two float32 exactly, so the sum is rounded once, as fma does
        cubic = ((GELU_COEF_A * x).astype(np.float64) * x + 1.0).astype(np.float32)
        inner = SQRT_2_OVER_PI * x * cubic
        tanhf = _c_tanhf()
        tanh = np.fromiter(map(tanhf, inner.tolist()), dtype=np.float32, count=inner.size)
        return (np.float32(0.5) * x * (np.float32(1) + tanh)).astype(np.float16)


def _c_tanhf() -> Callable[[float], float]:
    """The C library's float ``tanhf``, the one llama.cpp's compiled ``ggml_gelu_f32`` calls."""
    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    libm.tanhf.restype = ctypes.c_float
    libm.tanhf.argtypes = [ctypes.c_float]
    return libm.tanhf


class LlamaCppArithmetic:
    """What llama.cpp's CPU backend computes for the weights of one GGUF file.

    ``linear(x, weight, name)`` replaces the reference's exact ``x @ weight.T``; ``gelu_tanh``
    replaces its exact GELU. Weight names are the reference's (a tied LM head is looked up as
    the embedding table it is stored as).
    """

    def __init__(self, gguf: GGUFFile):
        self._gguf = gguf
        self._block_mins: dict[str, np.ndarray] = {}

    def weight_type(self, name: str) -> GGMLType:
        """The GGML type of the stored tensor behind reference weight ``name``."""
        return self._gguf.info(stored_name(self._gguf, name)).ggml_type

    def activation_type(self, name: str) -> GGMLType:
        """The type ggml converts a matmul's input rows to for weight ``name``."""
        weight_type = self.weight_type(name)
        activation_type = VEC_DOT_TYPE.get(weight_type)
        if activation_type is None:
            raise UnsupportedModelError(self._gguf.path, f"tensor {name!r} has type {weight_type.name}, "
                                                         "which ggml's CPU backend does not multiply")
        return activation_type

    def linear(self, x: np.ndarray, weight: np.ndarray, name: str) -> np.ndarray:
        """``x @ weight.T`` as llama.cpp computes it for the stored weight ``name``."""
        activation_type = self.activation_type(name)
        product = round_activations(x, activation_type) @ weight.T
        if activation_type == GGMLType.Q8_1:
            product += self._q8_1_sum_correction(x, name)
        return product

    def gelu_tanh(self, x: np.ndarray) -> np.ndarray:
        return gelu_fp16_table(x)

    def _q8_1_sum_correction(self, x: np.ndarray, name: str) -> np.ndarray:
        # ggml adds min_w * s_x per block; the dequantized product above added min_w * d_x * sum(q_x)
        # with d_x already in float16, so the rest is min_w * (s_x - fp16(d_x) * sum(q_x)).
        quants, scale16, stored_sums = quantize_q8_1(x)
        dequantized_sums = scale16.astype(np.float32) * quants.sum(axis=-1, dtype=np.int32).astype(np.float32)
        return (stored_sums.astype(np.float32) - dequantized_sums) @ self._mins(name).T

    def _mins(self, name: str) -> np.ndarray:
        """The float16 minimum of every 32-value block of a Q4_1/Q5_1 weight, ``[out, in / 32]``."""
        mins = self._block_mins.get(name)
        if mins is None:
            stored = stored_name(self._gguf, name)
            info = self._gguf.info(stored)
            type_size = GGML_QUANT_SIZES[info.ggml_type][1]
            blocks = self._gguf.raw(stored).reshape(-1, type_size)
            mins = np.ascontiguousarray(blocks[:, _MIN_OFFSET:_MIN_OFFSET + 2]).view(np.float16)
            mins = self._block_mins[name] = mins.astype(np.float32).reshape(info.shape[0], -1)
        return mins
