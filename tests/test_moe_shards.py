"""Gemma 4 MoE shards: the synthetic ``moe`` model built into trunk, expert and head packages and
run end to end by the MIL interpreter with host-side routing, against the numpy reference on the
same dequantized weights; expert weights against coremltools' own decompression; the layout
under the size budget; and the E2B-style model (per-layer embeddings, KV sharing) the same way.

Routing is a discontinuous choice: where two experts' router probabilities nearly tie, the
float16 shards and the float32 reference may pick different ones, and that position's logits
differ for a reason that is not a shard error. So the shards are compared with the reference
forced to the shards' own choice of experts (routing weights still computed by the reference),
and every choice that differs from the reference's own must be at a near-tie.
"""

from __future__ import annotations

import re

import coremltools
import numpy as np
import pytest
from coremltools.converters.mil.frontend.milproto.load import load as load_milproto
from coremltools.optimize.coreml._quantization_passes import WeightDecompressor

from anepack import synth
from anepack.coreml.builder import build_shards
from anepack.coreml.lint import lint_shards
from anepack.coreml.moe import expert_function
from anepack.coreml.package import WEIGHTS_PATH
from anepack.golden import load_prompts
from anepack.metrics import rowwise_cosine
from anepack.reference import build
from anepack.reference.gemma4 import ForcedRouting, RecordedRouting, own_routing
from anepack.runtime.host_files import tokenizer_path, write_host_files
from anepack.runtime.shards import ShardRuntime
from anepack.source import open_gguf
from anepack.tokenizer import Tokenizer
from anepack.validate.recipes import parse_recipe
from anepack.validate.weights import RecipeWeights

MIN_COSINE = 0.999  # the bar: the artifact computes what the simulation computes
PROMPT_TOKENS = 20  # crosses the sliding window (16) and two chunks, ends in a padded chunk
BUILD = dict(alpha=1.0, chunk=8, context=64, max_shard_mb=0.5)

RECIPE = """
name = "moe-lut4-experts"
[[rule]]
tensors = "blk.*_exps.weight"
format = "lut4-g16"
[[rule]]
tensors = "output.weight"
format = "lut4-g16"
[[rule]]
tensors = "*"
format = "int8-channel"
"""

WHOLE_BANK_RECIPE = """
name = "moe-int8-tensor-banks"
[[rule]]
tensors = "blk.*_exps.weight"
format = "int8-tensor"
[[rule]]
tensors = "*"
format = "lut4-g16"
"""


def _build(root, recipe: str, variant: str = "moe"):
    dims, _ = synth.preset("gemma4", variant)
    gguf = open_gguf(synth.write_synthetic_gguf(root / f"{variant}.gguf", "gemma4", seed=1, **dims))
    weights = RecipeWeights(gguf, parse_recipe(recipe))
    out = root / "shards"
    write_host_files(gguf, out)
    manifest = build_shards(gguf, weights, out, **BUILD)
    return gguf, weights, out, manifest


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("moe-shards"), RECIPE)


@pytest.fixture(scope="module")
def whole_bank(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("moe-whole-bank"), WHOLE_BANK_RECIPE)


def _prompts(out) -> list[np.ndarray]:
    with Tokenizer(tokenizer_path(out)) as tokenizer:
        return [np.array(tokenizer.encode(p.text)[:PROMPT_TOKENS]) for p in load_prompts()[:3]]


