"""The bounded weight cache: least-recently-used eviction within a byte budget (closed form),
and a reference run with a budget of a fraction of the model gives the same logits, bit for
bit, as one that keeps every weight, while no cache ever holds more than its budget."""

from __future__ import annotations

import numpy as np
import pytest

from anepack.reference import build
from anepack.reference import weight_cache
from anepack.reference.weight_cache import WeightCache
from anepack.source import open_gguf
from anepack.validate.recipes import parse_recipe
from anepack.validate.weights import RecipeWeights


def test_least_recently_used_goes_first_and_the_budget_holds():
    cache = WeightCache(budget=3 * 400)
    arrays = {name: np.full(100, i, np.float32) for i, name in enumerate("abcd")}  # 400 bytes each
    for name in "abc":
        cache.put(name, arrays[name])
    assert cache.get("a") is arrays["a"]  # "b" is now the least recently used
    cache.put("d", arrays["d"])
    assert "b" not in cache and all(name in cache for name in "acd")
    assert cache.nbytes == 1200 and cache.peak_bytes == 1200
    big = np.zeros(400, np.float32)  # 1600 bytes: over the budget, returned and not kept
    assert cache.put("big", big) is big and "big" not in cache and cache.nbytes == 1200
    cache.put("a", np.zeros(50, np.float32))  # replacing an entry counts its new size
    assert cache.nbytes == 1000


@pytest.fixture(scope="module")
def gguf(synthetic_moe_path):
    with open_gguf(synthetic_moe_path) as opened:
        yield opened


def test_a_small_budget_changes_no_logit(gguf, monkeypatch):
    recipe = parse_recipe('name = "int8"\n[[rule]]\ntensors = "*"\nformat = "int8-channel"\n')
    tokens = np.arange(2, 40)
    unbounded = [build(gguf.config, source).forward(tokens).logits
                 for source in (RecipeWeights(gguf, recipe).exact, RecipeWeights(gguf, recipe))]

    trunk = [name for name, info in gguf.tensors.items() if name.startswith("blk.") and len(info.shape) == 2]
    total = sum(4 * int(np.prod(gguf.info(name).shape)) for name in trunk)
    budget = total // 3  # about one layer of the four
    monkeypatch.setattr(weight_cache, "BUDGET_BYTES", budget)
    weights = RecipeWeights(gguf, recipe)
    for source, expected in zip((weights.exact, weights), unbounded):
        model = build(gguf.config, source)
        for _ in range(2):  # the second pass reads evicted weights again
            np.testing.assert_array_equal(model.forward(tokens).logits, expected)
        caches = [model._cache, weights.exact._cache, weights._dense]
        assert all(cache.budget == budget and cache.peak_bytes <= budget for cache in caches)
        assert model._cache.peak_bytes > budget // 2  # it did fill up, and dropped weights to stay under
