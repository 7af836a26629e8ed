"""The residency lint: predict which device Core ML gives each op and each weight of a saved
``.mlpackage`` (Neural Engine, GPU or CPU), from a rule table kept as data.

    lint = lint_package("out/layers_00_05.mlpackage")
    lint.totals.op_share, lint.totals.byte_share, lint.fallbacks
    document = lint_shards("out/")          # every package of a build, per package and overall

The rules live in ``residency_rules.toml`` next to this module (docs/ane-chain-schema.md
explains them); this module only extracts facts and evaluates conditions, so a rule changes
without code. Facts come from the program as the interpreter parses it (``anepack.coreml.
interpreter``): each computing op's type, element types, ranks and dimensions, and for each
weight (a blob-backed ``const`` or a ``constexpr_*`` chain) how it is stored: scale blocks
along Cin, LUT element type, LUT count, vector size and axis. A weight's findings count
against every op that reads it: a linear whose weight falls back falls back.

``measure=True`` also reads Core ML's own compute plan (``MLComputePlan``, macOS 14.4+) and
reports its preferred device per op beside the prediction. Written to coremltools' documented
API; it cannot run on Linux, where anepack is developed, so it is untested here.
"""

from __future__ import annotations

import math
import sys
import tempfile
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from anepack.coreml import interpreter
from anepack.coreml.interpreter import BlobStorage, TensorType
from anepack.coreml.manifest import read_manifest
from anepack.errors import AnepackError

ANE = "ane"
RULES_RESOURCE = "residency_rules.toml"
RULES_FORMAT = 1

# The facts each rule target has; the rule table may name only these.
FACTS = {
    "op": {
        "op_type": "the MIL op type",
        "elements": "element types of the op's outputs and of its non-constant inputs",
        "max_rank": "the largest rank among the tensors the op reads or writes",
        "max_dim": "the largest dimension among the tensors the op reads or writes",
    },
    "weight": {
        "element": "element type of the weight the op reads",
        "scale_blocks_along_input": "scale blocks along Cin of a blockwise_shift_scale applied to the weight",
        "lut_element": "element type of the LUT that lut_to_dense reads",
        "lut_count": "number of LUTs in the tensor",
        "vector_size": "values per LUT entry (1 for a scalar LUT)",
        "vector_lut_values": "entries x vector size of a vector LUT",
        "vector_axis": "the weight axis a vector LUT's vectors run along: output, input or other",
    },
}

_OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    "above": lambda value, limit: value > limit,
    "in": lambda value, members: value in members,
    "not_in": lambda value, members: value not in members,
    "any_in": lambda value, members: not members.isdisjoint(value),
}
_LIST_OPERATORS = {"in", "not_in", "any_in"}

_SHIFT_SCALE = "constexpr_blockwise_shift_scale"
_LUT_TO_DENSE = "constexpr_lut_to_dense"
# How a chain's inputs relate to the weight: a shift-scale's data is the weight itself (one
# step earlier), lut_to_dense's lut is a LUT; everything else (indices, scales) is a parameter.
_INPUT_ROLES = {(_SHIFT_SCALE, "data"): "same", (_LUT_TO_DENSE, "lut"): "lut"}
_NUMPY_ELEMENTS = {
    np.dtype(np.float16): "FLOAT16", np.dtype(np.float32): "FLOAT32", np.dtype(np.int8): "INT8",
    np.dtype(np.uint8): "UINT8", np.dtype(np.int16): "INT16", np.dtype(np.uint16): "UINT16",
    np.dtype(np.int32): "INT32", np.dtype(np.bool_): "BOOL",
}


# ---------------------------------------------------------------------------------------
# The rule table


@dataclass(frozen=True)
class Condition:
    """One fact compared with an operand; a fact the target lacks (None) never matches."""

    fact: str
    operator: str
    operand: Any

    def holds(self, facts: dict[str, Any]) -> bool:
        value = facts.get(self.fact)
        return value is not None and _OPERATORS[self.operator](value, self.operand)


