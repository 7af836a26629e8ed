"""Atomic file output: write to a hidden temporary sibling, rename when complete.

A killed process leaves at most a hidden ``.<name>.tmp-<pid>`` entry (which a resumed build
deletes), never a target that looks finished.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TEMPORARY_MARKER = ".tmp-"


def temporary_path(path: str | os.PathLike[str], marker: str = TEMPORARY_MARKER) -> Path:
    """A hidden sibling of ``path`` that no reader mistakes for the finished artifact."""
    path = Path(path)
    return path.with_name(f".{path.name}{marker}{os.getpid()}")


@contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds."""
    partial = temporary_path(path)
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_output(path) as partial:
        partial.write_bytes(data)
