"""The exact numpy forward pass of each supported architecture, checked against llama.cpp.

``build(config, weights)`` picks the model class for the config's type. ``weights`` is any
callable ``name -> float32 array`` in numpy order (``GGUFFile.tensor`` or a quantized recipe
wrapping it); tensors are read on first use and cached on the model. ``emulate`` (a
``llamacpp_emulation.LlamaCppArithmetic``) computes matmuls and GELU as llama.cpp's CPU backend
does instead of exactly.
"""

from __future__ import annotations

from anepack.errors import UnsupportedModelError
from anepack.reference.common import Overflow
from anepack.reference.gemma3 import Gemma3
from anepack.reference.gemma4 import Gemma4
from anepack.reference.llama import Llama
from anepack.reference.model import Arithmetic, ForwardResult, ReferenceModel, WeightSource
from anepack.source.config import Gemma3Config, Gemma4Config, LlamaConfig, ModelConfig

MODELS: dict[type, type[ReferenceModel]] = {
    Gemma3Config: Gemma3,
    Gemma4Config: Gemma4,
    LlamaConfig: Llama,
}


def build(
    config: ModelConfig, weights: WeightSource, fp16: bool = False, emulate: Arithmetic | None = None
) -> ReferenceModel:
    """The reference model for ``config`` over ``weights``; ``fp16`` rounds every intermediate,
    ``emulate`` replaces exact matmuls and GELU with another engine's arithmetic."""
    model_class = MODELS.get(type(config))
    if model_class is None:
        raise UnsupportedModelError(None, f"no reference forward pass for {type(config).__name__}")
    return model_class(config, weights, fp16=fp16, emulate=emulate)


__all__ = ["Arithmetic", "ForwardResult", "Overflow", "ReferenceModel", "WeightSource", "build"]