@dataclass(frozen=True)
class Rule:
    """A residency rule: when all its conditions hold on a target, the target is predicted on
    ``device`` for ``reason`` (documented by ``source``)."""

    id: str
    target: str
    device: str
    reason: str
    source: str
    conditions: tuple[Condition, ...]

    def fires(self, facts: dict[str, Any]) -> bool:
        return all(condition.holds(facts) for condition in self.conditions)


@dataclass(frozen=True)
class RuleTable:
    """The parsed rule table: devices from most to least preferred, the axes of a weight by the
    op that reads it, the named op lists, and the rules in file order."""

    source: str
    devices: tuple[str, ...]
    weight_axes: dict[str, tuple[int, int]]
    lists: dict[str, frozenset]
    rules: tuple[Rule, ...]

    def fired(self, target: str, facts: dict[str, Any]) -> tuple[Rule, ...]:
        return tuple(rule for rule in self.rules if rule.target == target and rule.fires(facts))

    def least_capable(self, devices: Iterable[str]) -> str:
        """The device that can run all of ``devices`` (the Neural Engine when there are none)."""
        return max(devices, key=self.devices.index, default=ANE)

    def axes(self, consumer_type: str) -> tuple[int, int]:
        """(Cout axis, Cin axis) of a weight read by an op of ``consumer_type``."""
        return self.weight_axes.get(consumer_type, self.weight_axes["default"])


def load_rules(path: str | Path | None = None) -> RuleTable:
    """The rule table at ``path``, or the built-in one; checked against ``FACTS``."""
    if path is None:
        source = f"built-in {RULES_RESOURCE}"
        text = (resources.files("anepack.coreml") / RULES_RESOURCE).read_text(encoding="utf-8")
    else:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as error:
            raise AnepackError(path, f"cannot read the rule table ({error})") from error
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise AnepackError(source, f"rule table is not valid TOML ({error})") from error
    return _parse_table(data, source)


def _parse_table(data: dict, source: str) -> RuleTable:
    def fail(problem: str) -> AnepackError:
        return AnepackError(source, problem)

    if data.get("format") != RULES_FORMAT:
        raise fail(f"rule table format {data.get('format')!r}; this anepack reads {RULES_FORMAT}")
    devices = data.get("devices")
    if not isinstance(devices, list) or not devices or devices[0] != ANE or len(set(devices)) != len(devices):
        raise fail(f"'devices' must list distinct devices, starting with '{ANE}'")
    lists = {}
    for name, entry in data.get("lists", {}).items():
        if not isinstance(entry, dict) or not entry.get("source") or not isinstance(entry.get("members"), list):
            raise fail(f"list '{name}' needs 'members' and a 'source'")
        lists[name] = frozenset(entry["members"])
    axes = {}
    for consumer, entry in data.get("weight_axes", {}).items():
        if not isinstance(entry, dict) or not all(isinstance(entry.get(key), int) for key in ("output", "input")):
            raise fail(f"weight_axes.{consumer} needs integer 'output' and 'input' axes")
        axes[consumer] = (entry["output"], entry["input"])
    if "default" not in axes:
        raise fail("weight_axes needs a 'default' entry")
    rules, seen = [], set()
    for index, entry in enumerate(data.get("rule", []), start=1):
        rule = _parse_rule(entry, index, devices, lists, fail)
        if rule.id in seen:
            raise fail(f"rule id '{rule.id}' appears twice")
        seen.add(rule.id)
        rules.append(rule)
    return RuleTable(source, tuple(devices), axes, lists, tuple(rules))


