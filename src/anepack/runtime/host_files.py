"""What the host needs beside the shards, stored in the shard directory: the model's config and
its vocabulary, so a shard directory runs (and tokenizes) without the source GGUF.

    write_host_files(gguf, out_dir)   # before build_shards, so manifest.json is still written last
    config = read_config(out_dir)     # the typed config: RoPE tables and masks come from it
    Tokenizer(tokenizer_path(out_dir))

``config.json`` is the typed ``ModelConfig`` as JSON. ``tokenizer.gguf`` is the source GGUF's
header and metadata section copied byte for byte, with a tensor count of zero: every key
llama.cpp's tokenizer reads (vocabulary, scores, merges, special ids, pre-tokenizer) is there
exactly as the source has it, at a few MB instead of the whole model.
"""

from __future__ import annotations

import json
import mmap
import struct
import typing
from dataclasses import asdict
from pathlib import Path

from gguf import GGUFValueType

from anepack.atomic import atomic_write_bytes
from anepack.errors import AnepackError
from anepack.source.config import ModelConfig
from anepack.source.gguf_file import GGUFFile

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.gguf"
_HEADER = struct.Struct("<4sIQQ")  # magic, version, tensor count, metadata count
_SCALAR_BYTES = {
    GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.BOOL: 1,
    GGUFValueType.UINT16: 2, GGUFValueType.INT16: 2,
    GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4, GGUFValueType.FLOAT32: 4,
    GGUFValueType.UINT64: 8, GGUFValueType.INT64: 8, GGUFValueType.FLOAT64: 8,
}
_CONFIG_CLASSES = {cls.architecture: cls for cls in typing.get_args(ModelConfig)}


def write_host_files(gguf: GGUFFile, out_dir: str | Path) -> list[Path]:
    """Write ``config.json`` and ``tokenizer.gguf`` for ``gguf`` into ``out_dir`` (atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = gguf.config
    document = {"architecture": config.architecture, "config": asdict(config)}
    config_path, tokenizer = out / CONFIG_FILE, out / TOKENIZER_FILE
    atomic_write_bytes(config_path, (json.dumps(document, indent=2, sort_keys=True) + "\n").encode())
    atomic_write_bytes(tokenizer, _metadata_only(gguf.path))
    return [config_path, tokenizer]


def read_config(out_dir: str | Path) -> ModelConfig:
    """The model config stored by ``write_host_files``."""
    path = Path(out_dir) / CONFIG_FILE
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AnepackError(
            path, "missing: the build did not store the model config (anepack convert writes it)"
        ) from None
    except (OSError, ValueError) as err:
        raise AnepackError(path, f"unreadable model config ({err})") from None
    cls = _CONFIG_CLASSES.get(document.get("architecture")) if isinstance(document, dict) else None
    if cls is None or not isinstance(document.get("config"), dict):
        raise AnepackError(path, "not a model config: needs a known 'architecture' and a 'config' object")
    # JSON has no tuples; the configs' sequence fields are tuples.
    fields = {key: tuple(value) if isinstance(value, list) else value for key, value in document["config"].items()}
    try:
        return cls(**fields)
    except TypeError as err:
        raise AnepackError(path, f"does not match the {cls.architecture} config ({err})") from None


def tokenizer_path(out_dir: str | Path) -> Path:
    """``tokenizer.gguf`` in ``out_dir``, or a one-line error when the build did not store it."""
    path = Path(out_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise AnepackError(path, "missing: the build did not store the vocabulary (anepack convert writes it)")
    return path


def _metadata_only(source: Path) -> bytes:
    """The GGUF at ``source`` cut after its metadata, with its tensor count set to zero."""
    with open(source, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        magic, version, _, n_kv = _HEADER.unpack_from(data, 0)
        position = _HEADER.size
        for _ in range(n_kv):
            position = _skip_string(data, position)  # the key
            (value_type,) = struct.unpack_from("<I", data, position)
            position = _skip_value(data, position + 4, value_type)
        return _HEADER.pack(magic, version, 0, n_kv) + data[_HEADER.size:position]


def _skip_string(data: mmap.mmap, position: int) -> int:
    (length,) = struct.unpack_from("<Q", data, position)
    return position + 8 + length


def _skip_value(data: mmap.mmap, position: int, value_type: int) -> int:
    # The source was already parsed by GGUFFile, so the layout is known to be well formed.
    if value_type == GGUFValueType.STRING:
        return _skip_string(data, position)
    if value_type == GGUFValueType.ARRAY:
        element_type, count = struct.unpack_from("<IQ", data, position)
        position += 12
        if element_type in _SCALAR_BYTES:
            return position + count * _SCALAR_BYTES[element_type]
        for _ in range(count):
            position = _skip_value(data, position, element_type)
        return position
    return position + _SCALAR_BYTES[value_type]
