"""The emulation of llama.cpp's CPU arithmetic, against closed forms, gguf-py and llama.cpp itself.

The activation quantizers are checked against hand-computed blocks and gguf-py's own Q8_0
quantizer. llama.cpp is then the referee at op level: its matmul inputs and outputs, captured
through ggml's graph callback, show that the emulated matmul (and the float16 GELU table)
reproduce llama.cpp where the exact ones do not, on every weight type of the default model and
on synthetic Q4_1 / F16 / BF16 models. End to end, the emulated reference still misses the
golden bar on the Q4_K_M file: the quantizer is discontinuous, so a float rounding difference
anywhere upstream flips quants and the flips grow layer by layer; the last tests measure that.
"""

from __future__ import annotations

import ctypes
import functools

import llama_cpp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as GGMLType
from gguf.quants import quantize

from anepack.golden import Thresholds, compare, load_prompts
from anepack.llamacpp import GGML_TYPE_F32 as KV_TYPE_F32
from anepack.llamacpp import LlamaCppReferee, open_llama
from anepack.metrics import rowwise_cosine
from anepack.reference import build
from anepack.reference.common import gelu_tanh
from anepack.reference.llamacpp_emulation import (
    LlamaCppArithmetic,
    gelu_fp16_table,
    quantize_q8_0,
    quantize_q8_1,
    quantize_q8_k,
    round_activations,
)
from anepack.source import open_gguf
from anepack.source.weights import EMBEDDING, LM_HEAD, stored_name
from anepack.synth import write_synthetic_gguf
from anepack.tokenizer import Tokenizer

PROMPTS = load_prompts()
WORST_PROMPT = "json"  # where the exact reference is furthest from llama.cpp on the Q4_K_M file
GOLDEN_BAR = Thresholds(min_cosine=0.99, min_top1=0.95, top1_per_prompt=True)
# Given llama.cpp's own input rows, the emulated matmul differs from its output by float
# summation order only (measured <= 9.4e-7 of the output's largest value); the exact matmul
# misses by the activation rounding (measured >= 2e-4).
EMULATED_MATMUL_ERROR = 3e-6
EXACT_MATMUL_ERROR = 5e-5


# --- ggml's graph callback: every op's output as llama.cpp computed it -----------------------

class _GGMLTensor(ctypes.Structure):
    """``struct ggml_tensor`` as declared in the ggml.h that llama-cpp-python 0.3.36 vendors."""


_GGMLTensor._fields_ = [
    ("type", ctypes.c_int),
    ("buffer", ctypes.c_void_p),
    ("ne", ctypes.c_int64 * 4),
    ("nb", ctypes.c_size_t * 4),
    ("op", ctypes.c_int),
    ("op_params", ctypes.c_int32 * 16),
    ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(_GGMLTensor) * 10),
    ("view_src", ctypes.c_void_p),
    ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p),
    ("name", ctypes.c_char * 64),
    ("extra", ctypes.c_void_p),
    ("padding", ctypes.c_char * 8),
]
GGML_TYPE_F32 = 0
GGML_OP_MUL_MAT = 29  # position in ggml.h's enum ggml_op


def _float32_rows(tensor: _GGMLTensor) -> np.ndarray:
    """A float32 tensor's data as ``[rows, ne0]`` (copied; ggml reuses the memory later)."""
    shape = tuple(reversed(tensor.ne))
    strides = tuple(reversed(tensor.nb))
    extent = sum((n - 1) * s for n, s in zip(shape, strides)) + 4
    buffer = (ctypes.c_char * extent).from_address(tensor.data)
    array = np.ndarray(shape, dtype=np.float32, buffer=buffer, strides=strides)
    return array.reshape(-1, shape[-1]).copy()


