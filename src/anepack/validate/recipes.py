"""Recipes: which Core ML weight format each tensor gets, as a small TOML file.

A recipe is a name, a description and an ordered list of rules. Each rule matches tensor
names with a shell-style pattern and, optionally, a set of layers; the first matching rule
gives the format. Weights no rule matches stay float16. The LM head is addressed as
``output.weight`` even when the model ties it to the embedding table, because the head is
shipped in a shard while the embedding table stays on the host.

    name = "lut4-grouped"
    description = "4-bit palettization, one 16-entry LUT per 16 output channels"
    [[rule]]
    tensors = "blk.*.weight"
    layers = "0-5,17"        # optional
    format = "lut4-g16"
"""

from __future__ import annotations

import fnmatch
import os
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from anepack.errors import AnepackError
from anepack.quant.formats import Format, parse_format
from anepack.source.weights import LM_HEAD

_LAYER = re.compile(r"^blk\.(\d+)\.")
RECIPE_KEYS = ("name", "description", "rule")
RULE_KEYS = ("tensors", "layers", "format")


def tensor_layer(name: str) -> int | None:
    match = _LAYER.match(name)
    return int(match.group(1)) if match else None


def parse_layers(text: str, source: str | Path | None = None) -> frozenset[int]:
    """``"0-5,17"`` -> {0, 1, 2, 3, 4, 5, 17}."""
    layers: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise AnepackError(source, f"layer range {part!r} is not N or N-M")
        low, high = int(match.group(1)), int(match.group(2) or match.group(1))
        if high < low:
            raise AnepackError(source, f"layer range {part!r} runs backwards")
        layers.update(range(low, high + 1))
    return frozenset(layers)


@dataclass(frozen=True)
class Rule:
    tensors: str
    format: Format
    layers: frozenset[int] | None = None

    def matches(self, name: str) -> bool:
        if not fnmatch.fnmatchcase(name, self.tensors):
            return False
        if self.layers is None:
            return True
        layer = tensor_layer(name)
        return layer is not None and layer in self.layers


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    rules: tuple[Rule, ...]
    text: str = field(default="", compare=False)  # the TOML it came from, for run records

    def format_for(self, tensor: str) -> Format:
        for rule in self.rules:
            if rule.matches(tensor):
                return rule.format
        return parse_format("fp16")

    def unmatched(self, tensors: list[str]) -> list[str]:
        """The ``tensors`` no rule names (they stay float16 without the recipe saying so)."""
        return [tensor for tensor in tensors if not any(rule.matches(tensor) for rule in self.rules)]

    def with_overrides(self, overrides: dict[str, Format], name: str | None = None) -> Recipe:
        """This recipe with exact-name rules in front (used by blame and search)."""
        extra = tuple(Rule(tensor, fmt) for tensor, fmt in overrides.items())
        return Recipe(name or self.name, self.description, extra + self.rules)

    def to_toml(self) -> str:
        lines = [f"name = {_quote(self.name)}", f"description = {_quote(self.description)}"]
        for rule in self.rules:
            lines += ["", "[[rule]]", f"tensors = {_quote(rule.tensors)}"]
            if rule.layers is not None:
                lines.append(f"layers = {_quote(_format_layers(rule.layers))}")
            lines.append(f"format = {_quote(rule.format.spec)}")
        return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _format_layers(layers: frozenset[int]) -> str:
    ordered, runs = sorted(layers), []
    for layer in ordered:
        if runs and layer == runs[-1][1] + 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def parse_recipe(text: str, source: str | Path | None = None) -> Recipe:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise AnepackError(source, f"not valid TOML ({err})") from None
    # A misspelt key would otherwise leave its tensors in float16 without a word.
    _refuse_unknown_keys(data, RECIPE_KEYS, "the recipe", source)
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise AnepackError(source, "recipe needs a string 'name'")
    items = data.get("rule", [])
    if not isinstance(items, list) or not items:
        raise AnepackError(source, "recipe has no [[rule]] tables (a rule with format = \"fp16\" keeps tensors float16)")
    rules = []
    for index, item in enumerate(items, start=1):
        if not isinstance(item, dict) or not isinstance(item.get("tensors"), str) or "format" not in item:
            raise AnepackError(source, f"rule {index} needs 'tensors' (a pattern) and 'format'")
        _refuse_unknown_keys(item, RULE_KEYS, f"rule {index}", source)
        try:
            fmt = parse_format(str(item["format"]))
        except AnepackError as err:
            raise AnepackError(source, f"rule {index}: {err.problem}") from None
        layers = parse_layers(item["layers"], source) if "layers" in item else None
        rules.append(Rule(item["tensors"], fmt, layers))
    return Recipe(name, str(data.get("description", "")), tuple(rules), text)


def _refuse_unknown_keys(table: dict, known: tuple[str, ...], where: str, source: str | Path | None) -> None:
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise AnepackError(source, f"{where} has unknown keys {', '.join(map(repr, unknown))} (known: {', '.join(known)})")


def builtin_recipe_names() -> list[str]:
    folder = resources.files("anepack") / "data" / "recipes"
    return sorted(entry.name[:-5] for entry in folder.iterdir() if entry.name.endswith(".toml"))


def load_recipe(name_or_path: str | os.PathLike[str]) -> Recipe:
    """A built-in recipe by name, or a recipe TOML file by path."""
    text_name = str(name_or_path)
    if text_name in builtin_recipe_names():
        resource = resources.files("anepack") / "data" / "recipes" / f"{text_name}.toml"
        return parse_recipe(resource.read_text(encoding="utf-8"), f"built-in recipe {text_name}")
    path = Path(name_or_path)
    if not path.is_file():
        raise AnepackError(path, f"no such recipe file or built-in recipe (built-ins: {', '.join(builtin_recipe_names())})")
    return parse_recipe(path.read_text(encoding="utf-8"), path)
