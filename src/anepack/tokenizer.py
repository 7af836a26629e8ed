"""Tokenization from a GGUF's own vocabulary, through llama.cpp's tokenizer (llama-cpp-python).

Only the vocabulary is loaded (``vocab_only=True``), so opening a tokenizer is cheap even for
large models; the ids are exactly the ones llama.cpp itself feeds the model.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from anepack.errors import AnepackError
from anepack.llamacpp import open_llama


class Tokenizer:
    """The tokenizer of the GGUF at ``model_path``: text <-> token ids."""

    def __init__(self, model_path: str | os.PathLike[str]):
        self.path = Path(model_path)
        self._llama = open_llama(self.path, vocab_only=True)

    @property
    def bos_id(self) -> int:
        return self._llama.token_bos()

    @property
    def eos_id(self) -> int:
        return self._llama.token_eos()

    @property
    def vocab_size(self) -> int:
        return self._llama.n_vocab()

    def encode(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        """Token ids of ``text``; ``special=True`` also parses control-token text such as ``<bos>``."""
        return self._llama.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def decode(self, ids: list[int], special: bool = False) -> str:
        """Text of ``ids`` (bytes that do not form UTF-8, e.g. a cut multi-byte char, become U+FFFD)."""
        return self._llama.detokenize(list(ids), special=special).decode("utf-8", errors="replace")

    def close(self) -> None:
        self._llama.close()

    def __enter__(self) -> Tokenizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def checked_tokens(tokens, vocab_size: int) -> np.ndarray:
    """``tokens`` as a 1-D int64 array, or a one-line error naming the first id outside the vocabulary."""
    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.ndim != 1 or tokens.size == 0:
        raise AnepackError(None, f"expected a non-empty 1-D token sequence, got shape {tokens.shape}")
    bad = tokens[(tokens < 0) | (tokens >= vocab_size)]
    if bad.size:
        raise AnepackError(None, f"token id {int(bad[0])} is outside the vocabulary (size {vocab_size})")
    return tokens
