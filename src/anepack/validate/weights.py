"""A recipe's weights for the reference: each tensor in its recipe format, dequantized as Core ML does.

Expert banks (``*_exps.weight``, ``[E, Cout, Cin]``) are quantized expert by expert, each with
its own scales or LUTs and its own importance row, except in a format with one scale or LUT per
tensor: that one is applied to the bank as a single tensor, the conversion that failed in the
brief (one outlier-driven scale over a 31M-weight bank). The MoE router (``ffn_gate_inp.weight``)
is never quantized: it chooses the experts, and a coarsely rounded router sends tokens to other
experts, so it stays float16 whatever the recipe's patterns match.

Given a ``QuantizedStore``, banks quantized expert by expert are written to it as they are made
and read back one expert at a time (a bank with one scale or LUT is quantized whole, stored, and
read back by experts too), and matrices are written whole and read back whole,
instead of cached in memory: a model's quantized weights are made once for the gate, the build
and the checks, and memory holds one expert and the matrices in use. Dequantized (float32)
matrices are kept in a cache bounded in bytes (``reference.weight_cache``).

The embedding table and the LM head (vocab x n_embd) are never held whole as float32: the
reference reads them by rows (``rows``), the exact ones from the memory-mapped GGUF and the
quantized head dequantized chunk by chunk from its stored form.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from anepack.quant import (
    Format, LinearFormat, LinearTensor, LutFormat, PalettizedTensor, QuantizedTensor, VectorLutFormat,
    blockwise_shift_scale, quantize, quantize_bank_streamed,
)
from anepack.quant.packing import weight_rows
from anepack.reference.model import STREAMED_WEIGHTS
from anepack.reference.weight_cache import WeightCache
from anepack.source.gguf_file import GGUFFile
from anepack.source.weights import LM_HEAD, SourceWeights, WeightSource, stored_name
from anepack.validate.calibration import Importance
from anepack.validate.quantized_store import QuantizedStore
from anepack.validate.recipes import Recipe

ROUTER_SUFFIX = ".ffn_gate_inp.weight"
# Experts quantized at once: one per core, up to 8 (each holds a float32 expert and its temporaries).
QUANTIZE_THREADS = max(1, min(8, os.cpu_count() or 1))


def quantize_tensor(
    weight: np.ndarray, fmt: Format, importance: Importance | None, name: str, rows: tuple[int, int] | None = None
) -> QuantizedTensor:
    """``weight``, tensor ``name`` or its output rows ``start:stop``, quantized in ``fmt`` with
    the calibration's importance for that tensor: its input columns' and, for the LM head, its
    output rows'. Every path that compresses a matrix (validators, build, search) goes here."""
    if importance is None:
        return quantize(weight, fmt)
    row_weights = importance.rows(name)
    if row_weights is not None and rows is not None:
        row_weights = row_weights[rows[0]:rows[1]]
    return quantize(weight, fmt, importance.get(name), row_importance=row_weights)


def quantizable_tensors(gguf: GGUFFile) -> list[str]:
    """Names a recipe can compress: every matrix and expert bank of the layers but the router, and the LM head."""
    names = [
        info.name for info in gguf.tensors.values()
        if info.name.startswith("blk.") and len(info.shape) >= 2 and not info.name.endswith(ROUTER_SUFFIX)
    ]
    return names + [LM_HEAD]


def one_scale_per_tensor(fmt: Format) -> bool:
    """True for formats with a single scale or LUT per tensor (int8-tensor, lut4-tensor, vlut...)."""
    if isinstance(fmt, LinearFormat):
        return not fmt.block_size and not fmt.per_channel
    if isinstance(fmt, LutFormat):
        return not fmt.group_size
    return isinstance(fmt, VectorLutFormat)