def _parse_rule(entry: Any, index: int, devices: list, lists: dict, fail) -> Rule:
    if not isinstance(entry, dict):
        raise fail(f"rule {index} is not a table")
    label = f"rule {entry.get('id', index)}"
    for key in ("id", "target", "device", "reason", "source"):
        if not isinstance(entry.get(key), str) or not entry[key].strip():
            raise fail(f"{label} needs a non-empty '{key}'")
    if entry["target"] not in FACTS:
        raise fail(f"{label}: target must be one of {', '.join(FACTS)}")
    if entry["device"] not in devices[1:]:
        raise fail(f"{label}: device must be one of {', '.join(devices[1:])}")
    when = entry.get("when")
    if not isinstance(when, dict) or not when:
        raise fail(f"{label} needs 'when' with at least one condition")
    conditions = []
    for fact, test in when.items():
        if fact not in FACTS[entry["target"]]:
            known = ", ".join(FACTS[entry["target"]])
            raise fail(f"{label}: a {entry['target']} has no fact '{fact}' (facts: {known})")
        if not isinstance(test, dict) or len(test) != 1 or next(iter(test)) not in _OPERATORS:
            raise fail(f"{label}: '{fact}' needs exactly one of {', '.join(_OPERATORS)}")
        operator, operand = next(iter(test.items()))
        if operator in _LIST_OPERATORS:
            operand = _members(operand, lists, lambda problem: fail(f"{label}: {problem}"))
        elif isinstance(operand, bool) or not isinstance(operand, (int, float)):
            raise fail(f"{label}: '{fact}' {operator} needs a number")
        conditions.append(Condition(fact, operator, operand))
    return Rule(entry["id"], entry["target"], entry["device"], entry["reason"], entry["source"], tuple(conditions))


def _members(operand: Any, lists: dict, fail) -> frozenset:
    if not isinstance(operand, list):
        raise fail("a membership test needs a list")
    members = set()
    for item in operand:
        if isinstance(item, str) and item.startswith("@"):
            if item[1:] not in lists:
                raise fail(f"no list named '{item[1:]}'")
            members |= lists[item[1:]]
        else:
            members.add(item)
    return frozenset(members)


# ---------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class Finding:
    """A rule that fired; ``weight`` names the weight it fired on when it counts against an op."""

    rule: Rule
    weight: str | None = None

    def to_dict(self) -> dict[str, Any]:
        found = {"rule": self.rule.id, "device": self.rule.device, "reason": self.rule.reason}
        return found if self.weight is None else {**found, "weight": self.weight}


@dataclass(frozen=True)
class OpLint:
    """One computing op of one function: its predicted device and why."""

    function: str
    index: int
    op_type: str
    output: str
    device: str
    findings: tuple[Finding, ...]
    weights: tuple[str, ...]
    measured: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "function": self.function, "index": self.index, "op_type": self.op_type, "output": self.output,
            "device": self.device, "measured": self.measured, "weights": list(self.weights),
            "rules": [finding.to_dict() for finding in self.findings],
        }


@dataclass(frozen=True)
class WeightLint:
    """One stored weight of a package (shared by its functions): how it is stored, its bytes in
    weight.bin, the rules it fires, and its device (that of the ops reading it)."""

    name: str
    layout: str
    shape: tuple[int | None, ...]
    bytes: int
    device: str
    findings: tuple[Finding, ...]
    consumers: tuple[tuple[str, str], ...]  # (function, op output)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "layout": self.layout, "shape": list(self.shape), "bytes": self.bytes,
            "device": self.device, "rules": [finding.to_dict() for finding in self.findings],
            "consumers": [f"{function}:{output}" for function, output in self.consumers],
        }


@dataclass(frozen=True)
class Shares:
    """How much of a package (or a build) is predicted on the Neural Engine."""

    ops: int = 0
    ops_on_ane: int = 0
    weight_bytes: int = 0
    weight_bytes_on_ane: int = 0

    @property
    def op_share(self) -> float:
        # Nothing to place is nothing off the Neural Engine.
        return self.ops_on_ane / self.ops if self.ops else 1.0

    @property
    def byte_share(self) -> float:
        return self.weight_bytes_on_ane / self.weight_bytes if self.weight_bytes else 1.0

    def __add__(self, other: "Shares") -> "Shares":
        return Shares(self.ops + other.ops, self.ops_on_ane + other.ops_on_ane,
                      self.weight_bytes + other.weight_bytes, self.weight_bytes_on_ane + other.weight_bytes_on_ane)

    def to_dict(self) -> dict[str, Any]:
        return {"ops": self.ops, "ops_on_ane": self.ops_on_ane, "op_share": self.op_share,
                "weight_bytes": self.weight_bytes, "weight_bytes_on_ane": self.weight_bytes_on_ane,
                "byte_share": self.byte_share}


