"""A recipe's weights for the reference: each tensor in its recipe format, dequantized as Core ML does.

Expert banks (``*_exps.weight``, ``[E, Cout, Cin]``) are quantized expert by expert, each with
its own scales or LUTs and its own importance row, except in a format with one scale or LUT per
tensor: that one is applied to the bank as a single tensor, the conversion that failed in the
brief (one outlier-driven scale over a 31M-weight bank). The MoE router (``ffn_gate_inp.weight``)
is never quantized: it chooses the experts, and a coarsely rounded router sends tokens to other
experts, so it stays float16 whatever the recipe's patterns match.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from anepack.quant import Format, LinearFormat, LutFormat, QuantizedTensor, VectorLutFormat, quantize
from anepack.source.gguf_file import GGUFFile
from anepack.source.weights import LM_HEAD, WeightSource, stored_name
from anepack.validate.calibration import Importance
from anepack.validate.recipes import Recipe

ROUTER_SUFFIX = ".ffn_gate_inp.weight"


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


class RecipeWeights:
    """The model's weights with the recipe's formats applied, each quantized once and cached.

    Matrices are served dequantized (``weights(name)``); expert banks one expert at a time
    (``weights.expert(name, index)``), dequantized from the cached compressed bank on each
    request, so memory holds compressed banks and one float32 expert. ``whole_banks=False``
    quantizes every expert alone even in a per-tensor format (the counterfactual that shows
    granularity, not bit width, breaks a bank). ``restricted`` gives a source that quantizes
    only some tensors (the rest exact): the layer validator blames one tensor at a time with it.
    """

    def __init__(
        self, gguf: GGUFFile, recipe: Recipe, importance: Importance | None = None, whole_banks: bool = True
    ):
        self.gguf = gguf
        self.recipe = recipe
        self.importance = importance
        self.whole_banks = whole_banks
        self.quantizable = set(quantizable_tensors(gguf))
        self._quantized: dict[str, QuantizedTensor] = {}
        self._dense: dict[str, np.ndarray] = {}
        self._exact: dict[str, np.ndarray] = {}

    def is_bank(self, name: str) -> bool:
        return name in self.gguf.tensors and len(self.gguf.info(name).shape) == 3

    def compressed(self, name: str) -> QuantizedTensor | None:
        """The stored form of ``name`` under the recipe (fp16 too), or None for norms, the router
        and the host embedding."""
        if name not in self.quantizable:
            return None
        cached = self._quantized.get(name)
        if cached is None:
            fmt = self.recipe.format_for(name)
            if self.is_bank(name):
                cached = self._quantize_bank(name, fmt)
            else:
                columns = None if self.importance is None else self.importance.get(name)
                cached = quantize(self.exact(name), fmt, columns)
            self._quantized[name] = cached
        return cached

    def _quantize_bank(self, name: str, fmt: Format) -> QuantizedTensor:
        if self.whole_banks and one_scale_per_tensor(fmt):
            pooled = None if self.importance is None else self.importance.pooled(name)
            return quantize(self.gguf.tensor(name), fmt, pooled, whole_bank=True)
        rows = None if self.importance is None else self.importance.get(name)
        unreached = set() if self.importance is None else set(self.importance.unreached(name))
        # One float32 expert at a time: a real bank is gigabytes as float32.
        return QuantizedTensor.stack([
            quantize(self.gguf.expert(name, e), fmt, None if rows is None or e in unreached else rows[e])
            for e in range(self.gguf.info(name).shape[0])
        ])

    def exact(self, name: str) -> np.ndarray:
        stored = stored_name(self.gguf, name)  # a tied head and the embedding share one copy
        cached = self._exact.get(stored)
        if cached is None:
            cached = self._exact[stored] = self.gguf.tensor(stored)
        return cached

    def __call__(self, name: str) -> np.ndarray:
        dense = self._dense.get(name)
        if dense is None:
            compressed = self.compressed(name)
            dense = self.exact(name) if compressed is None else compressed.dequantize().astype(np.float32)
            self._dense[name] = dense
        return dense

    def expert(self, name: str, index: int) -> np.ndarray:
        """Expert ``index`` of bank ``name`` as the recipe stores it, float32 ``[Cout, Cin]``."""
        compressed = self.compressed(name)
        if compressed is None:
            return self.gguf.expert(name, index)
        return expert_of(compressed, index).dequantize()[0].astype(np.float32)

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

    def expert(self, name: str, index: int) -> np.ndarray:
        if name in self.names:
            return self.weights.expert(name, index)
        return self.weights.gguf.expert(name, index)
