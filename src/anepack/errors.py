"""Errors a user can cause. Each one renders as a single line naming the file and the problem.

Library code raises these; only the CLI turns them into a message and an exit code.
"""

from __future__ import annotations

from pathlib import Path


class AnepackError(Exception):
    """A problem with the user's input, shown to them as one line: ``<file>: <problem>``."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(problem if path is None else f"{path}: {problem}")


class GGUFFormatError(AnepackError):
    """The file is not a well-formed GGUF (bad magic, truncated, absurd sizes)."""


class UnsupportedModelError(AnepackError):
    """The GGUF is well formed but describes something anepack cannot handle."""
