"""Tokenization from a GGUF's own vocabulary, through llama.cpp's tokenizer (llama-cpp-python).

Only the vocabulary is loaded (``vocab_only=True``), so opening a tokenizer is cheap even for
large models; the ids are exactly the ones llama.cpp itself feeds the model.
"""

from __future__ import annotations

import os
from pathlib import Path

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
