"""manifest.json: what a shard directory holds and how it was made, written last and atomically.

The manifest is the build's certificate of completion: a directory without one is an
unfinished build. It records the source model's fingerprint, anepack's version, the recipe,
each weight's format and bits, the residual-stream scale alpha, every shard with its
functions' inputs and outputs, its size and content hash, and validation results.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from anepack.atomic import atomic_write_bytes
from anepack.errors import AnepackError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a shard function: name, shape, element type."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float16"


@dataclass(frozen=True)
class FunctionSpec:
    """A function of a shard (``prefill`` or ``decode``) with its inputs and outputs in order."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class ShardEntry:
    """One file of the build.

    ``kind`` is ``layers`` (``layers`` lists the transformer layers it runs), ``head`` (final
    norm and the LM head rows ``vocab[0]:vocab[1]``), ``experts`` (experts ``experts[0] ..
    experts[1] - 1`` of MoE layer ``layers[0]``, one function per expert and token count) or
    ``embeddings`` (the host table).
    ``build_key`` hashes everything the file was made from; a rebuild with the same key
    is skipped.
    """

    file: str
    kind: str
    bytes: int
    sha256: str
    build_key: str
    layers: tuple[int, ...] = ()
    vocab: tuple[int, int] | None = None
    tensors: tuple[str, ...] = ()
    functions: dict[str, FunctionSpec] = field(default_factory=dict)
    experts: tuple[int, int] | None = None


@dataclass(frozen=True)
class WeightFormat:
    """How one weight is stored: its format spec, exact bits per weight, shape."""

    format: str
    bits_per_weight: float
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Manifest:
    format: int
    anepack_version: str
    architecture: str
    source_file: str
    source_fingerprint: str
    recipe_name: str
    recipe_toml: str
    alpha: float
    chunk: int
    context: int
    max_shard_mb: float
    embeddings: ShardEntry
    shards: tuple[ShardEntry, ...]
    weights: dict[str, WeightFormat]
    validation: dict[str, Any] = field(default_factory=dict)
    # What the host computes with besides config.json: Gemma 4's proportional-RoPE factors and,
    # per MoE layer, the ffn_down_exps.scale factor of each expert (applied in float32).
    rope_freqs: tuple[float, ...] | None = None
    expert_down_scales: dict[int, tuple[float, ...]] = field(default_factory=dict)
    # Gemma 4 E2B/E4B: the host table of per-layer token embeddings.
    per_layer_embeddings: ShardEntry | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"


def write_manifest(manifest: Manifest, out_dir: Path) -> Path:
    """Write ``out_dir/manifest.json`` atomically (the last step of a build)."""
    path = Path(out_dir) / MANIFEST_NAME
    atomic_write_bytes(path, manifest.to_json().encode())
    return path


def _tensor_specs(items: list[dict]) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(item["name"], tuple(item["shape"]), item["dtype"]) for item in items)


def _entry(data: dict) -> ShardEntry:
    return ShardEntry(
        file=data["file"],
        kind=data["kind"],
        bytes=data["bytes"],
        sha256=data["sha256"],
        build_key=data["build_key"],
        layers=tuple(data["layers"]),
        vocab=None if data["vocab"] is None else tuple(data["vocab"]),
        tensors=tuple(data["tensors"]),
        experts=None if data.get("experts") is None else tuple(data["experts"]),
        functions={
            name: FunctionSpec(_tensor_specs(spec["inputs"]), _tensor_specs(spec["outputs"]))
            for name, spec in data["functions"].items()
        },
    )


def read_manifest(out_dir: Path) -> Manifest:
    """The manifest of a finished build in ``out_dir``."""
    path = Path(out_dir) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AnepackError(path, "no manifest: the directory holds no finished build") from None
    except (OSError, ValueError) as err:
        raise AnepackError(path, f"unreadable manifest ({err})") from None
    if data.get("format") != MANIFEST_FORMAT:
        raise AnepackError(path, f"manifest format {data.get('format')!r}; this anepack reads {MANIFEST_FORMAT}")
    try:
        return Manifest(
            **{key: data[key] for key in (
                "format", "anepack_version", "architecture", "source_file", "source_fingerprint",
                "recipe_name", "recipe_toml", "alpha", "chunk", "context", "max_shard_mb", "validation",
            )},
            embeddings=_entry(data["embeddings"]),
            shards=tuple(_entry(item) for item in data["shards"]),
            weights={
                name: WeightFormat(item["format"], item["bits_per_weight"], tuple(item["shape"]))
                for name, item in data["weights"].items()
            },
            rope_freqs=None if data.get("rope_freqs") is None else tuple(data["rope_freqs"]),
            expert_down_scales={
                int(layer): tuple(scales) for layer, scales in data.get("expert_down_scales", {}).items()
            },
            per_layer_embeddings=None if data.get("per_layer_embeddings") is None
            else _entry(data["per_layer_embeddings"]),
        )
    except (KeyError, TypeError) as err:
        raise AnepackError(path, f"manifest is missing or mistypes {err}") from None