def capture_llamacpp(model_path, tokens, gguf) -> tuple[dict, dict]:
    """Decode ``tokens`` once in llama.cpp and keep, per GGUF weight, its matmul's input rows
    and output, and every other named float32 op output. Only the last position gets logits."""
    matmuls, outputs = {}, {}

    @ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_bool, ctypes.c_void_p)
    def observe(tensor_pointer, ask, user_data):
        tensor = ctypes.cast(tensor_pointer, ctypes.POINTER(_GGMLTensor)).contents
        if ask:  # ask for every node: ggml then calls back once each is computed
            return True
        if tensor.op == GGML_OP_MUL_MAT:
            weight = tensor.src[0].contents.name.decode()
            if weight in gguf.tensors:
                matmuls[weight] = (_float32_rows(tensor.src[1].contents), _float32_rows(tensor))
        elif tensor.type == GGML_TYPE_F32:
            outputs[tensor.name.decode()] = _float32_rows(tensor)
        return True

    llama = open_llama(model_path, n_ctx=len(tokens), n_batch=len(tokens), n_ubatch=len(tokens),
                       n_threads=2, n_threads_batch=2, flash_attn=False, type_k=KV_TYPE_F32, type_v=KV_TYPE_F32)
    params = llama.context_params
    params.cb_eval = observe
    context = llama_cpp.llama_init_from_model(llama.model, params)
    try:
        ids = (llama_cpp.llama_token * len(tokens))(*[int(t) for t in tokens])
        assert llama_cpp.llama_decode(context, llama_cpp.llama_batch_get_one(ids, len(tokens))) == 0
    finally:
        llama_cpp.llama_free(context)
        llama.close()
    return matmuls, outputs


def relative_error(value: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(value - expected).max() / np.abs(expected).max())


def reference_name(gguf, weight: str) -> str:
    """The reference's name for a GGUF weight (a tied LM head is the embedding table)."""
    return LM_HEAD if weight == EMBEDDING and stored_name(gguf, LM_HEAD) == EMBEDDING else weight


# --- the activation quantizers ------------------------------------------------------------------

def test_q8_0_closed_form_rounds_half_to_even():
    block = np.zeros(32, dtype=np.float32)
    block[:6] = [127.0, -127.0, 2.5, 3.5, -2.5, 0.4]  # amax 127: multiplier 127 / 127 = 1
    quants, scale = quantize_q8_0(block)
    assert scale.dtype == np.float16 and scale.tolist() == [1.0]
    # _mm256_round_ps: halves go to the even neighbour (roundf would give 3 and -3)
    assert quants[0, :6].tolist() == [127, -127, 2, 4, -2, 0]
    zero_quants, zero_scale = quantize_q8_0(np.zeros((2, 64), dtype=np.float32))
    assert not zero_quants.any() and not zero_scale.any()


def test_q8_0_matches_gguf_py_quantizer():
    rng = np.random.default_rng(0)
    x = (rng.standard_t(4, size=(64, 256)) * rng.uniform(0.01, 100, size=(64, 1))).astype(np.float32)
    x[3, 32:64] = 0.0  # an all-zero block
    blocks = quantize(x, GGMLType.Q8_0).reshape(-1, 34)  # float16 d, then 32 int8 quants
    expected_scale = blocks[:, :2].copy().view(np.float16).reshape(64, 8)
    expected_quants = blocks[:, 2:].copy().view(np.int8).reshape(64, 8, 32)
    quants, scale = quantize_q8_0(x)
    np.testing.assert_array_equal(scale, expected_scale)
    # gguf-py mirrors ggml's reference C (x * (1 / d), roundf); the x86 path multiplies by
    # 127 / amax and rounds halves to even. They may differ only where x lands on a half.
    blocks_of_x = x.reshape(64, 8, 32)
    amax = np.abs(blocks_of_x).max(axis=-1, keepdims=True)
    scaled = np.abs(blocks_of_x) * 127 / np.where(amax > 0, amax, 1)
    near_half = np.abs(scaled - np.floor(scaled) - 0.5) < 1e-3
    differs = quants != expected_quants
    assert not np.any(differs & ~near_half)
    assert np.abs(quants.astype(int) - expected_quants).max() <= 1


def test_q8_1_keeps_the_block_sum_of_the_unrounded_scale():
    ones = np.ones(32, dtype=np.float32)
    quants, scale, block_sum = quantize_q8_1(np.concatenate([ones, np.r_[ones[:16], -ones[:16]]]))
    assert quants[0].tolist() == [127] * 32 and scale[0] == np.float16(1 / 127)
    # s is the block's sum, d * sum(q): 32 and 0 here, exactly
    assert block_sum.dtype == np.float16 and block_sum.tolist() == [32.0, 0.0]


def test_q8_k_closed_form():
    ramp = np.arange(-128, 128, dtype=np.float32)  # largest magnitude: -128, negative
    quants, scale = quantize_q8_k(ramp)
    # iscale = -127 / -128; exact in binary, so x * iscale is exact before rounding
    np.testing.assert_array_equal(quants[0], np.rint(np.arange(-128, 128) * 127 / 128))
    assert scale.dtype == np.float32 and scale[0] == np.float32(128 / 127)
    quants, scale = quantize_q8_k(-ramp)  # largest magnitude +128: the scale turns negative
    np.testing.assert_array_equal(quants[0], np.rint(np.arange(-128, 128) * 127 / 128))
    assert scale[0] == np.float32(-128 / 127)

    tie = np.zeros(256, dtype=np.float32)
    tie[[3, 10]] = [5.0, -5.0]  # equal magnitudes: the first one sets the sign
    quants, scale = quantize_q8_k(tie)
    assert quants[0, [3, 10]].tolist() == [-127, 127] and scale[0] == np.float32(-5 / 127)
    quants, scale = quantize_q8_k(np.zeros((1, 512), dtype=np.float32))
    assert not quants.any() and not scale.any()


