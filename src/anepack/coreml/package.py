"""Build artifacts on disk: .mlpackage directories and files, written atomically and byte-for-byte
deterministically, with content hashes.

Everything is first written under a temporary name (``.<name>.tmp-<pid>``) in the target
directory and renamed into place when complete, so a killed run leaves only temporary names.
An ``.mlpackage`` is written here rather than by ``MLModel.save``, because coremltools'
path adds a conversion date to the metadata, gives Manifest.json random item identifiers
and serializes protobuf maps in a per-process hash order; here the spec is serialized
deterministically, the metadata is ours, and the item identifiers are derived from the
content. The layout is the one coremltools' ModelPackage writes:

    X.mlpackage/Manifest.json
    X.mlpackage/Data/com.apple.CoreML/model.mlmodel
    X.mlpackage/Data/com.apple.CoreML/weights/weight.bin
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path

import coremltools as ct
from coremltools.converters.mil.backend.mil.load import load as export_milproto
from coremltools.converters.mil.mil import Function, Program
from coremltools.proto import Model_pb2

from anepack.atomic import TEMPORARY_MARKER, atomic_write_bytes, temporary_path

SPEC_PATH = "Data/com.apple.CoreML/model.mlmodel"
WEIGHTS_PATH = "Data/com.apple.CoreML/weights"
SPECIFICATION_VERSION = ct.target.iOS18
_AUTHOR = "com.apple.CoreML"
_TEMPORARY_MARKERS = (TEMPORARY_MARKER, ".old-")
_HASH_CHUNK = 1 << 22


def remove_temporaries(directory: Path) -> None:
    """Delete what killed runs left behind under temporary names in ``directory``."""
    for entry in directory.iterdir():
        if entry.name.startswith(".") and any(marker in entry.name for marker in _TEMPORARY_MARKERS):
            remove_path(entry)


def remove_path(path: Path) -> None:
    """Delete a file or a directory tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _install(staging: Path, path: Path) -> None:
    """Rename ``staging`` to ``path``; an existing ``path`` is moved aside first, never half-replaced."""
    if not path.exists():
        os.rename(staging, path)
        return
    retired = temporary_path(path, ".old-")
    os.rename(path, retired)
    os.rename(staging, path)
    remove_path(retired)


def _manifest_json(spec_bytes: bytes) -> bytes:
    # ModelPackage wants one UUID per item; deriving them from the spec keeps them stable.
    namespace = uuid.uuid5(uuid.NAMESPACE_URL, "anepack:" + hashlib.sha256(spec_bytes).hexdigest())
    spec_id = str(uuid.uuid5(namespace, "model.mlmodel"))
    weights_id = str(uuid.uuid5(namespace, "weights"))
    manifest = {
        "fileFormatVersion": "1.0.0",
        "itemInfoEntries": {
            spec_id: {
                "author": _AUTHOR,
                "description": "CoreML Model Specification",
                "name": "model.mlmodel",
                "path": "com.apple.CoreML/model.mlmodel",
            },
            weights_id: {
                "author": _AUTHOR,
                "description": "CoreML Model Weights",
                "name": "weights",
                "path": "com.apple.CoreML/weights",
            },
        },
        "rootModelIdentifier": spec_id,
    }
    return (json.dumps(manifest, indent=4, sort_keys=True) + "\n").encode()


def save_package(
    functions: Mapping[str, Function], path: Path, metadata: Mapping[str, str]
) -> None:
    """Write an ML program with these functions (the first is the default) to ``path`` atomically.

    No graph pass runs: the ops, constexpr weights and names in ``functions`` are exactly what
    the package holds. ``metadata`` becomes the model's user-defined metadata.
    """
    program = Program()
    # Program.add_function re-checks every function's opset on each call: an expert package's
    # 256 functions would be checked 33,000 times. Added together, they are checked once.
    program.functions.update(functions)
    program._check_program_opset_version()
    program.default_function_name = next(iter(functions))
    program.export_as_multifunction = True
    program.skip_all_passes = True
    program._check_early_error_out_for_invalid_program()

    staging = temporary_path(path)
    remove_path(staging)
    try:
        weights_dir = staging / WEIGHTS_PATH
        weights_dir.mkdir(parents=True)
        spec = export_milproto(program, str(weights_dir), specification_version=SPECIFICATION_VERSION)
        spec.description.metadata.userDefined.update(metadata)
        spec_bytes = spec.SerializeToString(deterministic=True)
        (staging / SPEC_PATH).write_bytes(spec_bytes)
        (staging / "Manifest.json").write_bytes(_manifest_json(spec_bytes))
        _install(staging, path)
    finally:
        if staging.exists():
            remove_path(staging)


def read_spec(path: Path) -> Model_pb2.Model:
    """The model specification of a saved package (weights stay on disk)."""
    spec = Model_pb2.Model()
    spec.ParseFromString((path / SPEC_PATH).read_bytes())
    return spec


def package_metadata(path: Path) -> dict[str, str]:
    """The user-defined metadata of a saved package, or {} when it is missing or unreadable."""
    try:
        return dict(read_spec(path).description.metadata.userDefined)
    except (OSError, ValueError):
        return {}


def _files(path: Path) -> list[Path]:
    return sorted((entry for entry in path.rglob("*") if entry.is_file()), key=lambda p: p.relative_to(path).as_posix())


def content_hash(path: Path) -> str:
    """sha256 over every file of a package (or one file): relative path, size, then bytes."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else _files(path)
    for entry in files:
        relative = entry.name if entry == path else entry.relative_to(path).as_posix()
        digest.update(f"{relative}\0{entry.stat().st_size}\0".encode())
        with open(entry, "rb") as handle:
            while chunk := handle.read(_HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def size_bytes(path: Path) -> int:
    """Bytes on disk of a package (every file) or of one file."""
    return path.stat().st_size if path.is_file() else sum(entry.stat().st_size for entry in _files(path))