def test_moe_shards_match_the_reference_through_host_routing(moe):
    """All prompts run together (``prompt_logits``, each expert once per layer for every
    prompt's tokens, as convert runs them), and the last one alone (``logits``)."""
    gguf, weights, out, _ = moe
    runtime = ShardRuntime(out, "mil")
    reference = build(gguf.config, weights)
    prompts = _prompts(out)
    recorded = [RecordedRouting() for _ in prompts]
    together = runtime.prompt_logits(prompts, recorded)
    runtime.router = alone = RecordedRouting()
    runs = list(zip(prompts, together, recorded)) + [(prompts[-1], runtime.logits(prompts[-1]), alone)]
    forced_min, unforced_min, flips = 1.0, 1.0, 0
    for tokens, logits, routing in runs:
        reference.router = forced = ForcedRouting(routing.choices())
        cosine = rowwise_cosine(reference.forward(tokens).logits, logits)
        assert cosine.min() >= MIN_COSINE, (cosine.min(), int(cosine.argmin()))
        forced_min = min(forced_min, float(cosine.min()))
        differences = forced.differences()
        assert all(difference.near_tie for difference in differences), differences
        flips += len(differences)
        reference.router = own_routing
        unforced_min = min(unforced_min, float(rowwise_cosine(reference.forward(tokens).logits, logits).min()))
    print(f"min cosine with the shards' routing {forced_min:.6f}; "
          f"with the reference's own routing {unforced_min:.6f} ({flips} near-tie choices differ)")


def test_forced_routing_weights_the_forced_experts_by_the_models_probabilities():
    """Closed form: probabilities 0.5, 0.3, 0.15, 0.05; forced to experts 3 and 1 instead of the
    model's 0 and 1 gives weights 0.05 / 0.35 and 0.3 / 0.35, and one difference with gap
    (0.3 - 0.15) / 0.3 = 0.5 (not a near-tie)."""
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    forced = ForcedRouting({7: np.array([[3, 1]])})
    chosen, routing = forced(7, logits, 2)
    np.testing.assert_array_equal(chosen, [[3, 1]])
    np.testing.assert_allclose(routing, [[0.05 / 0.35, 0.3 / 0.35]], rtol=1e-6)
    (difference,) = forced.differences()
    assert (difference.layer, difference.position) == (7, 0)
    assert difference.gap == pytest.approx(0.5, rel=1e-5) and not difference.near_tie


def test_dense_gemma4_shards_match_the_reference(tmp_path):
    """No router: per-layer head sizes and KV heads, V = K and proportional RoPE on the global
    layers, layer_output_scale and the soft-capped head, compared position by position."""
    gguf, weights, out, manifest = _build(tmp_path, RECIPE, "dense")
    assert manifest.rope_freqs is not None and not manifest.expert_down_scales
    runtime = ShardRuntime(out, "mil")
    reference = build(gguf.config, weights)
    for tokens in _prompts(out):
        assert rowwise_cosine(reference.forward(tokens).logits, runtime.logits(tokens)).min() >= MIN_COSINE


def test_released_packages_give_the_same_logits_and_hold_nothing_decoded(moe):
    """``hold_weights=False`` (convert's check on a routed model) decodes each package per call
    and drops it after: the same logits bit for bit, and no package keeps decoded weights."""
    _, _, out, _ = moe
    prompts = _prompts(out)
    held = ShardRuntime(out, "mil").prompt_logits(prompts)
    released = ShardRuntime(out, "mil", hold_weights=False)
    for first, second in zip(held, released.prompt_logits(prompts)):
        np.testing.assert_array_equal(first, second)
    for _, shard in released._layers + released._heads:
        assert not shard.program._materialized and not shard.program._widened_constants


@pytest.mark.parametrize("build_name", ["moe", "e2b"])
def test_decode_steps_continue_the_prefill(request, build_name):
    _, _, out, _ = request.getfixturevalue(build_name)
    runtime = ShardRuntime(out, "mil")
    tokens = _prompts(out)[0][:12]
    whole = runtime.logits(tokens)
    runtime.reset()
    steps = [runtime.prefill(tokens[:9])[-1]] + [runtime.decode(int(token)) for token in tokens[9:]]
    assert rowwise_cosine(whole[8:], np.stack(steps)).min() >= 0.99999


