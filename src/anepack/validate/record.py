"""The run record: what every validation, gate and conversion writes to the run history.

A record is a plain JSON-serializable dict (the ``RunRecord`` TypedDict below), so it can be
stored, diffed and rendered without importing the code that produced it. Validators start
one with ``new_record`` (versions, time and model fingerprint filled in), append per-layer,
per-prompt and per-tensor results, set ``passed``, and hand it to ``RunStore.add``.
"""

from __future__ import annotations

import math
import os
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypedDict

import numpy as np

from anepack import __version__
from anepack.source.fingerprint import file_fingerprint
from anepack.validate.recipes import tensor_layer

if TYPE_CHECKING:
    from anepack.validate.recipes import Recipe

RunKind = Literal["layers", "golden", "gate", "convert"]
KINDS: tuple[str, ...] = ("layers", "golden", "gate", "convert")


class RecipeRef(TypedDict):
    name: str
    toml: str


class Thresholds(TypedDict):
    min_layer_cosine: float
    min_logit_cosine: float
    min_top1: float


class Blame(TypedDict):
    """One tensor's part in a layer's error: its cosine quantized alone and its share of the loss."""

    tensor: str
    format: str
    bits_per_weight: float
    min_cosine: float
    share: float


class LayerResult(TypedDict):
    """Hidden-state cosine after one layer; ``None`` where a validator did not measure it."""

    layer: int
    isolated_min: float | None
    isolated_mean: float | None
    cumulative_min: float | None
    cumulative_mean: float | None
    passed: bool
    blame: list[Blame]


class PromptResult(TypedDict):
    name: str
    tokens: int
    min_cosine: float
    mean_cosine: float
    max_kl: float
    mean_kl: float
    top1_agreement: float
    first_failing_position: int | None
    passed: bool
    cosine_per_position: list[float]
    kl_per_position: list[float]


class TensorBits(TypedDict):
    name: str
    layer: int | None
    kind: str
    format: str
    bits_per_weight: float
    parameters: int


class BitsSummary(TypedDict, total=False):
    layers_average: float
    lm_head: float
    shipped_average: float
    embedding_host: float


class RunRecord(TypedDict):
    kind: RunKind
    created: str
    model: str | None
    fingerprint: str | None
    recipe: RecipeRef | None
    versions: dict[str, str | None]
    timings: dict[str, float]
    thresholds: Thresholds
    passed: bool
    layers: list[LayerResult]
    prompts: list[PromptResult]
    tensors: list[TensorBits]
    bits: BitsSummary
    forced: bool
    notes: list[str]


DEFAULT_THRESHOLDS: Thresholds = {"min_layer_cosine": 0.97, "min_logit_cosine": 0.97, "min_top1": 0.90}
_REQUIRED = tuple(RunRecord.__annotations__)
_LISTS = ("layers", "prompts", "tensors", "notes")


def versions() -> dict[str, str | None]:
    """Versions of anepack and the libraries whose behaviour a result depends on."""

    def installed(distribution: str) -> str | None:
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            return None

    return {
        "anepack": __version__,
        "numpy": np.__version__,
        "coremltools": installed("coremltools"),
        "gguf": installed("gguf"),
        "llama_cpp_python": installed("llama_cpp_python"),
        "python": platform.python_version(),
    }


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_created(text: str) -> datetime:
    """An ISO 8601 time as an aware UTC datetime; a time without a zone is taken as UTC."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def new_record(
    kind: RunKind,
    model: str | os.PathLike[str] | None = None,
    recipe: Recipe | None = None,
    thresholds: Thresholds | None = None,
) -> RunRecord:
    """An empty, failing record of ``kind``: fill in results, then set ``passed``."""
    if kind not in KINDS:
        raise ValueError(f"run kind {kind!r} is not one of {KINDS}")
    return {
        "kind": kind,
        "created": utc_now(),
        "model": None if model is None else str(model),
        "fingerprint": None if model is None else file_fingerprint(model),
        "recipe": None if recipe is None else {"name": recipe.name, "toml": recipe.text or recipe.to_toml()},
        "versions": versions(),
        "timings": {},
        "thresholds": dict(thresholds or DEFAULT_THRESHOLDS),
        "passed": False,
        "layers": [],
        "prompts": [],
        "tensors": [],
        "bits": {},
        "forced": False,
        "notes": [],
    }


def tensor_entry(name: str, format_spec: str, bits_per_weight: float, parameters: int) -> TensorBits:
    """A ``tensors`` row; layer and kind come from the GGUF name (``blk.3.attn_q.weight``)."""
    layer = tensor_layer(name)
    kind = name if layer is None else name.split(".", 2)[2]
    return {"name": name, "layer": layer, "kind": kind, "format": format_spec,
            "bits_per_weight": float(bits_per_weight), "parameters": int(parameters)}


def plain(value: Any) -> Any:
    """``value`` with numpy scalars and arrays turned into Python numbers and lists."""
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, np.ndarray):
        return plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def checked(record: RunRecord) -> RunRecord:
    """A plain-Python copy of ``record`` after checking its shape; raises ValueError if malformed.

    A malformed record is a bug in the validator that built it, not a user error.
    """
    if not isinstance(record, dict):
        raise ValueError(f"a run record is a dict, not {type(record).__name__}")
    missing = [key for key in _REQUIRED if key not in record and key != "created"]
    if missing:
        raise ValueError(f"run record lacks {', '.join(missing)}")
    if record["kind"] not in KINDS:
        raise ValueError(f"run kind {record['kind']!r} is not one of {KINDS}")
    for key in _LISTS:
        if not isinstance(record[key], (list, tuple)):
            raise ValueError(f"run record field {key!r} must be a list")
    copy = plain(record)
    copy.setdefault("created", utc_now())
    parse_created(copy["created"])
    copy["passed"] = bool(copy["passed"])
    copy["forced"] = bool(copy["forced"])
    return copy


def _lowest(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    # NaN (an fp16 overflow upstream) must win the minimum, which min() does not guarantee.
    if any(isinstance(v, float) and math.isnan(v) for v in present):
        return math.nan
    return min(present) if present else None


def summarize(record: RunRecord) -> dict[str, float | None]:
    """The headline numbers of a run: the worst layer, the worst prompt, the bits shipped.

    ``min_layer_cosine`` is the lowest of every layer's isolated and cumulative minimum;
    ``min_logit_cosine`` and ``min_top1`` are the worst prompt's; ``bits`` is the shipped
    average (the layers' average when the record has no shipped figure).
    """
    layers, prompts, bits = record["layers"], record["prompts"], record["bits"]
    return {
        "min_layer_cosine": _lowest([layer.get(key) for layer in layers for key in ("isolated_min", "cumulative_min")]),
        "min_logit_cosine": _lowest([p["min_cosine"] for p in prompts]),
        "min_top1": _lowest([p["top1_agreement"] for p in prompts]),
        "bits": bits.get("shipped_average", bits.get("layers_average")),
    }
