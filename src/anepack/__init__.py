"""anepack: GGUF language models to Core ML shards that stay on the Apple Neural Engine.

The package reads as the pipeline: ``source`` (GGUF in), ``reference`` (exact numpy forward
pass), ``quant`` (Core ML weight formats), validators, Core ML shards, reports.
"""

__version__ = "0.1.0"