def test_layout_ends_packages_at_the_experts(moe):
    gguf, _, out, manifest = moe
    files = [shard.file for shard in manifest.shards]
    assert files[:4] == ["layers_00_00.mlpackage", "experts_00_000_009.mlpackage",
                         "experts_00_010_015.mlpackage", "layers_01_01.mlpackage"]
    assert files[-1] == "head_00.mlpackage"
    experts = [shard for shard in manifest.shards if shard.kind == "experts"]
    assert [shard.experts for shard in experts[:2]] == [(0, 10), (10, 16)]
    assert list(experts[0].functions)[:3] == ["expert_0_prefill", "expert_0_decode", "expert_1_prefill"]
    budget = BUILD["max_shard_mb"] * 2**20  # bounds the stored weights of every package
    assert all((out / shard.file / WEIGHTS_PATH).stat().st_size <= budget for shard in manifest.shards)
    trunk = manifest.shards[0].functions["decode"]
    assert [spec.name for spec in trunk.outputs[:4]] == ["residual", "dense", "expert_in", "router_logits"]
    assert [spec.name for spec in manifest.shards[3].functions["decode"].inputs[:3]] == ["residual", "dense", "routed"]
    scales = gguf.tensor("blk.2.ffn_down_exps.scale")
    np.testing.assert_array_equal(np.array(manifest.expert_down_scales[2], np.float32), scales)


def test_every_package_loads_in_coremltools_and_lints_on_the_ane(moe):
    _, _, out, manifest = moe
    for shard in manifest.shards:
        model = coremltools.models.MLModel(str(out / shard.file), skip_model_load=True)
        names = [f.name for f in model.get_spec().description.functions]
        assert names == list(shard.functions)
    lint = lint_shards(out)
    assert lint["all_on_ane"] and lint["totals"]["op_share"] == 1.0


@pytest.mark.parametrize("build_name", ["moe", "whole_bank"])
def test_expert_weights_decompress_to_the_recipe_experts(request, build_name):
    """coremltools' decompression of each expert's stored weight equals the recipe's expert,
    quantized alone (lut4-g16) or as a slice of one per-tensor bank (int8-tensor)."""
    _, weights, out, manifest = request.getfixturevalue(build_name)
    shard = next(s for s in manifest.shards if s.kind == "experts" and s.layers == (1,))
    package = out / shard.file
    spec = coremltools.models.MLModel(str(package), skip_model_load=True).get_spec()
    program = load_milproto(spec, spec.specificationVersion, str(package / WEIGHTS_PATH))
    WeightDecompressor(op_selector=lambda op: True).apply(program)
    bank_weight = re.compile(r"(blk_\d+_ffn_\w+_exps_weight)_e(\d+)")
    for index in (shard.experts[0], shard.experts[1] - 1):
        function = program.functions[expert_function(index, "decode")]
        linears = function.find_ops(op_type="linear")
        assert len(linears) == 2
        for op in linears:
            bank, expert = bank_weight.fullmatch(op.weight.name).groups()
            expected = weights.expert(bank.replace("_", ".", 2)[: -len("_weight")] + ".weight", int(expert))
            np.testing.assert_array_equal(op.weight.val, expected.astype(np.float16))


def test_router_and_head_weights_decompress_to_the_recipe_weights(moe):
    """The router is stored float16 whatever the recipe says; the LM head (quantized a row chunk
    at a time) equals the recipe's whole-tensor quantization."""
    _, weights, out, manifest = moe
    expected = {
        "blk_0_ffn_gate_inp_weight": weights.exact("blk.0.ffn_gate_inp.weight").astype(np.float16),
        "output_weight_0_2048": weights.compressed("output.weight").dequantize(),
    }
    for file in ("layers_00_00.mlpackage", "head_00.mlpackage"):
        package = out / file
        spec = coremltools.models.MLModel(str(package), skip_model_load=True).get_spec()
        program = load_milproto(spec, spec.specificationVersion, str(package / WEIGHTS_PATH))
        WeightDecompressor(op_selector=lambda op: True).apply(program)
        for op in program.functions["decode"].find_ops(op_type="linear"):
            if op.weight.name in expected:
                np.testing.assert_array_equal(op.weight.val, expected.pop(op.weight.name))
    assert not expected


