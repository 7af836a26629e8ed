"""The vocab-sized tables read by rows: the same logits as the whole tables, without ever
reading them whole.

The reference gathers the embedding rows of a prompt and multiplies the LM head chunk by
chunk when its weight source serves rows; the expected values come from the same model over
a source that only serves whole tensors (the path every weight took before). With chunk
boundaries on the BLAS kernel's column tiles (powers of two: 512 here, 16384 by default)
the logits are equal bit for bit; elsewhere a chunk's last columns are summed by the
kernel's edge code, in another order, and may differ in the last bits.
"""

from __future__ import annotations

import numpy as np
import pytest

from anepack.reference import build, model as reference_model
from anepack.reference.model import STREAMED_WEIGHTS
from anepack.source import open_gguf
from anepack.source.weights import LM_HEAD, source_weights
from anepack.synth import write_synthetic_gguf
from anepack.validate.recipes import parse_recipe
from anepack.validate.weights import RecipeWeights, dequantized_rows

TILED_CHUNK = 512  # four chunks over the synthetic vocabulary of 2048
ODD_CHUNK = 333  # out of step with the kernel's tiles and with every format's blocks of rows
# One of each kind of block of rows: a row, a LUT group, a vector, a row of blocks, the tensor.
HEAD_FORMATS = ["int8-channel", "lut4-g16", "vlut2x8", "int4-block32", "lut4-tensor"]


def recipe(head_format: str):
    return parse_recipe(
        'name = "t"\ndescription = "t"\n'
        '[[rule]]\ntensors = "blk.*"\nformat = "int8-channel"\n'
        f'[[rule]]\ntensors = "{LM_HEAD}"\nformat = "{head_format}"\n'
    )


class WholeOnly:
    """A source that serves whole tensors only: the reference reads every weight whole."""

    def __init__(self, source):
        self.source = source

    def __call__(self, name: str) -> np.ndarray:
        return self.source(name)


class RowsOnly:
    """A source that refuses to serve the vocab-sized tables whole."""

    def __init__(self, source):
        self.source = source

    def __call__(self, name: str) -> np.ndarray:
        assert name not in STREAMED_WEIGHTS, f"{name} read whole"
        return self.source(name)

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        return self.source.rows(name, start, stop)


@pytest.fixture(scope="module", params=["gemma3", "llama"])
def gguf(request, tmp_path_factory):
    path = write_synthetic_gguf(tmp_path_factory.mktemp("streamed") / f"{request.param}.gguf", request.param,
                                layers=1, seed=7, weight_type="q8_0")
    with open_gguf(path) as opened:
        yield opened


@pytest.fixture
def prompts():
    rng = np.random.default_rng(1)
    # a repeated id checks that the gather puts every row back in its place
    return [np.array([2, 40, 40, 7, 2047, 40]), rng.integers(0, 2048, 17), rng.integers(0, 2048, 9)]


def logits_pairs(gguf, prompts, head_format):
    """(streamed, whole) logits of every prompt for the recipe's and the exact references;
    the streamed ones twice: one forward per prompt, then all prompts through one head call."""
    weights = RecipeWeights(gguf, recipe(head_format))
    pairs = []
    for streamed_source, whole_source in ((weights, weights), (weights.exact, source_weights(gguf))):
        streamed = build(gguf.config, RowsOnly(streamed_source))
        whole = build(gguf.config, WholeOnly(whole_source))
        expected = [whole.forward(tokens).logits for tokens in prompts]
        pairs += [(streamed.forward(tokens).logits, logits) for tokens, logits in zip(prompts, expected)]
        pairs += list(zip(streamed.prompt_logits(prompts), expected))
    return pairs


@pytest.mark.parametrize("head_format", HEAD_FORMATS[:3])
def test_streamed_tables_give_the_whole_tables_logits_bit_for_bit(gguf, prompts, head_format, monkeypatch):
    monkeypatch.setattr(reference_model, "HEAD_CHUNK_ROWS", TILED_CHUNK)
    assert gguf.config.vocab_size == 4 * TILED_CHUNK
    for got, expected in logits_pairs(gguf, prompts, head_format):
        np.testing.assert_array_equal(got, expected)


def test_untiled_chunks_differ_at_rounding_level_only(gguf, prompts, monkeypatch):
    monkeypatch.setattr(reference_model, "HEAD_CHUNK_ROWS", ODD_CHUNK)
    for got, expected in logits_pairs(gguf, prompts, "lut4-g16"):
        ulps = 16 * np.finfo(np.float32).eps * np.abs(expected).max()
        np.testing.assert_allclose(got, expected, rtol=0, atol=ulps)


@pytest.mark.parametrize("head_format", HEAD_FORMATS)
def test_dequantized_rows_cut_anywhere(gguf, head_format):
    compressed = RecipeWeights(gguf, recipe(head_format)).compressed(LM_HEAD)
    whole = compressed.dequantize().astype(np.float32)
    for start, stop in ((0, 1), (5, 333), (17, 1000), (1999, 2048)):
        np.testing.assert_array_equal(dequantized_rows(compressed, start, stop), whole[start:stop])


def test_exact_weights_keep_no_whole_table(gguf, prompts):
    weights = RecipeWeights(gguf, recipe("int8-channel"))
    build(gguf.config, weights.exact).prompt_logits(prompts)
    build(gguf.config, weights).prompt_logits(prompts)
    # Asked for whole (the build quantizes the head from it), the table is dequantized afresh:
    # two requests give two arrays, so neither is held between them.
    assert weights.exact(LM_HEAD) is not weights.exact(LM_HEAD)
    assert weights.exact("blk.0.attn_q.weight") is weights.exact("blk.0.attn_q.weight")
