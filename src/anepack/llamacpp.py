"""llama.cpp (through llama-cpp-python) as the independent referee: logits at every position.

The referee runs llama.cpp's CPU graph with a float32 KV cache and no flash attention, so
the only approximations left are the ones the model file itself carries (and llama.cpp's
activation quantization when weights are quantized). Each call is a fresh prefill from
position 0: the KV cache from earlier calls is discarded.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import numpy as np

from anepack.errors import AnepackError

GGML_TYPE_F32 = 0  # ggml's type id for float32, for the KV cache types
DEFAULT_CONTEXT = 512


@functools.cache
def _silence_llama_cpp():
    """Route llama.cpp's and ggml's log lines to nowhere, once per process.

    llama-cpp-python's own filter maps ggml's log levels with an outdated table and lets
    warnings through to stderr; anepack reports problems as exceptions instead.
    """
    import llama_cpp

    @llama_cpp.llama_log_callback
    def discard(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        return None

    llama_cpp.llama_log_set(discard, ctypes.c_void_p(0))
    return discard  # cached, so the C callback outlives this call


def open_llama(model_path: str | os.PathLike[str], **params) -> "llama_cpp.Llama":  # noqa: F821
    """``llama_cpp.Llama`` on ``model_path``, silent; a load failure becomes one line."""
    import llama_cpp

    path = Path(model_path)
    if not path.is_file():
        raise AnepackError(path, "no such model file")
    _silence_llama_cpp()
    try:
        return llama_cpp.Llama(model_path=str(path), verbose=False, **params)
    except ValueError as err:  # llama-cpp-python's "Failed to load model from file"
        _name_the_problem(path)
        raise AnepackError(path, f"llama.cpp cannot load this model ({err})") from None


def _name_the_problem(path: Path) -> None:
    """llama.cpp says only that a load failed: anepack's reader names an unknown architecture,
    a truncated file or a wrong shape in one line, if that is why."""
    from anepack.source.gguf_file import open_gguf

    with open_gguf(path) as gguf:
        gguf.config  # parses the architecture and checks every tensor's presence and shape


class LlamaCppReferee:
    """One loaded model: ``logits(tokens)`` for prefills of up to ``n_ctx`` tokens."""

    def __init__(self, model_path: str | os.PathLike[str], n_threads: int = 2, n_ctx: int = DEFAULT_CONTEXT):
        self.path = Path(model_path)
        self.n_ctx = n_ctx
        self._llama = open_llama(
            self.path,
            n_ctx=n_ctx,
            n_batch=n_ctx,
            n_ubatch=n_ctx,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            logits_all=True,
            flash_attn=False,
            type_k=GGML_TYPE_F32,
            type_v=GGML_TYPE_F32,
        )

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of ``text`` from the model's own vocabulary (control-token text not parsed)."""
        return self._llama.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)

    def logits(self, tokens: np.ndarray | list[int]) -> np.ndarray:
        """Float32 logits ``[T, vocab]`` of a prefill over ``tokens`` starting at position 0."""
        ids = [int(t) for t in np.asarray(tokens).ravel()]
        if not ids:
            raise AnepackError(self.path, "cannot run llama.cpp on an empty token sequence")
        if len(ids) > self.n_ctx:
            raise AnepackError(self.path, f"{len(ids)} tokens exceed the referee's context of {self.n_ctx}")
        vocab = self._llama.n_vocab()
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise AnepackError(self.path, f"token id {bad[0]} is outside the vocabulary (size {vocab})")
        # n_tokens = 0 makes eval() drop every cached position before decoding
        self._llama.reset()
        self._llama.eval(ids)
        return np.array(self._llama.scores[: len(ids)], dtype=np.float32)

    def describe(self) -> str:
        import llama_cpp

        return f"llama-cpp-python {llama_cpp.__version__} (CPU, f32 KV cache, no flash attention)"

    def close(self) -> None:
        self._llama.close()

    def __enter__(self) -> LlamaCppReferee:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def llamacpp_logits(
    model_path: str | os.PathLike[str], tokens: np.ndarray | list[int], n_threads: int = 2
) -> np.ndarray:
    """llama.cpp's float32 logits ``[T, vocab]`` for ``tokens`` on a freshly loaded model."""
    with LlamaCppReferee(model_path, n_threads=n_threads, n_ctx=max(DEFAULT_CONTEXT, len(tokens))) as referee:
        return referee.logits(tokens)
