"""Bits per weight of a recipe on a model, every payload byte counted, without quantizing.

Each format knows how many bytes Core ML stores for a weight of a given shape (indices or
integer data, LUTs, scales, offsets), so a recipe's cost is known before any clustering runs.
Reports give three averages: over the transformer layers' matrices, for the LM head, and over
everything shipped in shards (layers, norms kept in fp16, LM head); the host-side embedding
table is reported on its own.
"""

from __future__ import annotations

from anepack.quant.formats import parse_format
from anepack.source.gguf_file import GGUFFile
from anepack.source.weights import EMBEDDING, LM_HEAD, stored_name
from anepack.validate.recipes import Recipe
from anepack.validate.weights import quantizable_tensors

FP16 = parse_format("fp16")


def recipe_bits(gguf: GGUFFile, recipe: Recipe) -> tuple[list[dict], dict[str, float]]:
    """Per-tensor rows (name, layer, kind, format, bits_per_weight, parameters) and the averages."""
    from anepack.validate.record import tensor_entry

    gguf.config  # parsed first: a model anepack cannot read is refused in one line, not counted
    rows = []
    layer_bytes = layer_params = 0
    head_bytes = head_params = 0
    for name in quantizable_tensors(gguf):
        shape = gguf.info(stored_name(gguf, name)).shape
        fmt = recipe.format_for(name)
        nbytes = fmt.payload_bytes(shape)
        params = 1
        for dim in shape:
            params *= dim
        rows.append(tensor_entry(name, fmt.spec, 8.0 * nbytes / params, params))
        if name == LM_HEAD:
            head_bytes, head_params = nbytes, params
        else:
            layer_bytes += nbytes
            layer_params += params
    norm_params = sum(
        info.n_elements for info in gguf.tensors.values() if len(info.shape) == 1
    )
    shipped_bytes = layer_bytes + head_bytes + 2 * norm_params
    shipped_params = layer_params + head_params + norm_params
    embedding = gguf.info(EMBEDDING)
    summary = {
        "layers_average": 8.0 * layer_bytes / layer_params,
        "lm_head": 8.0 * head_bytes / head_params,
        "shipped_average": 8.0 * shipped_bytes / shipped_params,
        "embedding_host": 8.0 * FP16.payload_bytes(embedding.shape) / embedding.n_elements,
    }
    return rows, summary
