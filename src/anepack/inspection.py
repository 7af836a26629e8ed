"""What a GGUF holds: hyperparameters, parameter counts by tensor kind, storage types, and
per-tensor outlier statistics that predict how linear quantization will fare.

Statistics stream over row chunks, so the 262,144-row embedding of Gemma 3 never has to be
dequantized at once: memory stays near one chunk whatever the tensor's size.
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from anepack.source.gguf_file import GGUFFile

CHUNK_ELEMENTS = 1 << 22  # about 16 MB of float32 per chunk
_LAYER_PREFIX = re.compile(r"^blk\.\d+\.")
INT8_LEVELS = 127  # Core ML symmetric int8 range [-127, 127]


def tensor_kind(name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``attn_q.weight``; global tensors keep their name."""
    return _LAYER_PREFIX.sub("", name)


@dataclass(frozen=True)
class OutlierStats:
    """How heavy-tailed a weight is, and what INT8 per-tensor vs per-channel would give it."""

    max_abs_over_std: float
    excess_kurtosis: float
    int8_tensor_sqnr_db: float
    int8_channel_sqnr_db: float


CACHE_ELEMENTS = 1 << 26  # tensors up to 256 MB of float32 are dequantized once, not twice


def _chunks(gguf: GGUFFile, name: str):
    info = gguf.info(name)
    n_rows = info.n_elements // info.shape[-1]
    step = max(1, CHUNK_ELEMENTS // info.shape[-1])
    for start in range(0, n_rows, step):
        yield gguf.rows(name, start, start + step)


def _int8_error_energy(rows: np.ndarray, scale: np.ndarray) -> float:
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
    quantized = np.clip(np.rint(rows / safe), -INT8_LEVELS, INT8_LEVELS) * safe
    error = rows - quantized
    return float(np.sum(error * error, dtype=np.float64))


def outlier_stats(gguf: GGUFFile, name: str) -> OutlierStats:
    """Outlier statistics of one tensor, in two passes over float32 row chunks.

    Elementwise work is float32 (the weights' own precision); sums accumulate in float64.
    """
    cached = [] if gguf.info(name).n_elements <= CACHE_ELEMENTS else None
    n = 0
    sums = np.zeros(4)
    row_max_parts = []
    for rows in _chunks(gguf, name):
        if cached is not None:
            cached.append(rows)
        squares = rows * rows
        n += rows.size
        sums += [
            rows.sum(dtype=np.float64),
            squares.sum(dtype=np.float64),
            (squares * rows).sum(dtype=np.float64),
            (squares * squares).sum(dtype=np.float64),
        ]
        row_max_parts.append(np.abs(rows).max(axis=-1))
    row_max = np.concatenate(row_max_parts)
    global_max = float(row_max.max())
    mean, m2, m3, m4 = sums / n
    variance = m2 - mean**2
    central4 = m4 - 4 * mean * m3 + 6 * mean**2 * m2 - 3 * mean**4
    std = float(np.sqrt(max(variance, 0.0)))

    tensor_noise = channel_noise = 0.0
    row = 0
    for rows in cached if cached is not None else _chunks(gguf, name):
        tensor_noise += _int8_error_energy(rows, np.full((len(rows), 1), global_max / INT8_LEVELS))
        channel_noise += _int8_error_energy(rows, row_max[row : row + len(rows), None] / INT8_LEVELS)
        row += len(rows)

    def db(noise: float) -> float:
        return float("inf") if noise == 0 else float(10 * np.log10(sums[1] / noise))

    return OutlierStats(
        max_abs_over_std=global_max / std if std > 0 else 0.0,
        excess_kurtosis=float(central4 / variance**2 - 3) if variance > 0 else 0.0,
        int8_tensor_sqnr_db=db(tensor_noise),
        int8_channel_sqnr_db=db(channel_noise),
    )


def inspect_model(
    gguf: GGUFFile, with_stats: bool = True, progress: Callable[[str], None] | None = None
) -> dict:
    """A JSON-ready description of the model; see the ``inspect`` command."""
    config = gguf.config
    kinds: dict[str, dict] = defaultdict(lambda: {"tensors": 0, "parameters": 0, "bytes": 0, "types": set()})
    types: dict[str, dict] = defaultdict(lambda: {"tensors": 0, "parameters": 0, "bytes": 0})
    tensors = []
    for info in gguf.tensors.values():
        kind = kinds[tensor_kind(info.name)]
        kind["tensors"] += 1
        kind["parameters"] += info.n_elements
        kind["bytes"] += info.nbytes
        kind["types"].add(info.type_name)
        by_type = types[info.type_name]
        by_type["tensors"] += 1
        by_type["parameters"] += info.n_elements
        by_type["bytes"] += info.nbytes
        entry = {"name": info.name, "shape": list(info.shape), "type": info.type_name, "bytes": info.nbytes}
        if with_stats and len(info.shape) >= 2:
            if progress is not None:
                progress(info.name)
            entry |= dataclasses.asdict(outlier_stats(gguf, info.name))
        tensors.append(entry)
    return {
        "file": str(gguf.path),
        "architecture": config.architecture,
        "hyperparameters": dataclasses.asdict(config),
        "parameters": sum(k["parameters"] for k in kinds.values()),
        "bytes": sum(k["bytes"] for k in kinds.values()),
        "by_kind": {name: {**k, "types": sorted(k["types"])} for name, k in sorted(kinds.items())},
        "by_type": dict(sorted(types.items())),
        "tensors": tensors,
    }
