"""CLI command ``synth``: write a small synthetic GGUF model for tests."""

from __future__ import annotations

import click

from anepack.cli.output import console, emit, json_option
from anepack.synth import (
    ARCHITECTURES,
    WEIGHT_TYPES,
    Gemma4Dims,
    parameter_count,
    preset,
    synthetic_dims,
    write_synthetic_gguf,
)


@click.command("synth")
@click.option("--arch", type=click.Choice(sorted(ARCHITECTURES)), default="gemma3", show_default=True)
@click.option("--moe", is_flag=True, help="gemma4: routed experts beside the dense MLP in every layer.")
@click.option("--per-layer-embeddings", "per_layer", is_flag=True,
              help="gemma4: E2B-style per-layer embeddings and KV sharing.")
@click.option("--dims", "variant", type=click.Choice(sorted(Gemma4Dims.PRESETS)), default=None,
              help="gemma4: named dimensions; 26b-a4b is the real model's (bf16 unless --type).")
@click.option("--llama3-rope", is_flag=True, help="llama: Llama 3.1+'s per-pair RoPE factors (rope_freqs).")
@click.option("--layers", type=int, default=None, help="Number of layers (default: the architecture's).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--type", "weight_type", type=click.Choice(list(WEIGHT_TYPES)), default=None,
              help="Storage type of the 2-D and expert weights; norms stay F32.  [default: f32]")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="GGUF file to write.")
@json_option
def synth(arch: str, moe: bool, per_layer: bool, variant: str | None, llama3_rope: bool, layers: int | None,
          seed: int, weight_type: str | None, out: str, as_json: bool) -> None:
    """Write a small, seeded GGUF model that llama.cpp can run."""
    if moe and variant is not None and preset(arch, variant, out)[0].get("n_expert"):
        moe = False  # named dimensions of an MoE model (26b-a4b): --moe says it again
    chosen = [name for name, flag in (("moe", moe), ("ple", per_layer), (variant, variant is not None)) if flag]
    if len(chosen) > 1:
        raise click.UsageError("choose at most one of --moe, --per-layer-embeddings and --dims "
                               "(--moe goes with an MoE model's --dims)")
    dims, default_type = preset(arch, chosen[0], out) if chosen else ({}, "f32")
    if llama3_rope:
        if arch != "llama":
            raise click.UsageError("--llama3-rope goes with --arch llama")
        dims = dims | {"llama3_rope": True}
    weight_type = weight_type or default_type
    if as_json:
        path = write_synthetic_gguf(out, arch, layers=layers, seed=seed, weight_type=weight_type, **dims)
    else:
        with console.status("writing") as status:
            path = write_synthetic_gguf(out, arch, layers=layers, seed=seed, weight_type=weight_type,
                                        progress=lambda name: status.update(f"writing {name}"), **dims)
    model = synthetic_dims(arch, path, layers, **dims)
    document = {
        "path": str(path),
        "arch": arch,
        "variant": chosen[0] if chosen else None,
        "layers": model.n_layer,
        "params": parameter_count(model),
        "bytes": path.stat().st_size,
        "type": weight_type,
        "seed": seed,
    }
    emit(document, as_json, _render)


def _render(doc: dict) -> None:
    layers = f"{doc['layers']} layer" + ("s" if doc["layers"] != 1 else "")
    variant = f" ({doc['variant']})" if doc["variant"] else ""
    summary = (f"{doc['arch']}{variant}, {layers}, {doc['params']:,} parameters, {doc['bytes']:,} bytes "
               f"({doc['type']}, seed {doc['seed']})")
    # Plain text: a path may contain rich markup characters and must not be wrapped.
    console.print(f"{doc['path']}\n{summary}", markup=False, highlight=False, soft_wrap=True)