def expert_of(bank: QuantizedTensor, index: int) -> QuantizedTensor:
    """Expert ``index`` of a quantized bank ``[E, Cout, Cin]`` as a ``[1, Cout, Cin]`` bank, still stored.

    Every stored array of a bank leads with one block per expert, or with a single block the
    whole bank shares (a per-tensor scale or LUT), which is kept.
    """
    arrays = {
        field.name: array[index:index + 1]
        for field in dataclasses.fields(bank)
        if isinstance(array := getattr(bank, field.name), np.ndarray) and array.shape[0] > 1
    }
    return dataclasses.replace(bank, **arrays)


def dequantized_rows(q: QuantizedTensor, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of ``q.dequantize()`` as float32, dequantizing only the blocks of
    rows (LUT groups, vectors) that hold them."""
    rows = q.shape[0]
    blocks = [rows // array.shape[0] for field in dataclasses.fields(q)
              if isinstance(array := getattr(q, field.name), np.ndarray) and array.shape[0] > 1]
    block = math.lcm(1, *blocks)
    first, last = start - start % block, min(rows, -(-stop // block) * block)
    return weight_rows(q, first, last).dequantize()[start - first: stop - first].astype(np.float32)


def dequantized_expert(stored: QuantizedTensor) -> np.ndarray:
    """A one-expert bank ``[1, Cout, Cin]`` as float32 ``[Cout, Cin]``, equal to
    ``stored.dequantize()[0]``. A scalar LUT grouped along Cout (lut4-g16, the experts' usual
    format) is looked up group by group straight into float32, and linear codes are dequantized
    straight into float32: the validators dequantize every routed expert on every pass, and
    the general ``lut_to_dense`` or a float16 result widened afterwards costs twice as much."""
    if isinstance(stored, LinearTensor):
        offset = None if stored.offset is None else stored.offset[0]
        return blockwise_shift_scale(stored.data[0], stored.scale[0], offset, np.float32)
    if not (isinstance(stored, PalettizedTensor) and stored.lut_scale is None and stored.channel_scale is None
            and stored.vector_axis is None and stored.lut.shape[2] == 1):
        return stored.dequantize()[0].astype(np.float32)
    indices = stored.indices[0]
    tables = stored.lut[0].reshape(stored.lut.shape[1], -1).astype(np.float32)  # [groups, 2^nbits]
    rows = len(indices) // len(tables)
    out = np.empty(indices.shape, np.float32)
    for group, table in enumerate(tables):
        np.take(table, indices[group * rows:(group + 1) * rows], out=out[group * rows:(group + 1) * rows])
    return out


class ExactWeights(SourceWeights):
    """The source model's float32 weights, dequantized and kept in a cache bounded in bytes,
    except the vocab-sized tables: those are served by ``rows`` from the memory-mapped GGUF
    and, asked for whole, dequantized afresh and not kept."""

    def __init__(self, gguf: GGUFFile):
        super().__init__(gguf)
        self._cache = WeightCache()

    def __call__(self, name: str) -> np.ndarray:
        stored = stored_name(self.gguf, name)  # a tied head and the embedding share one copy
        if stored in STREAMED_WEIGHTS:
            return self.gguf.tensor(stored)
        cached = self._cache.get(stored)
        if cached is None:
            cached = self._cache.put(stored, self.gguf.tensor(stored))
        return cached

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        return self.gguf.rows(stored_name(self.gguf, name), start, stop)


class RecipeWeights:
    """The model's weights with the recipe's formats applied, each quantized once: kept in memory, or in the store.

    Matrices are served dequantized (``weights(name)``); expert banks one expert at a time
    (``weights.expert(name, index)``), dequantized from the cached compressed bank on each
    request, so memory holds compressed banks and one float32 expert. ``whole_banks=False``
    quantizes every expert alone even in a per-tensor format (the counterfactual that shows
    granularity, not bit width, breaks a bank). ``restricted`` gives a source that quantizes
    only some tensors (the rest exact): the layer validator blames one tensor at a time with it.
    With a ``store``, matrices and banks quantized expert by expert live there instead of in memory.
    """

    def __init__(
        self, gguf: GGUFFile, recipe: Recipe, importance: Importance | None = None, whole_banks: bool = True,
        store: QuantizedStore | None = None,
    ):
        self.gguf = gguf
        self.recipe = recipe
        self.importance = importance
        self.whole_banks = whole_banks
        self.store = store
        self.quantizable = set(quantizable_tensors(gguf))
        self.exact = ExactWeights(gguf)  # shared by the exact references of every validator
        self._quantized: dict[str, QuantizedTensor] = {}
        self._dense = WeightCache()
        self._last_read: tuple[str, QuantizedTensor] | None = None

    def is_bank(self, name: str) -> bool:
        return name in self.gguf.tensors and len(self.gguf.info(name).shape) == 3

    def compressed(self, name: str) -> QuantizedTensor | None:
        """The stored form of ``name`` under the recipe (fp16 too), or None for norms, the router
        and the host embedding."""
        if name not in self.quantizable:
            return None
        if self._stored(name):
            return self.store.get(name)  # whole, not kept: a stored bank is read by experts
        if self.store is not None and not self.is_bank(name):
            return self._stored_matrix(name)
        cached = self._quantized.get(name)
        if cached is None:
            fmt = self.recipe.format_for(name)
            if self.is_bank(name):
                cached = self._quantize_bank(name, fmt)
            else:
                cached = self._quantize_matrix(name)
            self._quantized[name] = cached
        return cached

    def _stored_matrix(self, name: str) -> QuantizedTensor:
        """Matrix ``name`` from the store, quantized into it on first use. The last one read
        stays in memory: the LM head is read in row chunks, one after another, and each chunk
        of a per-tensor format is cut from the whole (views that keep it alive)."""
        if self._last_read is not None and self._last_read[0] == name:
            return self._last_read[1]
        self._last_read = None  # released before the next one is read
        if name not in self.store:
            self.store.put(name, self._quantize_matrix(name))
        self._last_read = (name, self.store.get(name))
        return self._last_read[1]

    def _quantize_bank(self, name: str, fmt: Format) -> QuantizedTensor:
        if self.whole_banks and one_scale_per_tensor(fmt):
            pooled = None if self.importance is None else self.importance.pooled(name)
            # A linear scale is found by passes over the bank's rows; a LUT needs the bank whole.
            streamed = quantize_bank_streamed(
                lambda start, stop: self.gguf.rows(name, start, stop), self.gguf.info(name).shape, fmt, pooled)
            return streamed or quantize(self.gguf.tensor(name), fmt, pooled, whole_bank=True)
        # A few float32 experts at a time: a real bank is gigabytes as float32.
        return QuantizedTensor.stack(list(self._quantized_experts(name, fmt)))

    def _quantized_experts(self, name: str, fmt: Format) -> Iterator[QuantizedTensor]:
        """Every expert of bank ``name`` quantized alone, in expert order, ``QUANTIZE_THREADS`` at
        once: the quantizers' array passes release the GIL, so the experts of a layer, most of a
        conversion's time, use every core; at most twice that many experts are in flight."""
        experts = self.gguf.info(name).shape[0]
        with ThreadPoolExecutor(QUANTIZE_THREADS) as pool:
            pending: deque[Future] = deque()
            for index in range(experts):
                pending.append(pool.submit(self._quantize_expert, name, fmt, index))
                if len(pending) >= 2 * QUANTIZE_THREADS:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

    def _quantize_expert(self, name: str, fmt: Format, index: int) -> QuantizedTensor:
        """Expert ``index`` of bank ``name`` quantized alone, with its own importance row."""
        importance = self.importance
        reached = importance is not None and index not in importance.unreached(name)
        rows = importance.get(name) if reached else None
        return quantize(self.gguf.expert(name, index), fmt, None if rows is None else rows[index])

    def _stored(self, name: str) -> bool:
        """True when bank ``name`` lives in the store; quantizes it into the store on first use:
        expert by expert as they are made, or, for one scale or LUT over the bank, whole
        (``_quantize_bank``) and then stored."""
        if self.store is None or not self.is_bank(name) or name not in self.quantizable:
            return False
        if name not in self.store:
            fmt = self.recipe.format_for(name)
            if self.whole_banks and one_scale_per_tensor(fmt):
                self.store.put(name, self._quantize_bank(name, fmt))
            else:
                self.store.write(name, self._quantized_experts(name, fmt))
        return True

    def quantized_matrix(self, name: str, rows: tuple[int, int] | None = None) -> QuantizedTensor:
        """Matrix ``name`` (or its output rows ``start:stop``) in its stored form, equal to
        ``compressed(name)`` (cut to those rows): the whole matrix from the store, or cached
        when a validator quantized it already, else quantized alone and not kept, so a build
        that streams the model holds one package's matrices at a time."""
        if rows is None and self.store is not None:
            return self.compressed(name)
        cached = self._quantized.get(name) if rows is None else None
        return self._quantize_matrix(name, rows) if cached is None else cached

    def _quantize_matrix(self, name: str, rows: tuple[int, int] | None = None) -> QuantizedTensor:
        source = stored_name(self.gguf, name)
        weight = self.gguf.tensor(source) if rows is None else self.gguf.rows(source, *rows)
        return quantize_tensor(weight, self.recipe.format_for(name), self.importance, name, rows)

    def quantized_expert(self, name: str, index: int) -> QuantizedTensor:
        """Expert ``index`` of bank ``name`` in its stored form, a ``[1, Cout, Cin]`` bank.

        From the store, or cut from the quantized bank when it is cached, so an expert
        is quantized once for the gate, the build and the checks; otherwise quantized alone
        and not kept, so a build that streams a bank holds one expert at a time. A per-tensor
        format over the whole bank always comes from the bank (one scale for all).
        """
        if self._stored(name):
            return self.store.expert(name, index)
        fmt = self.recipe.format_for(name)
        if name in self._quantized or (self.whole_banks and one_scale_per_tensor(fmt)):
            return expert_of(self.compressed(name), index)
        return QuantizedTensor.stack([self._quantize_expert(name, fmt, index)])

    def __call__(self, name: str) -> np.ndarray:
        dense = self._dense.get(name)
        if dense is None:
            compressed = self.compressed(name)
            dense = self.exact(name) if compressed is None else compressed.dequantize().astype(np.float32)
            if name not in STREAMED_WEIGHTS:
                self._dense.put(name, dense)
        return dense

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of ``weights(name)``, dequantizing only those rows."""
        compressed = self.compressed(name)
        if compressed is None:
            return self.exact.rows(name, start, stop)
        return dequantized_rows(compressed, start, stop)

    def expert(self, name: str, index: int) -> np.ndarray:
        """Expert ``index`` of bank ``name`` as the recipe stores it, float32 ``[Cout, Cin]``."""
        if self._stored(name):
            return dequantized_expert(self.store.expert(name, index))
        compressed = self.compressed(name)
        if compressed is None:
            return self.gguf.expert(name, index)
        return dequantized_expert(expert_of(compressed, index))

    def bits_per_weight(self, name: str) -> float:
        """Stored bits per weight of ``name`` (a stored bank's from its stored shapes, not read)."""
        if self._stored(name):
            return self.store.shapes_only(name).bits_per_weight
        return self.compressed(name).bits_per_weight

    def restricted(self, names: set[str]) -> WeightSource:
        """A source that quantizes only ``names`` and keeps every other weight exact."""
        return PartlyQuantized(self, frozenset(names))


@dataclasses.dataclass(frozen=True)
class PartlyQuantized:
    """A recipe's weights for ``names`` only; every other weight (or expert) exact."""

    weights: RecipeWeights
    names: frozenset[str]

    def __call__(self, name: str) -> np.ndarray:
        return self.weights(name) if name in self.names else self.weights.exact(name)

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        return self.weights.rows(name, start, stop) if name in self.names else self.weights.exact.rows(name, start, stop)

    def expert(self, name: str, index: int) -> np.ndarray:
        if name in self.names:
            return self.weights.expert(name, index)
        return self.weights.gguf.expert(name, index)