def test_rounded_activations_stay_within_half_a_step():
    x = np.random.default_rng(1).standard_normal((8, 512)).astype(np.float32) * 30
    # Q8_0's step is amax / 127 rounded to float16 (relative error <= 2**-11, times up to 127
    # steps: 0.062 of a step on top of the half); Q8_K keeps its float32 step.
    for activation_type, quantizer, block, bound in ((GGMLType.Q8_0, quantize_q8_0, 32, 0.5 + 127 * 2**-11),
                                                     (GGMLType.Q8_K, quantize_q8_k, 256, 0.5 + 1e-5)):
        step = np.abs(quantizer(x)[1].astype(np.float32))
        error = np.abs(round_activations(x, activation_type) - x).reshape(8, -1, block)
        assert np.all(error <= bound * step[..., None])
        assert error.max() > 0.45 * step.max()  # and the rounding did happen


def test_bf16_rounding_closed_form():
    x = np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 1 + 2**-7, 3.0], dtype=np.float32)
    # bfloat16 keeps 7 mantissa bits: the first three sit halfway and go to the even neighbour
    expected = [1.0, 1 + 2**-6, -1.0, 1 + 2**-7, 3.0]
    assert round_activations(x, GGMLType.BF16).tolist() == expected


def test_gelu_table_closed_form():
    x = np.array([-12.0, -10.0, 0.0, 1.0, 1.0001, 10.0, 12.3], dtype=np.float32)
    out = gelu_fp16_table(x)
    # gelu(1) = 0.8411920; float16 spacing there is 2**-11, so the table holds 1723 * 2**-11.
    # 1.0001 rounds to the float16 1.0 before the lookup; +-10 and beyond skip the table.
    assert out.tolist() == [0.0, 0.0, 0.0, 1723 * 2**-11, 1723 * 2**-11, 10.0, np.float32(12.3)]


# --- llama.cpp as the referee, op by op --------------------------------------------------------

@pytest.fixture(scope="module")
def default_tokens(default_model_path):
    with Tokenizer(default_model_path) as tokenizer:
        return {prompt.name: np.array(tokenizer.encode(prompt.text)) for prompt in PROMPTS}


@pytest.fixture(scope="module")
def default_gguf(default_model_path):
    with open_gguf(default_model_path) as gguf:
        yield gguf


@pytest.fixture(scope="module")
def default_models(default_gguf):
    """Exact and emulated references sharing one dequantized copy of each stored tensor."""
    stored = functools.cache(default_gguf.tensor)

    def weights(name):
        return stored(stored_name(default_gguf, name))

    return {
        "exact": build(default_gguf.config, weights),
        "emulated": build(default_gguf.config, weights, emulate=LlamaCppArithmetic(default_gguf)),
    }


def test_emulated_ops_reproduce_llamacpp_on_the_default_model(default_model_path, default_gguf, default_models,
                                                              default_tokens):
    tokens = default_tokens[WORST_PROMPT]
    matmuls, outputs = capture_llamacpp(default_model_path, tokens, default_gguf)
    emulated, exact = default_models["emulated"], default_models["exact"]
    # every linear weight of every layer, and the tied LM head
    assert len(matmuls) == 7 * default_gguf.config.n_layers + 1
    seen_types = set()
    for weight, (rows, expected) in matmuls.items():
        name = reference_name(default_gguf, weight)
        seen_types.add(default_gguf.info(weight).ggml_type)
        assert relative_error(emulated.linear(rows, name), expected) <= EMULATED_MATMUL_ERROR, weight
        assert relative_error(exact.linear(rows, name), expected) >= EXACT_MATMUL_ERROR, weight
    assert seen_types == {GGMLType.Q5_0, GGMLType.Q8_0, GGMLType.Q4_K, GGMLType.Q6_K}

    for il in range(default_gguf.config.n_layers):
        gate, up = matmuls[f"blk.{il}.ffn_gate.weight"][1], matmuls[f"blk.{il}.ffn_up.weight"][1]
        expected = outputs[f"ffn_geglu-{il}"]
        # the rebuilt table is bit-exact, and the product is one float32 multiplication
        np.testing.assert_array_equal(emulated.gelu_tanh(gate) * up, expected, err_msg=f"layer {il}")
        assert relative_error(gelu_tanh(gate) * up, expected) > 1e-5


