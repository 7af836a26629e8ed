"""Calibration: per-input-channel importance of every linear weight, from real activations.

Importance is llama.cpp's imatrix: the mean squared activation of each input column over the
calibration tokens. It weights both the k-means objective and linear rounding, so columns that
carry large activations get the precise codes. Statistics are saved to an ``.npz`` file keyed
by the model fingerprint and the prompts, and reused when both match.

The LM head also gets an importance per output row: the mean probability the exact model gives
that row's token over the calibration positions. A top-1 choice flips where the logits of likely
tokens move, so their rows get the precise LUT levels; a floor keeps every row in the objective.

An expert bank gets one importance row per expert, averaged over the tokens routed to that
expert only (the reference shows each expert's rows as ``<bank>#e<index>``). An expert no
calibration token reaches has no statistics: its row is uniform, so its clustering is unweighted,
and ``unreached`` lists it for the run record.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from anepack.atomic import atomic_output
from anepack.errors import AnepackError
from anepack.golden import Prompt
from anepack.source.fingerprint import file_fingerprint
from anepack.source.gguf_file import GGUFFile

CALIBRATION_FORMAT = 4
EXPERT_MARK = "#e"  # the reference names expert k of bank B "B#e<k>" when it shows its inputs
# A head row's weight is its token's mean probability relative to the uniform 1/vocab, plus this:
# rows the calibration text never predicts keep 1/20 of a uniform row's say. Measured on Gemma 3
# 270M with LUT6 per tensor in the default recipe: pooled top-1 0.915 -> 0.945 on the golden
# prompts, 0.895 -> 0.934 on benchmarks/held_out_prompts.jsonl (docs/quantization.md).
ROW_IMPORTANCE_FLOOR = 0.05
_PROBABILITY_CHUNK = 32  # positions whose softmax over the vocabulary is held at once


@dataclass
class Importance:
    """Importance per tensor (``[Cin]``, or ``[E, Cin]`` for an expert bank) and the tokens behind it."""

    model_fingerprint: str
    prompts_digest: str
    tokens: int = 0
    # matrix -> [Cin]; expert bank -> [E, Cin], a row of zeros where no token reached the expert
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    max_abs_hidden: float = 0.0  # largest |residual stream| value seen: sizes the fp16 scale
    expert_tokens: dict[str, np.ndarray] = field(default_factory=dict)  # bank -> [E] tokens routed
    # LM head -> [vocab]: mean probability of each row's token over the calibration positions
    output_rows: dict[str, np.ndarray] = field(default_factory=dict)

    def get(self, tensor: str) -> np.ndarray | None:
        """``[Cin]`` for a matrix, ``[E, Cin]`` for a bank (uniform rows for unreached experts)."""
        columns = self.columns.get(tensor)
        counts = self.expert_tokens.get(tensor)
        if columns is None or counts is None:
            return columns
        return np.where((counts > 0)[:, None], columns, np.float32(1.0))

    def rows(self, tensor: str) -> np.ndarray | None:
        """``[Cout]`` error weights of ``tensor``'s output rows (the LM head's), or None."""
        probability = self.output_rows.get(tensor)
        if probability is None:
            return None
        return (probability * len(probability) + ROW_IMPORTANCE_FLOOR).astype(np.float32)

    def unreached(self, bank: str) -> list[int]:
        """Experts of ``bank`` that no calibration token was routed to."""
        counts = self.expert_tokens.get(bank)
        return [] if counts is None else [int(e) for e in np.flatnonzero(counts == 0)]

    def pooled(self, bank: str) -> np.ndarray | None:
        """``[Cin]``: mean squared input over every token routed to any expert of ``bank``, the
        importance of the bank quantized as one tensor."""
        counts = self.expert_tokens.get(bank)
        if counts is None or not counts.any():
            return None
        return (counts @ self.columns[bank] / counts.sum()).astype(np.float32)

    def unreached_note(self) -> str | None:
        """One line for the run record naming every unreached expert, or None when all were reached."""
        parts = [f"{bank} {self.unreached(bank)}" for bank in sorted(self.expert_tokens) if self.unreached(bank)]
        if not parts:
            return None
        return "experts no calibration token reached (quantized unweighted): " + "; ".join(parts)

    def save(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        meta = {"format": CALIBRATION_FORMAT, "model": self.model_fingerprint,
                "prompts": self.prompts_digest, "tokens": self.tokens, "max_abs_hidden": self.max_abs_hidden}
        arrays = {f"t:{name}": values.astype(np.float32) for name, values in self.columns.items()}
        arrays |= {f"n:{name}": counts.astype(np.int64) for name, counts in self.expert_tokens.items()}
        arrays |= {f"r:{name}": rows.astype(np.float32) for name, rows in self.output_rows.items()}
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as partial, open(partial, "wb") as handle:
            np.savez(handle, **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Importance:
        try:
            archive = np.load(path, allow_pickle=False)
            meta = json.loads(archive["meta"].tobytes().decode())
            columns = {key[2:]: archive[key] for key in archive.files if key.startswith("t:")}
            counts = {key[2:]: archive[key] for key in archive.files if key.startswith("n:")}
            rows = {key[2:]: archive[key] for key in archive.files if key.startswith("r:")}
            if meta.get("format") != CALIBRATION_FORMAT:
                raise ValueError(f"format {meta.get('format')}, expected {CALIBRATION_FORMAT}")
            return cls(meta["model"], meta["prompts"], meta["tokens"], columns, meta["max_abs_hidden"], counts, rows)
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as err:
            raise AnepackError(path, f"not a calibration file of this anepack version ({err})") from None


def prompts_digest(prompts: Sequence[Prompt]) -> str:
    return hashlib.sha256(json.dumps([p.text for p in prompts]).encode()).hexdigest()[:16]


def collect_importance(
    gguf: GGUFFile,
    token_lists: Sequence[np.ndarray],
    digest: str,
) -> Importance:
    """Run the exact reference over the token lists and average each linear's squared inputs.

    A matrix averages over every token; each expert of a bank over the tokens routed to it.
    """
    from anepack.reference import build
    from anepack.source.weights import LM_HEAD, source_weights

    sums: dict[str, np.ndarray] = {}
    bank_sums: dict[str, np.ndarray] = {}
    bank_counts: dict[str, np.ndarray] = {}

    def observe(name: str, inputs: np.ndarray) -> None:
        rows = inputs.reshape(-1, inputs.shape[-1])
        squares = np.square(rows, dtype=np.float64).sum(axis=0)
        bank, mark, index = name.rpartition(EXPERT_MARK)
        if not mark:
            sums[name] = sums.get(name, 0.0) + squares
            return
        if bank not in bank_sums:
            n_experts = gguf.info(bank).shape[0]
            bank_sums[bank] = np.zeros((n_experts, rows.shape[1]))
            bank_counts[bank] = np.zeros(n_experts, dtype=np.int64)
        bank_sums[bank][int(index)] += squares
        bank_counts[bank][int(index)] += rows.shape[0]

    model = build(gguf.config, source_weights(gguf))
    model.observer = observe
    # Layer by layer over all prompts: an MoE layer reads each routed expert once for all of them.
    prompts = model.embed_many(list(token_lists))
    max_abs_hidden = 0.0
    for il in range(gguf.config.n_layers):
        prompts = model.layer_many(il, prompts)
        max_abs_hidden = max([max_abs_hidden] + [float(np.abs(hidden).max()) for hidden in prompts.hidden])
    logits = model.final(np.concatenate(prompts.hidden))  # the observer sees the LM head's inputs
    count = sum(len(tokens) for tokens in token_lists)
    output_rows = {LM_HEAD: mean_probability(logits)}
    del logits
    columns = {name: (total / count).astype(np.float32) for name, total in sums.items()}
    for bank, total in bank_sums.items():
        counts = bank_counts[bank]
        columns[bank] = (total / np.maximum(counts, 1)[:, None]).astype(np.float32)
    return Importance(file_fingerprint(gguf.path), digest, count, columns, max_abs_hidden, bank_counts, output_rows)


def mean_probability(logits: np.ndarray) -> np.ndarray:
    """``[vocab]``: each token's softmax probability averaged over the positions of ``[T, vocab]``
    logits, a few positions at a time (one float64 copy of all of them would be gigabytes)."""
    total = np.zeros(logits.shape[1], dtype=np.float64)
    for start in range(0, len(logits), _PROBABILITY_CHUNK):
        chunk = logits[start : start + _PROBABILITY_CHUNK].astype(np.float64)
        chunk = np.exp(chunk - chunk.max(axis=1, keepdims=True))
        total += (chunk / chunk.sum(axis=1, keepdims=True)).sum(axis=0)
    return (total / len(logits)).astype(np.float32)


def capture_inputs(
    gguf: GGUFFile, token_lists: Sequence[np.ndarray], names: set[str]
) -> dict[str, np.ndarray]:
    """The input rows ``X [tokens, Cin]`` each named linear sees over the token lists, for
    output-space error ``X @ W.T`` vs ``X @ Wq.T``; for an expert bank, one such array per
    expert (the rows routed to it, possibly none); nothing for a tensor no linear reads. Stops
    after the last layer it needs."""
    from anepack.reference import build
    from anepack.source.weights import source_weights
    from anepack.validate.recipes import tensor_layer

    captured: dict[str, list[np.ndarray]] = {name: [] for name in names}
    banks = {name: gguf.info(name).shape for name in names if name in gguf.tensors and len(gguf.info(name).shape) == 3}
    routed: dict[str, dict[int, list[np.ndarray]]] = {bank: {} for bank in banks}

    def observe(name: str, inputs: np.ndarray) -> None:
        rows = inputs.reshape(-1, inputs.shape[-1])
        bank, _, expert = name.partition("#e")
        if expert and bank in routed:
            routed[bank].setdefault(int(expert), []).append(rows.copy())
        elif name in captured:
            captured[name].append(rows.copy())

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
    # A tensor no linear reads (an embedding table, which is gathered) gets no entry.
    inputs = {name: np.concatenate(rows) for name, rows in captured.items() if rows and name not in banks}
    for bank, (n_expert, _, n_in) in banks.items():
        inputs[bank] = [np.concatenate(routed[bank][e]) if e in routed[bank] else np.zeros((0, n_in), np.float32)
                        for e in range(n_expert)]
    return inputs


def load_or_collect(
    gguf: GGUFFile,
    prompts: Sequence[Prompt],
    token_lists: Sequence[np.ndarray],
    cache_path: Path,
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
    importance = collect_importance(gguf, token_lists, digest)
    importance.save(cache_path)
    return importance