@dataclass(frozen=True)
class PackageLint:
    """The lint of one ``.mlpackage``: every computing op and every weight, with the shares."""

    path: Path
    functions: tuple[str, ...]
    ops: tuple[OpLint, ...]
    weights: tuple[WeightLint, ...]
    measured: bool = False

    @property
    def totals(self) -> Shares:
        return Shares(
            ops=len(self.ops),
            ops_on_ane=sum(op.device == ANE for op in self.ops),
            weight_bytes=sum(weight.bytes for weight in self.weights),
            weight_bytes_on_ane=sum(weight.bytes for weight in self.weights if weight.device == ANE),
        )

    @property
    def fallbacks(self) -> tuple[OpLint, ...]:
        return tuple(op for op in self.ops if op.device != ANE)

    @property
    def all_on_ane(self) -> bool:
        return not self.fallbacks and all(weight.device == ANE for weight in self.weights)

    def to_dict(self) -> dict[str, Any]:
        document = {
            "package": str(self.path), "functions": list(self.functions), "totals": self.totals.to_dict(),
            "all_on_ane": self.all_on_ane, "ops": [op.to_dict() for op in self.ops],
            "weights": [weight.to_dict() for weight in self.weights],
        }
        if self.measured:
            document["measured"] = _agreement(self.ops)
        return document


def _agreement(ops: Iterable[OpLint]) -> dict[str, Any]:
    ops = list(ops)
    return {
        "ops": sum(op.measured is not None for op in ops),
        "agree": sum(op.measured == op.device for op in ops),
        "ops_on_ane": sum(op.measured == ANE for op in ops),
        "all_on_ane": all(op.measured == ANE for op in ops),
    }


# ---------------------------------------------------------------------------------------
# Facts


@dataclass
class _WeightRecord:
    """A weight as the package's functions read it, gathered before devices are known."""

    name: str
    layout: str
    shape: tuple[int | None, ...]
    bytes: int
    findings: dict[str, Finding] = field(default_factory=dict)
    consumers: list[tuple[str, str]] = field(default_factory=list)


