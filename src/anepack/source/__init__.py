"""GGUF in: the lazy reader, typed model configs, the default model and dequantized copies."""

from anepack.source.gguf_file import GGUFFile, Metadata, TensorInfo, open_gguf

__all__ = ["GGUFFile", "Metadata", "TensorInfo", "open_gguf"]
