"""Tokenization from a GGUF's own vocabulary, through llama.cpp's tokenizer (llama-cpp-python).

Only the vocabulary is loaded (``vocab_only=True``), so opening a tokenizer is cheap even for
large models; the ids are exactly the ones llama.cpp itself feeds the model.
"""

from __future__ import annotations

import os
from pathlib import Path

from anepack.errors import AnepackError


def open_llama(model_path: str | os.PathLike[str], **params) -> "llama_cpp.Llama":  # noqa: F821
    """``llama_cpp.Llama`` on ``model_path`` with its logging silenced; load failures become one line."""
    import llama_cpp

    path = Path(model_path)
    if not path.is_file():
        raise AnepackError(path, "no such model file")
    try:
        return llama_cpp.Llama(model_path=str(path), verbose=False, **params)
    except ValueError as err:  # llama-cpp-python's "Failed to load model from file"
        raise AnepackError(path, f"llama.cpp cannot load this model ({err})") from None


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
