"""Calibration: per-input-channel importance of every linear weight, from real activations.

Importance is llama.cpp's imatrix: the mean squared activation of each input column over the
calibration tokens. It weights both the k-means objective and linear rounding, so columns that
carry large activations get the precise codes. Statistics are saved to an ``.npz`` file keyed
by the model fingerprint and the prompts, and reused when both match.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from anepack.errors import AnepackError
from anepack.golden import Prompt
from anepack.source.fingerprint import file_fingerprint
from anepack.source.gguf_file import GGUFFile

CALIBRATION_FORMAT = 2


@dataclass
class Importance:
    """Per-tensor importance vectors ``[Cin]`` and the tokens they were measured on."""

    model_fingerprint: str
    prompts_digest: str
    tokens: int = 0
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    max_abs_hidden: float = 0.0  # largest |residual stream| value seen: sizes the fp16 scale

    def get(self, tensor: str) -> np.ndarray | None:
        return self.columns.get(tensor)

    def save(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        meta = {"format": CALIBRATION_FORMAT, "model": self.model_fingerprint,
                "prompts": self.prompts_digest, "tokens": self.tokens, "max_abs_hidden": self.max_abs_hidden}
        arrays = {f"t:{name}": values.astype(np.float32) for name, values in self.columns.items()}
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        try:
            with open(partial, "wb") as handle:
                np.savez(handle, **arrays)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Importance:
        try:
            archive = np.load(path, allow_pickle=False)
            meta = json.loads(archive["meta"].tobytes().decode())
            columns = {key[2:]: archive[key] for key in archive.files if key.startswith("t:")}
            if meta.get("format") != CALIBRATION_FORMAT:
                raise ValueError(f"format {meta.get('format')}, expected {CALIBRATION_FORMAT}")
            return cls(meta["model"], meta["prompts"], meta["tokens"], columns, meta["max_abs_hidden"])
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as err:
            raise AnepackError(path, f"not a calibration file of this anepack version ({err})") from None


def prompts_digest(prompts: Sequence[Prompt]) -> str:
    return hashlib.sha256(json.dumps([p.text for p in prompts]).encode()).hexdigest()[:16]


def collect_importance(
    gguf: GGUFFile,
    token_lists: Sequence[np.ndarray],
    digest: str,
    progress: Callable[[int], None] | None = None,
) -> Importance:
    """Run the exact reference over the token lists and average each linear's squared inputs."""
    from anepack.reference import build
    from anepack.source.weights import source_weights

    sums: dict[str, np.ndarray] = {}
    count = 0

    def observe(name: str, inputs: np.ndarray) -> None:
        squares = np.square(inputs.reshape(-1, inputs.shape[-1]), dtype=np.float64).sum(axis=0)
        sums[name] = sums.get(name, 0.0) + squares

    model = build(gguf.config, source_weights(gguf))
    model.observer = observe
    max_abs_hidden = 0.0
    for index, tokens in enumerate(token_lists):
        result = model.forward(tokens)
        max_abs_hidden = max([max_abs_hidden] + [float(np.abs(h).max()) for h in result.hidden_states])
        count += len(tokens)
        if progress is not None:
            progress(index)
    columns = {name: (total / count).astype(np.float32) for name, total in sums.items()}
    return Importance(file_fingerprint(gguf.path), digest, count, columns, max_abs_hidden)


def capture_inputs(
    gguf: GGUFFile, token_lists: Sequence[np.ndarray], names: set[str]
) -> dict[str, np.ndarray]:
    """The input rows ``X [tokens, Cin]`` each named linear sees over the token lists, for
    output-space error ``X @ W.T`` vs ``X @ Wq.T``. Stops after the last layer it needs."""
    from anepack.reference import build
    from anepack.source.weights import source_weights
    from anepack.validate.recipes import tensor_layer

    captured: dict[str, list[np.ndarray]] = {name: [] for name in names}

    def observe(name: str, inputs: np.ndarray) -> None:
        if name in captured:
            captured[name].append(inputs.reshape(-1, inputs.shape[-1]).copy())

    model = build(gguf.config, source_weights(gguf))
    model.observer = observe
    layers = [tensor_layer(name) for name in names]
    needs_head = any(layer is None for layer in layers)
    last = gguf.config.n_layers - 1 if needs_head else max(layers)
    for tokens in token_lists:
        hidden = model.embed(tokens)
        for il in range(last + 1):
            hidden = model.layer(il, hidden)
        if needs_head:
            model.final(hidden)
    return {name: np.concatenate(rows) for name, rows in captured.items()}


def load_or_collect(
    gguf: GGUFFile,
    prompts: Sequence[Prompt],
    token_lists: Sequence[np.ndarray],
    cache_path: Path,
    progress: Callable[[int], None] | None = None,
) -> Importance:
    """Reuse ``cache_path`` when it was measured on this model and these prompts; else measure."""
    digest = prompts_digest(prompts)
    if cache_path.exists():
        try:
            cached = Importance.load(cache_path)
        except AnepackError:
            cached = None  # an older or damaged cache entry is measured again
        if cached and cached.model_fingerprint == file_fingerprint(gguf.path) and cached.prompts_digest == digest:
            return cached
    importance = collect_importance(gguf, token_lists, digest, progress)
    importance.save(cache_path)
    return importance