class _Chain:
    """Walks the const/constexpr ops that make one constant: its layout text, blob bytes and facts."""

    def __init__(self, function, types: dict[str, TensorType], storages: dict[Path, BlobStorage],
                 axes: tuple[int, int]):
        self.function = function
        self.types = types
        self.storages = storages
        self.axes = axes
        self.bytes = 0
        self.constexpr = False
        self.facts: dict[str, Any] = {}

    def describe(self, binding: Any, role: str = "weight") -> str:
        if isinstance(binding, interpreter._BlobValue):
            self.bytes += self._blob_bytes(binding)
            return _type_text(binding.type)
        if not isinstance(binding, str):
            return _type_text(_literal_type(binding)) if np.ndim(binding) else repr(np.asarray(binding).item())
        operation, position = self.function.constants[binding]
        if operation.type == "const":
            value = operation.attributes["val"]
            if isinstance(value, interpreter._BlobValue):
                self.bytes += self._blob_bytes(value)
            return _type_text(operation.outputs[position][1])
        self.constexpr = True
        arguments = {parameter: bindings[0] for parameter, bindings in operation.inputs.items()}
        if role == "weight":
            self._note(operation.type, arguments, operation.outputs[position][1])
        parts = []
        for parameter, argument in sorted(arguments.items()):
            child = _INPUT_ROLES.get((operation.type, parameter), "parameter")
            parts.append(f"{parameter}={self.describe(argument, role if child == 'same' else child)}")
        return f"{operation.type.removeprefix('constexpr_')}({', '.join(parts)})"

    def _note(self, op_type: str, arguments: dict[str, Any], weight: TensorType) -> None:
        rank = len(weight.shape)
        output_axis, input_axis = (axis % rank if rank else 0 for axis in self.axes)
        if op_type == _SHIFT_SCALE:
            scale = self.type_of(arguments["scale"]).shape
            blocks = scale[input_axis] if len(scale) == rank and rank else 1
            self.facts["scale_blocks_along_input"] = max(self.facts.get("scale_blocks_along_input", 1), blocks)
        elif op_type == _LUT_TO_DENSE:
            lut = self.type_of(arguments["lut"])
            vector_size = lut.shape[-1]
            self.facts.update(lut_element=lut.element, lut_count=math.prod(lut.shape[:-2]), vector_size=vector_size)
            if vector_size > 1:
                self.facts["vector_lut_values"] = lut.shape[-2] * vector_size
                axis = self._integer(arguments.get("vector_axis", 0)) % rank
                self.facts["vector_axis"] = {output_axis: "output", input_axis: "input"}.get(axis, "other")

    def type_of(self, binding: Any) -> TensorType:
        return _binding_type(binding, self.types)

    def _integer(self, binding: Any) -> int:
        if isinstance(binding, str):
            binding = self.function.constants[binding][0].attributes["val"]
        return int(np.asarray(binding).item())

    def _blob_bytes(self, blob) -> int:
        if blob.file not in self.storages:
            self.storages[blob.file] = BlobStorage(blob.file)
        return self.storages[blob.file].info(blob.offset).nbytes


def _binding_type(binding: Any, types: dict[str, TensorType]) -> TensorType:
    """The type of an op input: a variable's declared type, a blob's, or a literal's own."""
    if isinstance(binding, str):
        return types[binding]
    if isinstance(binding, interpreter._BlobValue):
        return binding.type
    return _literal_type(binding)


def _literal_type(value: Any) -> TensorType:
    array = np.asarray(value)
    return TensorType(_NUMPY_ELEMENTS.get(array.dtype, array.dtype.name.upper()), array.shape)


def _type_text(tensor_type: TensorType) -> str:
    element = tensor_type.element.lower().replace("float", "fp")
    return f"{element}[{','.join('?' if size is None else str(size) for size in tensor_type.shape)}]"


def _parse_functions(path: Path) -> dict[str, Any]:
    # The interpreter's own parsing, without MilProgram.load's demand that every op be
    # executable: the lint must read programs holding ops the interpreter does not run.
    model_file = interpreter._root_model_file(path)
    spec = interpreter._parse_model(model_file)
    functions = {}
    for name, function_spec in spec.mlProgram.functions.items():
        try:
            functions[name] = interpreter._parse_function(name, function_spec, model_file.parent)
        except ValueError as error:
            raise AnepackError(path, f"function {name}: {error}") from error
    return functions