@pytest.mark.parametrize("weight_type, activation_type", [("q4_1", GGMLType.Q8_1), ("f16", GGMLType.F16),
                                                          ("bf16", GGMLType.BF16)])
def test_emulated_matmuls_reproduce_llamacpp_on_other_types(tmp_path, weight_type, activation_type):
    path = write_synthetic_gguf(tmp_path / f"llama-{weight_type}.gguf", "llama", layers=1, seed=1,
                                weight_type=weight_type)
    with open_gguf(path) as gguf:
        matmuls, _ = capture_llamacpp(path, np.arange(1, 40, 3), gguf)
        arithmetic = LlamaCppArithmetic(gguf)
        assert len(matmuls) == 8  # q, k, v, output, gate, up, down, LM head
        for weight, (rows, expected) in matmuls.items():
            name = reference_name(gguf, weight)
            assert arithmetic.activation_type(name) == activation_type
            values = gguf.tensor(weight)
            assert relative_error(arithmetic.linear(rows, values, name), expected) <= EMULATED_MATMUL_ERROR, weight
            assert relative_error(rows @ values.T, expected) >= EXACT_MATMUL_ERROR, weight


# --- end to end on the golden prompts ------------------------------------------------------------

@pytest.fixture(scope="module")
def referee_logits(default_model_path, default_tokens):
    with LlamaCppReferee(default_model_path) as referee:
        return {name: referee.logits(tokens) for name, tokens in default_tokens.items()}


@pytest.fixture(scope="module")
def emulated_logits(default_models, default_tokens):
    model = default_models["emulated"]
    return {name: model.forward(tokens).logits for name, tokens in default_tokens.items()}


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason=(
    "llama.cpp's activation quantizer is discontinuous: float-rounding differences upstream of a "
    "matmul flip quants, and the flips grow through the layers (measured: json min cosine 0.960, "
    "top-1 0.882 on japanese, 0.895 on science, 0.909 on french; exact reference 0.949, top-1 0.842)"))
def test_emulated_reference_meets_the_golden_bar_on_q4_k_m(emulated_logits, referee_logits, record_property):
    failures = []
    for name, expected in referee_logits.items():
        check = compare(name, expected, emulated_logits[name])
        record_property(name, f"min cosine {check.cosine.min():.6f} top-1 {check.top1_agreement:.3f}")
        print(f"emulated {name:10s} min cosine {check.cosine.min():.6f} "
              f"(position {int(check.cosine.argmin())}) top-1 {check.top1_agreement:.3f}")
        if not check.passed(GOLDEN_BAR):
            failures.append(name)
    assert not failures, failures


def test_quantized_arithmetic_amplifies_a_float_rounding_change(default_models, default_tokens, emulated_logits,
                                                                referee_logits):
    # One float32 ulp on every embedding value, in a seeded random direction: the exact
    # reference does not move, the emulated one moves by a good part of its gap to llama.cpp,
    # so no reference short of llama.cpp's own float32 operation order can close that gap.
    tokens, expected = default_tokens[WORST_PROMPT], referee_logits[WORST_PROMPT]
    unperturbed = {"exact": default_models["exact"].forward(tokens).logits, "emulated": emulated_logits[WORST_PROMPT]}
    rng = np.random.default_rng(0)
    moved = {}
    for kind, model in default_models.items():
        hidden = model.embed(tokens)
        direction = np.where(rng.random(hidden.shape) < 0.5, -np.inf, np.inf).astype(np.float32)
        hidden = np.nextafter(hidden, direction)
        for il in range(model.config.n_layers):
            hidden = model.layer(il, hidden)
        moved[kind] = 1 - rowwise_cosine(unperturbed[kind], model.final(hidden)).min()
        gap = 1 - rowwise_cosine(expected, unperturbed[kind]).min()
        print(f"{kind:8s} {WORST_PROMPT}: 1 - min cosine to llama.cpp {gap:.2e}, moved by one ulp {moved[kind]:.2e}")
    assert moved["exact"] <= 1e-9  # measured 1e-11
    assert moved["emulated"] >= 1e-3  # measured 1e-2, against a gap to llama.cpp of 4e-2
