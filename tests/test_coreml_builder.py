"""Core ML shard builder: packages coremltools accepts, weights coremltools decompresses to the
quantizer's own values bit for bit, fp16 rewrites checked against the source weights, and
builds that are deterministic, resumable and never look complete when killed."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

coremltools = pytest.importorskip("coremltools")
from coremltools.converters.mil.frontend.milproto.load import load as load_milproto  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402
from coremltools.optimize.coreml._quantization_passes import WeightDecompressor  # noqa: E402

from anepack.coreml import builder  # noqa: E402
from anepack.coreml.builder import (  # noqa: E402
    EMITTED_OPS,
    MASK_HIDDEN,
    build_shards,
    choose_alpha,
    host_inputs,
)
from anepack.coreml.manifest import read_manifest  # noqa: E402
from anepack.coreml.package import WEIGHTS_PATH  # noqa: E402
from anepack.errors import AnepackError  # noqa: E402
from anepack.reference.common import attention_mask, rope  # noqa: E402
from anepack.source import open_gguf  # noqa: E402
from anepack.synth import write_synthetic_gguf  # noqa: E402
from anepack.validate.recipes import parse_recipe  # noqa: E402
from anepack.validate.weights import RecipeWeights  # noqa: E402

# Every emitter path: LUT grouped / per tensor / with an int8 LUT / with a channel scale,
# vector LUT, signed and unsigned-affine linear (offset), 4-bit packing, fp16.
GEMMA_RECIPE = """
name = "mixed-gemma"
[[rule]]
tensors = "blk.0.attn_q.weight"
format = "lut4-g16"
[[rule]]
tensors = "blk.0.attn_k.weight"
format = "int8-channel"
[[rule]]
tensors = "blk.0.attn_v.weight"
format = "lut6-tensor"
[[rule]]
tensors = "blk.0.attn_output.weight"
format = "fp16"
[[rule]]
tensors = "blk.0.ffn_*"
format = "lut4-g16-int8lut"
[[rule]]
tensors = "blk.1.attn_k.weight"
format = "uint4-channel-affine"
[[rule]]
tensors = "blk.1.attn_v.weight"
format = "vlut2x8"
[[rule]]
tensors = "blk.1.*"
format = "lut4-g16-pcs"
[[rule]]
tensors = "output.weight"
format = "lut4-g16"
"""

LLAMA_RECIPE = """
name = "mixed-llama"
[[rule]]
tensors = "blk.*.attn_*"
format = "int8-channel"
[[rule]]
tensors = "blk.*.ffn_*"
format = "lut4-g16"
[[rule]]
tensors = "output.weight"
format = "fp16"
"""

GEMMA_BUILD = dict(alpha=0.25, chunk=8, context=32, max_shard_mb=0.25)
# An fp16 LM head in chunks of 768 rows (the 16384 limit scaled down to the small vocabulary),
# one chunk per package under this budget: 2048 rows -> head_00..head_02.
LLAMA_BUILD = dict(alpha=0.5, chunk=4, context=16, max_shard_mb=0.25)
LLAMA_VOCAB_CHUNK = 768


def _tree(directory: Path) -> dict[str, bytes]:
    return {
        path.relative_to(directory).as_posix(): path.read_bytes()
        for path in sorted(directory.rglob("*")) if path.is_file()
    }


def _is_temporary(name: str) -> bool:
    return name.startswith(".") and (".tmp-" in name or ".old-" in name)


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """A 2-layer synthetic Gemma 3, its recipe weights and one uninterrupted build."""
    root = tmp_path_factory.mktemp("gemma-shards")
    gguf = open_gguf(write_synthetic_gguf(root / "gemma3.gguf", "gemma3", layers=2, seed=5))
    weights = RecipeWeights(gguf, parse_recipe(GEMMA_RECIPE))
    manifest = build_shards(gguf, weights, root / "out", **GEMMA_BUILD)
    return gguf, weights, root / "out", manifest


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama-shards")
    gguf = open_gguf(write_synthetic_gguf(root / "llama.gguf", "llama", layers=2, seed=6))
    weights = RecipeWeights(gguf, parse_recipe(LLAMA_RECIPE))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(builder, "MAX_VOCAB_CHUNK", LLAMA_VOCAB_CHUNK)
        manifest = build_shards(gguf, weights, root / "out", **LLAMA_BUILD)
    return gguf, weights, root / "out", manifest


@pytest.fixture(params=["gemma", "llama"])
def built(request):
    return request.getfixturevalue(request.param)


def _loaded(package: Path):
    spec = coremltools.models.MLModel(str(package), skip_model_load=True).get_spec()
    program = load_milproto(spec, spec.specificationVersion, str(package / WEIGHTS_PATH))
    return spec, program


def test_layout_follows_the_budget(gemma, llama):
    _, _, out, manifest = gemma
    assert [s.file for s in manifest.shards] == [
        "layers_00_00.mlpackage", "layers_01_01.mlpackage", "head_00.mlpackage",
    ]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["embeddings.npy", "manifest.json"] + [s.file for s in manifest.shards]
    )
    _, _, _, manifest = llama
    heads = [s for s in manifest.shards if s.kind == "head"]
    assert [(s.file, s.vocab) for s in heads] == [
        ("head_00.mlpackage", (0, 768)), ("head_01.mlpackage", (768, 1536)), ("head_02.mlpackage", (1536, 2048)),
    ]
    assert [spec.name for s in heads for spec in s.functions["decode"].outputs] == ["logits_0", "logits_1", "logits_2"]


def test_packages_pass_coremltools_validation(built):
    _, _, out, manifest = built
    for shard in manifest.shards:
        spec, program = _loaded(out / shard.file)
        assert spec.specificationVersion == coremltools.target.iOS18
        assert [f.name for f in spec.description.functions] == ["prefill", "decode"]
        assert spec.description.defaultFunctionName == "prefill"
        program.validate()
        program._check_early_error_out_for_invalid_program()
        for function_spec in spec.description.functions:
            declared = shard.functions[function_spec.name]
            for features, tensors in ((function_spec.input, declared.inputs), (function_spec.output, declared.outputs)):
                assert [(f.name, tuple(f.type.multiArrayType.shape)) for f in features] == [
                    (t.name, t.shape) for t in tensors
                ]
                assert {f.type.multiArrayType.dataType for f in features} == {
                    coremltools.proto.FeatureTypes_pb2.ArrayFeatureType.FLOAT16
                }
        for function in program.functions.values():
            for op in function.operations:
                assert op.op_type in EMITTED_OPS, op.op_type
                if op.op_type == "const" or op.op_type.startswith("constexpr_"):
                    continue
                for var in op.outputs:
                    assert var.dtype == types.fp16, (op.name, var.dtype)
                    assert var.rank <= 5 and max(var.shape) <= 16384, (op.name, var.shape)


def test_every_weight_decompresses_to_the_quantizer_values(built):
    _, weights, out, manifest = built
    head_chunk = re.compile(r"output_weight_(\d+)_(\d+)")
    for shard in manifest.shards:
        spec, program = _loaded(out / shard.file)
        emitted = {
            op.weight.name: op.weight.op.op_type
            for op in program.functions["decode"].find_ops(op_type="linear")
        }
        WeightDecompressor(op_selector=lambda op: True).apply(program)
        for function in program.functions.values():
            linears = function.find_ops(op_type="linear")
            assert linears
            for op in linears:
                match = head_chunk.fullmatch(op.weight.name)
                # blk_1_attn_q_weight -> blk.1.attn_q.weight
                stem = op.weight.name[: -len("_weight")]
                tensor = "output.weight" if match else stem.replace("_", ".", 2) + ".weight"
                q = weights.compressed(tensor)
                expected = q.dequantize()
                if match:
                    expected = expected[int(match[1]): int(match[2])]
                got = op.weight.val
                assert got.dtype == np.float16 and got.shape == expected.shape, tensor
                assert np.array_equal(got.view(np.uint16), expected.view(np.uint16)), tensor
                family = q.format.family
                assert emitted[op.weight.name] == ("const" if family == "dense" else (
                    "constexpr_blockwise_shift_scale"
                    if family == "linear" or getattr(q.format, "per_channel_scale", False)
                    else "constexpr_lut_to_dense"
                )), tensor


def _blob_offsets(spec) -> dict[str, dict[tuple[str, str], int]]:
    """Per function: (op, input) -> offset in weight.bin of every file-backed value."""
    offsets = {}
    for name, function in spec.mlProgram.functions.items():
        found = {}
        for op in function.block_specializations[function.opset].operations:
            values = [("val", op.attributes["val"])] if op.type == "const" else [
                (param, argument.value) for param, arg in op.inputs.items() for argument in arg.arguments
            ]
            for param, value in values:
                if value.WhichOneof("value") == "blobFileValue":
                    op_name = op.attributes["name"].immediateValue.tensor.strings.values[0]
                    found[(op_name, param)] = value.blobFileValue.offset
        offsets[name] = found
    return offsets


def test_prefill_and_decode_share_one_copy_of_each_weight(gemma):
    _, _, out, manifest = gemma
    for shard in manifest.shards:
        spec, _ = _loaded(out / shard.file)
        offsets = _blob_offsets(spec)
        assert offsets["prefill"] and offsets["prefill"] == offsets["decode"]
        assert len(set(offsets["prefill"].values())) == len(offsets["prefill"])


def test_alpha_scales_the_residual_stream_exactly(gemma):
    gguf, weights, out, manifest = gemma
    alpha, eps = manifest.alpha, gguf.config.rms_eps
    table = weights.exact("token_embd.weight") * np.float32(np.sqrt(gguf.config.n_embd))
    assert np.array_equal(np.load(out / "embeddings.npy"), (table * np.float32(alpha)).astype(np.float16))
    _, program = _loaded(out / "layers_01_01.mlpackage")
    function = program.functions["prefill"]
    consts = {op.outputs[0].name: op.outputs[0].val for op in function.find_ops(op_type="const")}
    scales = {"post_attention_norm": alpha, "post_ffw_norm": alpha, "attn_norm": 1.0, "ffn_norm": 1.0}
    for norm, scale in scales.items():
        gain = weights.exact(f"blk.1.{norm}.weight")
        assert np.array_equal(consts[f"blk_1_{norm}_weight"], (gain * np.float32(scale)).astype(np.float16)), norm
    epsilons = {op.name: float(op.epsilon.val) for op in function.find_ops(op_type="layer_norm")}
    assert epsilons["blk_1_attn_norm_ln"] == float(np.float16(eps * alpha**2))
    assert epsilons["blk_1_post_ffw_norm_ln"] == float(np.float16(eps))


def test_llama_branches_are_scaled_by_alpha(llama):
    _, _, out, manifest = llama
    first = next(shard for shard in manifest.shards if 0 in shard.layers)
    _, program = _loaded(out / first.file)
    function = program.functions["decode"]
    for branch in ("attn_scaled", "ffn_scaled"):
        (op,) = [op for op in function.find_ops(op_type="mul") if op.name == f"blk_0_{branch}"]
        assert float(op.y.val) == manifest.alpha


def test_choose_alpha_closed_form():
    assert choose_alpha(1000.0) == 1.0
    assert choose_alpha(16376.0) == 1.0  # 16376 * 4 = 65504 exactly
    assert choose_alpha(1e5) == 0.125  # 12500 <= 16376 < 25000
    assert choose_alpha(1e5, margin=1.0) == 0.5
    for bad in (0.0, -3.0, float("nan"), float("inf")):
        with pytest.raises(AnepackError):
            choose_alpha(bad)


@pytest.mark.parametrize("name, variant", [("gemma", "local"), ("llama", "global")])
def test_host_masks_match_the_reference_mask(request, name, variant):
    config = request.getfixturevalue(name)[0].config
    window = config.sliding_window if variant == "local" else None
    start, tokens, context = 13, 6, 32
    mask = host_inputs(config, start, tokens, context)[f"mask_{variant}"]
    positions, cached = start + np.arange(tokens), np.arange(context)
    assert mask.shape == (tokens, context + tokens) and mask.dtype == np.float16
    cache_visible = attention_mask(positions, cached, window) & (cached < start)[None, :]
    expected = np.concatenate([cache_visible, attention_mask(positions, positions, window)], axis=1)
    assert np.array_equal(mask == 0, expected)
    assert set(np.unique(mask)) == {np.float16(0), np.float16(MASK_HIDDEN)}
    with pytest.raises(AnepackError):
        host_inputs(config, 30, 4, context)


@pytest.mark.parametrize("name", ["gemma", "llama"])
def test_host_rope_tables_reproduce_the_reference_rope(request, name):
    config = request.getfixturevalue(name)[0].config
    start, tokens = 5, 4
    inputs = host_inputs(config, start, tokens, 16)
    x = np.random.default_rng(0).standard_normal((tokens, 3, config.head_dim)).astype(np.float32)
    neox = name == "gemma"
    half = config.head_dim // 2
    if neox:
        swapped = np.concatenate([x[..., half:], x[..., :half]], -1)
    else:
        swapped = x.reshape(tokens, 3, half, 2)[..., ::-1].reshape(x.shape)
    variant = "local" if neox else "global"
    cos, sin = (inputs[f"{table}_{variant}"].astype(np.float32)[:, None, :] for table in ("cos", "sin"))
    base = config.rope_base if name == "llama" else config.rope_base_local
    expected = rope(x, start + np.arange(tokens), base, neox=neox)
    # The tables are stored in fp16, so the match is to fp16 resolution of cos and sin.
    np.testing.assert_allclose(x * cos + swapped * sin, expected, atol=5e-3 * np.abs(x).max())


def test_same_inputs_give_identical_bytes(gemma, tmp_path):
    gguf, _, out, _ = gemma
    fresh = RecipeWeights(gguf, parse_recipe(GEMMA_RECIPE))  # quantized again from scratch
    build_shards(gguf, fresh, tmp_path / "again", **GEMMA_BUILD)
    assert _tree(tmp_path / "again") == _tree(out)


class _Interrupt(Exception):
    pass


def test_interrupted_build_resumes_to_identical_bytes(gemma, tmp_path):
    gguf, weights, out, _ = gemma
    target = tmp_path / "resumed"

    def stop_after_first_shard(step):
        if step.index == 1:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        build_shards(gguf, weights, target, progress=stop_after_first_shard, **GEMMA_BUILD)
    assert sorted(p.name for p in target.iterdir()) == ["embeddings.npy", "layers_00_00.mlpackage"]
    first_blob = target / "layers_00_00.mlpackage" / WEIGHTS_PATH / "weight.bin"
    mtime = first_blob.stat().st_mtime_ns

    steps = []
    build_shards(gguf, weights, target, progress=steps.append, **GEMMA_BUILD)
    assert [(s.file, s.rebuilt) for s in steps] == [
        ("embeddings.npy", False), ("layers_00_00.mlpackage", False),
        ("layers_01_01.mlpackage", True), ("head_00.mlpackage", True),
    ]
    assert first_blob.stat().st_mtime_ns == mtime
    assert _tree(target) == _tree(out)

    # A changed recipe entry rebuilds exactly the shard that holds the tensor.
    changed_recipe = GEMMA_RECIPE.replace('format = "lut6-tensor"', 'format = "int8-tensor"')
    changed = RecipeWeights(gguf, parse_recipe(changed_recipe))
    steps.clear()
    manifest = build_shards(gguf, changed, target, progress=steps.append, **GEMMA_BUILD)
    assert [s.file for s in steps if s.rebuilt] == ["layers_00_00.mlpackage"]
    assert manifest.weights["blk.0.attn_v.weight"].format == "int8-tensor"


_KILLED_BUILD = textwrap.dedent("""
    import os, signal, sys
    from anepack.coreml import builder, package
    from anepack.source import open_gguf
    from anepack.validate.recipes import parse_recipe
    from anepack.validate.weights import RecipeWeights

    gguf_path, out, recipe, chunk, context, budget = sys.argv[1:]
    export = package.export_milproto
    calls = []

    def export_then_die(*args, **kwargs):
        spec = export(*args, **kwargs)  # weight.bin of the second shard is on disk now
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return spec

    package.export_milproto = export_then_die
    gguf = open_gguf(gguf_path)
    builder.build_shards(gguf, RecipeWeights(gguf, parse_recipe(recipe)), out, alpha=0.25,
                         chunk=int(chunk), context=int(context), max_shard_mb=float(budget))
