"""Residency lint: ANE-safe builds predicted fully on the Neural Engine, per-block builds flagged
weight by weight, every rule firing on a hand-built MIL program that breaks it, and the rule
table agreeing with the formats' own ``ane_safe``. Expected sets come from coremltools' reading
of the same packages or from how each test program was built, not from the lint."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.frontend.milproto.load import load as load_milproto  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402

from anepack.coreml.builder import EMITTED_OPS, build_shards  # noqa: E402
from anepack.coreml.lint import ANE, lint_package, lint_shards, load_rules  # noqa: E402
from anepack.coreml.package import WEIGHTS_PATH  # noqa: E402
from anepack.coreml.weights import emit_weight  # noqa: E402
from anepack.errors import AnepackError  # noqa: E402
from anepack.quant import parse_format, quantize  # noqa: E402
from anepack.quant.formats import STANDARD_SPECS  # noqa: E402
from anepack.source import open_gguf  # noqa: E402
from anepack.synth import write_synthetic_gguf  # noqa: E402
from anepack.validate.recipes import load_recipe  # noqa: E402
from anepack.validate.weights import RecipeWeights  # noqa: E402

_CONSTANT_OPS = {"const", "constexpr_blockwise_shift_scale", "constexpr_lut_to_dense"}


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """One synthetic 2-layer Gemma 3, built with each recipe the tests need: recipe -> out dir."""
    root = tmp_path_factory.mktemp("lint")
    gguf = open_gguf(write_synthetic_gguf(root / "gemma3.gguf", "gemma3", layers=2, seed=3))
    outs = {}
    for recipe in ("lut4-grouped", "int8-per-channel", "int4-per-block"):
        build_shards(gguf, RecipeWeights(gguf, load_recipe(recipe)), root / recipe, alpha=1.0, chunk=8, context=32)
        outs[recipe] = root / recipe
    return outs


def _coremltools_functions(package: Path) -> dict:
    spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
    return load_milproto(spec, spec.specificationVersion, str(package / WEIGHTS_PATH)).functions


def _save(program, path: Path, mutate=None) -> Path:
    model = ct.convert(program, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                       pass_pipeline=ct.PassPipeline.EMPTY, skip_model_load=True)
    if mutate is None:
        model.save(str(path))
    else:
        spec = model.get_spec()
        mutate(spec)
        ct.models.MLModel(spec, weights_dir=model.weights_dir, skip_model_load=True).save(str(path))
    return path


def _rules(lint, function: str = "main") -> dict[str, set[str]]:
    return {op.output: {finding.rule.id for finding in op.findings} for op in lint.ops if op.function == function}


@pytest.mark.parametrize("recipe", ["lut4-grouped", "int8-per-channel"])
def test_ane_safe_build_is_predicted_fully_on_the_ane(builds, recipe):
    document = lint_shards(builds[recipe])
    assert document["all_on_ane"] is True
    assert document["rules_fired"] == []
    assert document["totals"]["op_share"] == 1.0 and document["totals"]["byte_share"] == 1.0
    for package in document["packages"]:
        computing = [op for function in _coremltools_functions(Path(package["package"])).values()
                     for op in function.operations if op.op_type not in _CONSTANT_OPS]
        assert package["totals"]["ops"] == package["totals"]["ops_on_ane"] == len(computing)
        assert package["weights"] and all(weight["device"] == ANE and not weight["rules"] for weight in package["weights"])


def test_per_block_build_flags_every_per_block_weight_and_nothing_else(builds):
    document = lint_shards(builds["int4-per-block"])
    assert document["all_on_ane"] is False
    assert [entry["rule"] for entry in document["rules_fired"]] == ["per-block-scale-along-cin"]
    for package in document["packages"]:
        functions = _coremltools_functions(Path(package["package"]))
        linears = [op for function in functions.values() for op in function.find_ops(op_type="linear")]
        per_block = set()
        for op in linears:
            weight = op.weight.op
            assert weight.op_type == "constexpr_blockwise_shift_scale"
            assert weight.scale.shape[-1] > 1 and weight.scale.shape[-1] == weight.data.shape[-1] // 32
            per_block.add(op.weight.name)
        computing = sum(op.op_type not in _CONSTANT_OPS for function in functions.values() for op in function.operations)

        flagged = {weight["name"]: weight for weight in package["weights"] if weight["rules"]}
        assert set(flagged) == per_block
        for weight in flagged.values():
            assert [rule["rule"] for rule in weight["rules"]] == ["per-block-scale-along-cin"]
            assert "Cin" in weight["rules"][0]["reason"] and weight["device"] == "gpu"
        off = [op for op in package["ops"] if op["device"] != ANE]
        assert sorted(op["output"] for op in off) == sorted(op.outputs[0].name for op in linears)
        assert all(op["op_type"] == "linear" and [r["rule"] for r in op["rules"]] == ["per-block-scale-along-cin"]
                   and op["rules"][0]["weight"] in per_block for op in off)
        assert package["totals"]["ops"] == computing
        assert package["totals"]["ops_on_ane"] == computing - len(linears)


@pytest.fixture(scope="module")
def broken_package(tmp_path_factory):
    """A program with one op or weight per rule, plus controls that break none."""
    x8_spec = mb.TensorSpec((1, 8), dtype=types.fp16)

    def uint(nbits, shape, seed):
        return np.random.default_rng(seed).integers(0, 2**nbits, shape).astype(
            types.nptype_from_builtin(types.string_to_builtin(f"uint{nbits}")))

    def lut(shape, seed):
        return np.random.default_rng(seed).standard_normal(shape).astype(np.float16)

    @mb.program(input_specs=[mb.TensorSpec((4, 8), dtype=types.fp16), mb.TensorSpec((1, 8), dtype=types.fp32),
                             mb.TensorSpec((1, 1, 1, 2, 4), dtype=types.fp16), mb.TensorSpec((1, 16400), dtype=types.fp16),
                             x8_spec], opset_version=ct.target.iOS18)
    def program(x, x32, x5, wide, x8):
        vectors = {
            # vector LUTs [Cout, Cin] = [*, 8]: lut [groups..., entries, vector size]
            "vlut_ok": (uint(2, (4, 8), 1), lut((1, 1, 4, 2), 2), 0),
            "vlut_too_long": (uint(2, (1, 8), 3), lut((1, 1, 4, 32), 4), 0),
            "vlut_too_many_values": (uint(8, (4, 8), 5), lut((1, 1, 256, 2), 6), 0),
            "vlut_along_cin": (uint(2, (8, 4), 7), lut((1, 1, 4, 2), 8), 1),
            "vlut_grouped": (uint(2, (4, 8), 9), lut((2, 1, 4, 2), 10), 0),
        }
        outputs = [
            mb.gather(x=x, indices=np.array([0, 2], np.int32), axis=0, name="gathered"),
            mb.cast(x=x, dtype="fp32", name="casted"),
            mb.add(x=x32, y=x32, name="fp32_add"),
            mb.add(x=x5, y=x5, name="rank6_add"),
            mb.add(x=wide, y=wide, name="wide_add"),
            mb.add(x=x8, y=x8, name="fp16_add"),
        ]
        for name, (indices, table, axis) in vectors.items():
            weight = mb.constexpr_lut_to_dense(indices=indices, lut=table, vector_axis=np.int32(axis), name=f"{name}_w")
            outputs.append(mb.linear(x=x8, weight=weight, name=name))
        int8_dense = mb.constexpr_lut_to_dense(indices=uint(2, (8, 8), 11), lut=np.arange(-2, 2, dtype=np.int8).reshape(1, 1, 4, 1))
        weight = mb.constexpr_blockwise_shift_scale(data=int8_dense, scale=np.full((8, 1), 0.5, np.float16), name="int8_lut_w")
        outputs.append(mb.linear(x=x8, weight=weight, name="int8_lut_direct"))
        return tuple(outputs)

    def declare_rank6(spec):
        # Core ML refuses rank 6 when converting, so the package declares it afterwards, as a
        # tool that skipped that check would.
        function = spec.mlProgram.functions["main"]
        for op in function.block_specializations[function.opset].operations:
            if op.outputs[0].name == "rank6_add":
                dims = op.outputs[0].type.tensorType.dimensions
                dims.insert(0, dims[0])
                op.outputs[0].type.tensorType.rank = 6

    return _save(program, tmp_path_factory.mktemp("broken") / "broken.mlpackage", declare_rank6)


def test_each_rule_fires_on_the_program_that_breaks_it(broken_package):
    lint = lint_package(broken_package)
    assert _rules(lint) == {
        "gathered": {"falls-off-op-type"},
        "casted": {"falls-off-op-type", "fp32-tensor"},
        "fp32_add": {"fp32-tensor"},
        "rank6_add": {"rank-over-5"},
        "wide_add": {"dim-over-16384"},
        "fp16_add": set(),
        "vlut_ok": set(),
        "vlut_too_long": {"vector-lut-size"},
        "vlut_too_many_values": {"vector-lut-values"},
        "vlut_along_cin": {"vector-lut-axis"},
        "vlut_grouped": {"vector-lut-grouped"},
        "int8_lut_direct": {"int8-lut-form"},
    }
    devices = {op.output: op.device for op in lint.ops}
    assert devices["fp16_add"] == devices["vlut_ok"] == ANE
    assert devices["gathered"] == devices["casted"] == "cpu" and devices["fp32_add"] == "gpu"
    weights = {weight.name: weight for weight in lint.weights}
    assert [finding.rule.id for finding in weights["vlut_too_long_w"].findings] == ["vector-lut-size"]
    assert weights["vlut_ok_w"].device == ANE and weights["vlut_grouped_w"].device == "gpu"
    assert not lint.all_on_ane and lint.totals.ops_on_ane == 2


def test_rule_table_agrees_with_the_formats_ane_safe(tmp_path):
    specs = [*STANDARD_SPECS, "vlut2x32", "vlut8x2"]
    weight = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    names = {spec: "w_" + spec.replace("-", "_") for spec in specs}

    @mb.program(input_specs=[mb.TensorSpec((1, 64), dtype=types.fp16)], opset_version=ct.target.iOS18)
    def program(x):
        return tuple(mb.linear(x=x, weight=emit_weight(quantize(weight, spec), names[spec]), name=f"{names[spec]}_out")
                     for spec in specs)

    lint = lint_package(_save(program, tmp_path / "formats.mlpackage"))
    devices = {weight.name: weight.device for weight in lint.weights}
    assert {spec: devices[names[spec]] == ANE for spec in specs} == {spec: parse_format(spec).ane_safe for spec in specs}


def test_rule_table_is_complete_and_sourced():
    table = load_rules()
    assert table.rules and all(rule.source.strip() and rule.reason.strip() for rule in table.rules)
    computing = EMITTED_OPS - _CONSTANT_OPS
    assert computing <= table.lists["ane_op_types"]
    assert not table.lists["ane_op_types"] & table.lists["falls_off_op_types"]


@pytest.mark.parametrize("broken, problem", [
    ('when = { colour = { in = ["red"] } }', "has no fact 'colour'"),
    ('when = { max_rank = { above = "five" } }', "needs a number"),
    ('when = { op_type = { in = ["@nowhere"] } }', "no list named 'nowhere'"),
])
def test_malformed_rule_table_is_one_line_error(tmp_path, broken, problem):
    path = tmp_path / "rules.toml"
    path.write_text(f'format = 1\ndevices = ["ane", "cpu"]\n[weight_axes]\ndefault = {{ output = -2, input = -1 }}\n'
                    f'[[rule]]\nid = "r"\ntarget = "op"\ndevice = "cpu"\nreason = "x"\nsource = "y"\n{broken}\n')
    with pytest.raises(AnepackError) as caught:
        load_rules(path)
    assert problem in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.skipif(sys.platform == "darwin", reason="off macOS only")
def test_measure_off_macos_is_one_line_error(builds):
    package = builds["lut4-grouped"] / "head_00.mlpackage"
    with pytest.raises(AnepackError) as caught:
        lint_package(package, measure=True)
    assert str(caught.value).startswith(str(package)) and "macOS" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.macos
@pytest.mark.skipif(sys.platform != "darwin", reason="MLComputePlan needs macOS 14.4+")
def test_measure_reports_core_ml_devices_beside_predictions(builds):
    document = lint_shards(builds["lut4-grouped"], measure=True)
    ops = [op for package in document["packages"] for op in package["ops"]]
    assert all(op["measured"] in {"ane", "gpu", "cpu"} for op in ops)
    assert document["measured"]["ops"] == len(ops)
    assert document["measured"]["agree"] == sum(op["measured"] == op["device"] for op in ops)


def test_cli_reports_the_verdict_and_renders_measurements(builds):
    import json

    from click.testing import CliRunner

    from anepack.cli import main
    from anepack.cli.lint_cmds import render_lint

    runner = CliRunner()
    result = runner.invoke(main, ["lint", str(builds["int4-per-block"]), "--json"])
    assert result.exit_code == 1, result.output
    document = json.loads(result.output)
    assert document["all_on_ane"] is False and document["totals"]["op_share"] < 1.0
    result = runner.invoke(main, ["lint", str(builds["lut4-grouped"])])
    assert result.exit_code == 0 and "every op and every weight is predicted on the Neural Engine" in result.output
    if sys.platform != "darwin":
        result = runner.invoke(main, ["lint", str(builds["lut4-grouped"]), "--measure"])
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1

    # The measured view, fed a plan that puts every linear on the CPU (macOS writes these fields).
    for package in document["packages"]:
        for op in package["ops"]:
            op["measured"] = "cpu" if op["op_type"] == "linear" else "ane"
    ops = [op for package in document["packages"] for op in package["ops"]]
    document["measured"] = {"ops": len(ops), "agree": sum(op["measured"] == op["device"] for op in ops),
                            "ops_on_ane": sum(op["measured"] == "ane" for op in ops), "all_on_ane": False}
    with runner.isolation() as (stdout, _, _):
        render_lint(document)
        printed = stdout.getvalue().decode()  # click 8.2 closes the stream on leaving
    assert "ops where Core ML's plan differs from the prediction" in printed