def test_whole_bank_per_tensor_format_stays_one_scale(whole_bank):
    _, weights, _, _ = whole_bank
    bank = weights.compressed("blk.0.ffn_down_exps.weight")
    assert bank.scale.size == 1  # the brief's failure mode is reproducible on purpose


@pytest.fixture(scope="module")
def e2b(tmp_path_factory):
    """The E2B-style model (per-layer embeddings; layers 3-5 reuse layer 1's and 2's keys and
    values), alpha 1/4 so the per-layer gate must undo the residual scale, packages of two layers
    so a shared layer reads its source both inside its package and from an earlier one."""
    root = tmp_path_factory.mktemp("e2b-shards")
    dims, _ = synth.preset("gemma4", "ple")
    gguf = open_gguf(synth.write_synthetic_gguf(root / "ple.gguf", "gemma4", seed=1, **dims))
    weights = RecipeWeights(gguf, parse_recipe(RECIPE))
    out = root / "shards"
    write_host_files(gguf, out)
    manifest = build_shards(gguf, weights, out, **(BUILD | {"alpha": 0.25}))
    return gguf, weights, out, manifest


def test_e2b_shards_match_the_reference(e2b):
    gguf, weights, out, manifest = e2b
    config = gguf.config
    assert config.n_embd_per_layer and config.n_kv_shared_layers
    layers = [shard for shard in manifest.shards if shard.kind == "layers"]
    assert [shard.layers for shard in layers] == [(0, 1), (2, 3), (4,), (5,)]
    inputs = [spec.name for spec in layers[1].functions["decode"].inputs]
    # layer 3 reuses layer 1's keys (an earlier package), layer 2 keeps its own
    assert {"embedded", "per_layer_2", "per_layer_3", "k_cache_1", "k_shared_1", "k_cache_2"} <= set(inputs)
    assert [spec.name for spec in layers[1].functions["decode"].outputs] == ["hidden_out", "k_new_2", "v_new_2"]
    runtime = ShardRuntime(out, "mil")
    reference = build(config, weights)
    prompts = _prompts(out)
    for tokens, together in zip(prompts, runtime.prompt_logits(prompts)):
        expected = reference.forward(tokens).logits
        assert rowwise_cosine(expected, runtime.logits(tokens)).min() >= MIN_COSINE
        assert rowwise_cosine(expected, together).min() >= MIN_COSINE


def test_e2b_host_table_and_projection_weights_are_the_models(e2b):
    """The host's per-layer table is the GGUF's rows times sqrt(n_embd_per_layer) in float16, and
    each layer's rows of the projection are stored float16, as every recipe leaves them (like the
    router, it is not a layer matrix a recipe compresses)."""
    gguf, weights, out, manifest = e2b
    width = gguf.config.n_embd_per_layer
    table = np.load(out / manifest.per_layer_embeddings.file)
    expected = (gguf.tensor("per_layer_token_embd.weight") * np.float32(np.sqrt(width))).astype(np.float16)
    np.testing.assert_array_equal(table, expected)
    package = out / "layers_02_03.mlpackage"
    spec = coremltools.models.MLModel(str(package), skip_model_load=True).get_spec()
    program = load_milproto(spec, spec.specificationVersion, str(package / WEIGHTS_PATH))
    WeightDecompressor(op_selector=lambda op: True).apply(program)
    assert weights.compressed("per_layer_model_proj.weight") is None
    projection = weights.exact("per_layer_model_proj.weight").astype(np.float16)
    found = {op.weight.name: op.weight.val for op in program.functions["decode"].find_ops(op_type="linear")
             if op.weight.name.startswith("per_layer_model_proj")}
    assert sorted(found) == [f"per_layer_model_proj_weight_{2 * width}_{3 * width}",
                             f"per_layer_model_proj_weight_{3 * width}_{4 * width}"]
    for il in (2, 3):
        np.testing.assert_array_equal(found[f"per_layer_model_proj_weight_{il * width}_{(il + 1) * width}"],
                                      projection[il * width:(il + 1) * width])
    lint = lint_shards(out)
    assert lint["all_on_ane"] and lint["totals"]["op_share"] == 1.0
