"""The engines that run one shard function: anepack's MIL interpreter (anywhere) or Core ML (macOS).

Both take and return float16 arrays by the names in the manifest; the runtime sees only
``ShardEngine.run``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from anepack.errors import AnepackError

BACKENDS = ("mil", "coreml")


class ShardEngine(Protocol):
    """One loaded ``.mlpackage``: run a function (``prefill`` or ``decode``) on named inputs."""

    def run(self, function: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def release(self) -> None:
        """Free what the engine keeps decoded between calls (it reloads it when called again)."""


class MilShard:
    """A shard run op by op by ``anepack.coreml.interpreter`` in numpy: the simulation of Core ML."""

    def __init__(self, path: Path):
        from anepack.coreml.interpreter import MilProgram  # coremltools: loaded only when used

        self.program = MilProgram.load(path)

    def run(self, function: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.program.run(function, inputs)

    def release(self) -> None:
        self.program.release_constants()


def open_shard(path: Path, backend: str) -> ShardEngine:
    """The shard at ``path`` loaded by ``backend`` (``mil`` or ``coreml``)."""
    if backend == "mil":
        return MilShard(path)
    if backend == "coreml":
        from anepack.runtime.coreml_backend import CoreMLShard

        return CoreMLShard(path)
    raise AnepackError(None, f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
