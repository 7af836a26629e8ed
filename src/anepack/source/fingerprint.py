"""A cheap, stable fingerprint of a model file, for golden files and run records.

A full sha256 of a 48 GB GGUF takes minutes; the fingerprint hashes the file size, the whole
header region and evenly spaced samples of the data, which any re-quantization or edit of a
real model changes. Records name it ``fingerprint``, never ``sha256``, to stay honest.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

HEAD_BYTES = 16 << 20
SAMPLE_BYTES = 64 << 10
SAMPLES = 64


def file_fingerprint(path: str | os.PathLike[str]) -> str:
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        if size <= HEAD_BYTES + SAMPLES * SAMPLE_BYTES:
            digest.update(handle.read())
        else:
            digest.update(handle.read(HEAD_BYTES))
            stride = (size - HEAD_BYTES) // SAMPLES
            for index in range(SAMPLES):
                handle.seek(HEAD_BYTES + index * stride)
                digest.update(handle.read(SAMPLE_BYTES))
    return digest.hexdigest()[:32]
