"""The model's weights as the reference asks for them: ``name -> float32 array``.

The reference always asks for the LM head as ``output.weight``. Models that tie the head to
the embedding table answer with ``token_embd.weight``; keeping the two names apart lets a
recipe compress the head (shipped in a shard) while the embedding lookup (on the host) keeps
the original table.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from anepack.source.gguf_file import GGUFFile

LM_HEAD = "output.weight"
EMBEDDING = "token_embd.weight"
# Gemma 4 E2B/E4B: every layer's per-token embedding, [vocab, n_layers * n_embd_per_layer].
PER_LAYER_EMBEDDING = "per_layer_token_embd.weight"

WeightSource = Callable[[str], np.ndarray]


def stored_name(gguf: GGUFFile, name: str) -> str:
    """The GGUF tensor behind a reference weight name (a tied LM head is the embedding)."""
    if name == LM_HEAD and LM_HEAD not in gguf.tensors:
        return EMBEDDING
    return name


class SourceWeights:
    """The model's own weights, dequantized from the GGUF on request.

    ``expert(name, index)`` serves one expert of a 3-D bank, so a reference that streams
    experts holds one expert at a time instead of the whole bank.
    """

    def __init__(self, gguf: GGUFFile):
        self.gguf = gguf

    def __call__(self, name: str) -> np.ndarray:
        return self.gguf.tensor(stored_name(self.gguf, name))

    def expert(self, name: str, index: int) -> np.ndarray:
        return self.gguf.expert(name, index)


def source_weights(gguf: GGUFFile) -> WeightSource:
    """The model's own weights, dequantized from the GGUF on request (experts one at a time)."""
    return SourceWeights(gguf)
