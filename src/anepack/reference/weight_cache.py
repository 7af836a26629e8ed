"""Float32 weights kept for reuse up to a byte budget, the least recently used dropped first.

Every pass of the reference (calibration, the validators, the checks) walks the layers in
order and reads a layer's weights several times while it is there (once per prompt, once per
blamed tensor), then moves on. A budget of a few layers' weights serves those repeated reads;
an unbounded cache would hold the whole model in float32 once per weight source: Gemma 4
26B-A4B's trunk matrices (its experts are never cached: they stream) are 211 MB per layer,
6.3 GB over 30 layers, and a conversion keeps an exact and a quantized copy. Gemma 3 270M's
whole trunk (401 MB) fits the default budget, so validating it never reads a weight twice.
A weight larger than the budget is returned and not kept.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

# Per cache. Read when a cache is made, so a test can lower it for every cache at once.
BUDGET_BYTES = 512 * 2**20


class WeightCache:
    """Named arrays up to ``budget`` bytes in all; ``peak_bytes`` is the most ever held."""

    def __init__(self, budget: int | None = None):
        self.budget = BUDGET_BYTES if budget is None else budget
        self._arrays: OrderedDict[str, np.ndarray] = OrderedDict()
        self.nbytes = 0
        self.peak_bytes = 0

    def __contains__(self, name: str) -> bool:
        return name in self._arrays

    def get(self, name: str) -> np.ndarray | None:
        array = self._arrays.get(name)
        if array is not None:
            self._arrays.move_to_end(name)
        return array

    def put(self, name: str, array: np.ndarray) -> np.ndarray:
        """Keep ``array`` under ``name`` (dropping the least recently used to make room) and return it."""
        if name in self._arrays:
            self.nbytes -= self._arrays.pop(name).nbytes
        if array.nbytes > self.budget:
            return array
        while self.nbytes + array.nbytes > self.budget:
            self.nbytes -= self._arrays.popitem(last=False)[1].nbytes
        self._arrays[name] = array
        self.nbytes += array.nbytes
        self.peak_bytes = max(self.peak_bytes, self.nbytes)
        return array