class _PackageLinter:
    """Evaluates one package's functions against the rule table."""

    def __init__(self, path: Path, rules: RuleTable):
        self.path = path
        self.rules = rules
        self.storages: dict[Path, BlobStorage] = {}
        self.weights: dict[tuple, _WeightRecord] = {}
        self.op_lints: list[OpLint] = []

    def lint_function(self, name: str, function) -> None:
        signature = function.signature
        types = {**signature.inputs, **signature.states}
        for operation in interpreter._all_operations(function):
            types.update(operation.outputs)
        for operation in function.operations:
            self.op_lints.append(self._lint_op(name, function, types, operation))

    def _lint_op(self, name: str, function, types: dict[str, TensorType], operation) -> OpLint:
        output = operation.outputs[0][0] if operation.outputs else f"op {operation.index}"
        shapes = [tensor_type.shape for _, tensor_type in operation.outputs]
        elements = {tensor_type.element for _, tensor_type in operation.outputs}
        findings: list[Finding] = []
        weights = []
        for parameter, bindings in operation.inputs.items():
            for binding in bindings:
                tensor_type = _binding_type(binding, types)
                shapes.append(tensor_type.shape)
                constant = not isinstance(binding, str) or binding in function.constants
                if not constant:
                    elements.add(tensor_type.element)
                else:
                    record = self._weight(function, types, binding, operation, parameter, (name, output))
                    if record is not None:
                        weights.append(record.name)
                        findings.extend(record.findings.values())
        facts = {
            "op_type": operation.type,
            "elements": frozenset(elements),
            "max_rank": max((len(shape) for shape in shapes), default=0),
            "max_dim": max((size for shape in shapes for size in shape if size is not None), default=0),
        }
        findings[:0] = [Finding(rule) for rule in self.rules.fired("op", facts)]
        device = self.rules.least_capable(finding.rule.device for finding in findings)
        return OpLint(name, operation.index, operation.type, output, device, tuple(findings), tuple(weights))

    def _weight(self, function, types, binding, operation, parameter: str, consumer: tuple[str, str]):
        chain = _Chain(function, types, self.storages, self.rules.axes(operation.type))
        layout = chain.describe(binding)
        if not chain.bytes and not chain.constexpr:
            return None  # an inline parameter (a shape, an axis, a scalar), not a stored weight
        if isinstance(binding, str):
            constant, position = function.constants[binding]
            key, weight_name = (constant.constant_key, position), binding
        else:
            key, weight_name = interpreter._literal_key(binding), f"{consumer[1]}.{parameter}"
        record = self.weights.get(key)
        if record is None:
            record = self.weights[key] = _WeightRecord(weight_name, layout, chain.type_of(binding).shape, chain.bytes)
        facts = {"element": chain.type_of(binding).element, **chain.facts}
        for rule in self.rules.fired("weight", facts):
            record.findings.setdefault(rule.id, Finding(rule, record.name))
        record.consumers.append(consumer)
        return record

    def result(self, functions: tuple[str, ...], measured: dict[tuple[str, str], str] | None) -> PackageLint:
        ops = self.op_lints
        if measured is not None:
            ops = [_with_measurement(op, measured) for op in ops]
        devices = {(op.function, op.output): op.device for op in ops}
        weights = tuple(
            WeightLint(
                name=record.name, layout=record.layout, shape=record.shape, bytes=record.bytes,
                device=self.rules.least_capable(devices[consumer] for consumer in record.consumers),
                findings=tuple(record.findings.values()), consumers=tuple(record.consumers),
            )
            for record in self.weights.values()
        )
        return PackageLint(self.path, functions, tuple(ops), weights, measured is not None)


def _with_measurement(op: OpLint, measured: dict[tuple[str, str], str]) -> OpLint:
    return OpLint(op.function, op.index, op.op_type, op.output, op.device, op.findings, op.weights,
                  measured.get((op.function, op.output), "unknown"))


# ---------------------------------------------------------------------------------------
# Entry points


def lint_package(path: str | Path, *, rules: RuleTable | None = None, measure: bool = False) -> PackageLint:
    """Predict the device of every computing op and every weight of the ``.mlpackage`` at
    ``path``; ``measure`` adds Core ML's own compute plan (macOS 14.4+ only)."""
    path = Path(path)
    rules = load_rules() if rules is None else rules
    functions = _parse_functions(path)
    linter = _PackageLinter(path, rules)
    for name, function in functions.items():
        linter.lint_function(name, function)
    measured = measure_package(path) if measure else None
    return linter.result(tuple(functions), measured)


