"""A shard run by Core ML itself (``MLModel.predict``, compute units CPU and Neural Engine): macOS only.

Written to coremltools' documented multifunction API (one ``MLModel`` per function, chosen with
``function_name``). Untested here: anepack's development machines run Linux, where coremltools
cannot predict, so its test skips off macOS. The MIL backend is the tested path.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from anepack.errors import AnepackError


class CoreMLShard:
    """One ``.mlpackage`` loaded by Core ML, one ``MLModel`` per function on first use."""

    def __init__(self, path: Path):
        if sys.platform != "darwin":
            raise AnepackError(
                path, "the coreml backend needs macOS (Core ML runs models only there); use --backend mil"
            )
        self.path = Path(path)
        self._models: dict[str, object] = {}

    def _model(self, function: str):
        model = self._models.get(function)
        if model is None:
            import coremltools as ct

            try:
                model = ct.models.MLModel(
                    str(self.path), compute_units=ct.ComputeUnit.CPU_AND_NE, function_name=function
                )
            except Exception as err:  # Core ML reports load failures as bare Exceptions
                raise AnepackError(self.path, f"Core ML cannot load function {function} ({err})") from None
            self._models[function] = model
        return model

    def run(self, function: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self._model(function).predict(inputs)
        return {name: np.asarray(value, dtype=np.float16) for name, value in outputs.items()}

    def release(self) -> None:
        """Nothing: Core ML pages a loaded model's weights itself."""
