"""Session fixtures shared by the test modules: the default model and its F32 copy, and the
synthetic Gemma 4 MoE model, each made once."""

from __future__ import annotations

from pathlib import Path

import pytest

from anepack.source.default_model import default_model_path as _default_model_path
from anepack.source.dequant import dequantize_gguf


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """Gemma 3 270M Q4_K_M from the PyPI package (assembled into the cache on first use)."""
    return _default_model_path()


@pytest.fixture(scope="session")
def default_model_f32_path(default_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model with every tensor dequantized to F32: llama.cpp then runs exact weights."""
    return dequantize_gguf(default_model_path, tmp_path_factory.mktemp("default-f32") / "gemma3-270m-f32.gguf", "f32")


@pytest.fixture(scope="session")
def synthetic_moe_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic Gemma 4 MoE model (preset ``moe``, seed 1)."""
    from anepack import synth

    dims, _ = synth.preset("gemma4", "moe")
    return synth.write_synthetic_gguf(tmp_path_factory.mktemp("synthetic-moe") / "moe.gguf", "gemma4", seed=1, **dims)


@pytest.fixture(autouse=True, scope="session")
def isolated_run_history(tmp_path_factory: pytest.TempPathFactory):
    """Runs recorded by tests (CLI subprocesses included) go to a temporary history, not the user's."""
    import os

    previous = os.environ.get("ANEPACK_DB")
    os.environ["ANEPACK_DB"] = str(tmp_path_factory.mktemp("history") / "runs.sqlite")
    yield
    if previous is None:
        os.environ.pop("ANEPACK_DB", None)
    else:
        os.environ["ANEPACK_DB"] = previous
