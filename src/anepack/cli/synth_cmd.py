"""CLI command ``synth``: write a small synthetic GGUF model for tests."""

from __future__ import annotations

import click

from anepack.cli.output import console, emit, json_option
from anepack.synth import ARCHITECTURES, WEIGHT_TYPES, parameter_count, synthetic_dims, write_synthetic_gguf


@click.command("synth")
@click.option("--arch", type=click.Choice(sorted(ARCHITECTURES)), default="gemma3", show_default=True)
@click.option("--layers", type=int, default=None, help="Number of layers (default: the architecture's).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--type", "weight_type", type=click.Choice(list(WEIGHT_TYPES)), default="f32", show_default=True,
              help="Storage type of the 2-D weights; norms stay F32.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="GGUF file to write.")
@json_option
def synth(arch: str, layers: int | None, seed: int, weight_type: str, out: str, as_json: bool) -> None:
    """Write a small, seeded GGUF model that llama.cpp can run."""
    path = write_synthetic_gguf(out, arch, layers=layers, seed=seed, weight_type=weight_type)
    dims = synthetic_dims(arch, path, layers)
    document = {
        "path": str(path),
        "arch": arch,
        "layers": dims.n_layer,
        "params": parameter_count(dims),
        "bytes": path.stat().st_size,
        "type": weight_type,
        "seed": seed,
    }
    emit(document, as_json, _render)


def _render(doc: dict) -> None:
    layers = f"{doc['layers']} layer" + ("s" if doc["layers"] != 1 else "")
    summary = (f"{doc['arch']}, {layers}, {doc['params']:,} parameters, {doc['bytes']:,} bytes "
               f"({doc['type']}, seed {doc['seed']})")
    # Plain text: a path may contain rich markup characters and must not be wrapped.
    console.print(f"{doc['path']}\n{summary}", markup=False, highlight=False, soft_wrap=True)
