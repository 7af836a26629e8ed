"""A recipe's weights for the reference: each tensor in its recipe format, dequantized as Core ML does."""

from __future__ import annotations

import numpy as np

from anepack.quant import QuantizedTensor, quantize
from anepack.source.gguf_file import GGUFFile
from anepack.source.weights import LM_HEAD, WeightSource, stored_name
from anepack.validate.calibration import Importance
from anepack.validate.recipes import Recipe


def quantizable_tensors(gguf: GGUFFile) -> list[str]:
    """Names a recipe can compress: every matrix of the transformer layers, and the LM head."""
    names = [info.name for info in gguf.tensors.values() if info.name.startswith("blk.") and len(info.shape) >= 2]
    return names + [LM_HEAD]


class RecipeWeights:
    """The model's weights with the recipe's formats applied, each quantized once and cached.

    ``restricted`` gives a source that quantizes only some tensors (the rest exact): the layer
    validator blames one tensor at a time with it.
    """

    def __init__(self, gguf: GGUFFile, recipe: Recipe, importance: Importance | None = None):
        self.gguf = gguf
        self.recipe = recipe
        self.importance = importance
        self.quantizable = set(quantizable_tensors(gguf))
        self._quantized: dict[str, QuantizedTensor] = {}
        self._dense: dict[str, np.ndarray] = {}
        self._exact: dict[str, np.ndarray] = {}

    def compressed(self, name: str) -> QuantizedTensor | None:
        """The stored form of ``name`` under the recipe (fp16 too), or None for norms and the host embedding."""
        if name not in self.quantizable:
            return None
        fmt = self.recipe.format_for(name)
        cached = self._quantized.get(name)
        if cached is None:
            columns = None if self.importance is None else self.importance.get(name)
            cached = self._quantized[name] = quantize(self.exact(name), fmt, columns)
        return cached

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

    def restricted(self, names: set[str]) -> WeightSource:
        """A source that quantizes only ``names`` and keeps every other weight exact."""
        return lambda name: self(name) if name in names else self.exact(name)