""")


def test_a_killed_build_never_looks_complete(gemma, tmp_path):
    gguf, weights, out, _ = gemma
    target = tmp_path / "killed"
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    arguments = [str(gguf.path), str(target), GEMMA_RECIPE] + [
        str(GEMMA_BUILD[key]) for key in ("chunk", "context", "max_shard_mb")
    ]
    completed = subprocess.run(
        [sys.executable, "-c", _KILLED_BUILD, *arguments], env=environment, capture_output=True, timeout=600
    )
    assert completed.returncode == -signal.SIGKILL, completed.stderr.decode()[-2000:]
    names = sorted(p.name for p in target.iterdir())
    complete = [name for name in names if not _is_temporary(name)]
    assert complete == ["embeddings.npy", "layers_00_00.mlpackage"]
    assert any(_is_temporary(name) and "layers_01_01" in name for name in names)  # killed mid-write

    build_shards(gguf, weights, target, **GEMMA_BUILD)
    assert _tree(target) == _tree(out)
    assert read_manifest(target).shards == read_manifest(out).shards


def test_embeddings_beyond_fp16_are_refused_in_one_line(gemma, tmp_path):
    gguf, weights, _, _ = gemma
    with pytest.raises(AnepackError) as error:
        build_shards(gguf, weights, tmp_path / "out", **(GEMMA_BUILD | {"alpha": 2.0**20}))
    assert str(error.value).startswith(f"{gguf.path}: embeddings times alpha reach ")
    assert "beyond fp16" in str(error.value) and "\n" not in str(error.value)


def test_a_layer_over_the_budget_is_refused(gemma, tmp_path):
    gguf, weights, _, _ = gemma
    with pytest.raises(AnepackError, match="layer 0 needs"):
        build_shards(gguf, weights, tmp_path / "tiny", **{**GEMMA_BUILD, "max_shard_mb": 0.01})