def lint_shards(out_dir: str | Path, *, rules: RuleTable | None = None, measure: bool = False) -> dict[str, Any]:
    """Lint every package of a finished build (the shards its manifest lists), or one package
    when ``out_dir`` is an ``.mlpackage``: per package and overall, as one JSON-ready document
    whose ``all_on_ane`` is the verdict."""
    path = Path(out_dir)
    rules = load_rules() if rules is None else rules
    if measure:
        _require_compute_plan(path)
    if (path / "Manifest.json").is_file():
        packages = [path]
    else:
        packages = [path / shard.file for shard in read_manifest(path).shards]
    lints = [lint_package(package, rules=rules, measure=measure) for package in packages]
    totals = sum((lint.totals for lint in lints), Shares())
    document = {
        "path": str(path),
        "rule_table": rules.source,
        "totals": totals.to_dict(),
        "all_on_ane": all(lint.all_on_ane for lint in lints),
        "rules_fired": _rules_fired(lints),
        "packages": [lint.to_dict() for lint in lints],
    }
    if measure:
        document["measured"] = _agreement(op for lint in lints for op in lint.ops)
    return document


def _rules_fired(lints: list[PackageLint]) -> list[dict[str, Any]]:
    """Per rule that fired anywhere: how many ops and weights (and weight bytes) it sends off."""
    summary: dict[str, dict[str, Any]] = {}

    def entry(rule: Rule) -> dict[str, Any]:
        return summary.setdefault(rule.id, {
            "rule": rule.id, "device": rule.device, "reason": rule.reason, "source": rule.source,
            "ops": 0, "weights": 0, "weight_bytes": 0,
        })

    for lint in lints:
        for op in lint.ops:
            for rule in {finding.rule.id: finding.rule for finding in op.findings}.values():
                entry(rule)["ops"] += 1
        for weight in lint.weights:
            for finding in weight.findings:
                entry(finding.rule)["weights"] += 1
                entry(finding.rule)["weight_bytes"] += weight.bytes
    return list(summary.values())


def _require_compute_plan(path: Path) -> None:
    if sys.platform != "darwin":
        raise AnepackError(
            path, f"--measure reads Core ML's compute plan, which needs macOS 14.4+; this is {sys.platform}"
        )


def measure_package(path: str | Path) -> dict[tuple[str, str], str]:
    """Core ML's preferred device ("ane", "gpu", "cpu" or "unknown") per (function, first
    output) of every op, from ``MLComputePlan`` with all compute units allowed.

    Needs macOS 14.4+ and coremltools >= 8; elsewhere raises ``AnepackError``. Written to the
    documented coremltools API (``compile_model``, ``MLComputePlan.load_from_path``,
    ``get_compute_device_usage_for_mlprogram_operation``) and untested on Linux, where it
    cannot run.
    """
    path = Path(path)
    _require_compute_plan(path)
    import coremltools as ct
    from coremltools.models.compute_device import (
        MLCPUComputeDevice,
        MLGPUComputeDevice,
        MLNeuralEngineComputeDevice,
    )
    from coremltools.models.compute_plan import MLComputePlan
    from coremltools.models.utils import compile_model

    kinds = ((MLNeuralEngineComputeDevice, ANE), (MLGPUComputeDevice, "gpu"), (MLCPUComputeDevice, "cpu"))
    with tempfile.TemporaryDirectory(prefix="anepack-plan-") as scratch:
        try:
            compiled = compile_model(str(path), str(Path(scratch) / f"{path.stem}.mlmodelc"))
            plan = MLComputePlan.load_from_path(compiled, compute_units=ct.ComputeUnit.ALL)
        except Exception as error:  # Core ML reports every failure as a bare Exception
            raise AnepackError(path, f"Core ML could not load the compute plan ({error})") from error
        program = plan.model_structure.program
        if program is None:
            raise AnepackError(path, "Core ML's compute plan holds no ML program")
        devices = {}
        for name, function in program.functions.items():
            for operation in function.block.operations:
                if not operation.outputs:
                    continue
                usage = plan.get_compute_device_usage_for_mlprogram_operation(operation)
                preferred = None if usage is None else usage.preferred_compute_device
                devices[(name, operation.outputs[0].name)] = next(
                    (label for device_class, label in kinds if isinstance(preferred, device_class)), "unknown"
                )
    return devices
