"""What a GGUF holds: hyperparameters, parameter counts by tensor kind, storage types, and
per-tensor outlier statistics that predict how linear quantization will fare.
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from collections.abc import Callable

from anepack.quant.metrics import outlier_stats as quant_outlier_stats
from anepack.source.gguf_file import GGUFFile

_LAYER_PREFIX = re.compile(r"^blk\.\d+\.")


def tensor_kind(name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``attn_q.weight``; global tensors keep their name."""
    return _LAYER_PREFIX.sub("", name)


_STAT_KEYS = ("max_abs_over_std", "excess_kurtosis", "int8_tensor_sqnr_db", "int8_channel_sqnr_db")


def outlier_stats(gguf: GGUFFile, name: str) -> dict[str, float]:
    """How heavy-tailed a weight is, and the weight SQNR INT8 per-tensor and per-channel would give."""
    stats = quant_outlier_stats(gguf.tensor(name))
    return {key: stats[key] for key in _STAT_KEYS}


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
            entry |= outlier_stats(gguf, info.name)
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
