"""Copy a GGUF with every tensor dequantized to F32 or F16, keeping all metadata.

The copy streams one tensor at a time (memory stays at the largest tensor) and is written to
a temporary file that replaces the target only when complete.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from gguf import GGUFWriter, LlamaFileType

from anepack.atomic import atomic_output
from anepack.source.gguf_file import open_gguf

OUTPUT_TYPES = {
    "f32": (np.float32, LlamaFileType.ALL_F32),
    "f16": (np.float16, LlamaFileType.MOSTLY_F16),
}
# Keys GGUFWriter writes itself, or that describe the old file's quantization.
_REWRITTEN_KEYS = {"general.architecture", "general.alignment", "general.file_type"}


def dequantize_gguf(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    out_type: str = "f32",
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write ``target``: ``source`` with every tensor dequantized to ``out_type`` (f32 or f16).

    1-D tensors (norms, biases) stay F32 in an F16 copy, as llama.cpp's converters do.
    """
    np_type, file_type = OUTPUT_TYPES[out_type]
    target = Path(target)
    with open_gguf(source) as gguf, atomic_output(target) as partial:
        writer = GGUFWriter(partial, gguf.architecture, use_temp_file=False)
        for key in gguf.metadata:
            if key in _REWRITTEN_KEYS:
                continue
            entry = gguf.metadata.entries[key]
            value = gguf.metadata[key]
            writer.add_key_value(key, value, entry.value_type, sub_type=entry.element_type)
        writer.add_file_type(file_type)
        layout = []
        for info in gguf.tensors.values():
            dtype = np.float32 if len(info.shape) == 1 else np_type
            layout.append((info.name, dtype))
            nbytes = info.n_elements * np.dtype(dtype).itemsize
            writer.add_tensor_info(info.name, info.shape, np.dtype(dtype), nbytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name, dtype in layout:
            if progress is not None:
                progress(name)
            writer.write_tensor_data(gguf.tensor(name).astype(dtype, copy=False))
        writer.close()
    return target
