"""CLI commands over the quantization engine: ``quantize-tensor`` and ``sweep``."""

from __future__ import annotations

import time

import click
from rich.table import Table

from anepack.cli.output import console, emit, err_console, json_option
from anepack.source.default_model import resolve_model
from anepack.source.gguf_file import open_gguf


def _measure(weight, fmt, importance, tensor, activations) -> dict:
    from anepack.quant.metrics import quality
    from anepack.validate.weights import quantize_tensor

    started = time.perf_counter()
    compressed = quantize_tensor(weight, fmt, importance, tensor)
    seconds = time.perf_counter() - started
    return {"format": compressed.format.spec, "seconds": seconds, "ane_safe": compressed.format.ane_safe,
            **quality(weight, compressed, activations)}


def _prepare(gguf, names: set[str], use_importance: bool):
    from anepack.validate.calibration import capture_inputs
    from anepack.validate.run import calibrate, calibration_tokens

    _, tokens = calibration_tokens(gguf)
    activations = capture_inputs(gguf, tokens, names)
    importance = calibrate(gguf) if use_importance else None
    return activations, importance


@click.command("quantize-tensor")
@click.argument("args", nargs=-1, required=True, metavar="[MODEL] TENSOR")
@click.option("--format", "formats", multiple=True, required=True, help="Format spec, e.g. lut4-g16 (repeatable).")
@click.option("--importance/--no-importance", default=True, show_default=True,
              help="Weight clustering and rounding by calibration activations.")
@json_option
def quantize_tensor(args: tuple[str, ...], formats: tuple[str, ...], importance: bool, as_json: bool) -> None:
    """Quantize one tensor and print its fidelity, bits per weight and time."""
    from anepack.quant import parse_format
    from anepack.source.weights import stored_name

    if len(args) > 2:
        raise click.UsageError("expected [MODEL] TENSOR")
    tensor = args[-1]
    parsed = [parse_format(spec) for spec in formats]
    with open_gguf(resolve_model(args[0] if len(args) == 2 else None)) as gguf:
        weight = gguf.tensor(stored_name(gguf, tensor))
        if weight.ndim < 2:
            raise click.BadParameter(f"{tensor} is a vector, not a weight matrix", param_hint="TENSOR")
        with err_console.status("calibrating"):
            activations, importance_vectors = _prepare(gguf, {tensor}, importance)
        results = [_measure(weight, fmt, importance_vectors, tensor, activations.get(tensor)) for fmt in parsed]
    document = {"model": str(gguf.path), "tensor": tensor, "shape": list(weight.shape),
                "importance": importance_vectors is not None and importance_vectors.get(tensor) is not None,
                "results": results}
    emit(document, as_json, _render_results)


def _output_sqnr(result: dict, spec: str) -> str:
    """Output SQNR, or "-" for a tensor no linear reads (an embedding table)."""
    return format(result["output_sqnr_db"], spec) if "output_sqnr_db" in result else "-"


def _render_results(doc: dict) -> None:
    table = Table(title=f"{doc['tensor']} {'x'.join(map(str, doc['shape']))}"
                        f" ({'importance-weighted' if doc['importance'] else 'unweighted'})")
    for column in ("format", "bits/weight", "weight SQNR dB", "output SQNR dB", "cosine", "max abs err", "seconds", "ANE-safe"):
        table.add_column(column, justify="left" if column == "format" else "right")
    for r in doc["results"]:
        table.add_row(r["format"], f"{r['bits_per_weight']:.3f}", f"{r['sqnr_db']:.2f}", _output_sqnr(r, ".2f"),
                      f"{r['cosine']:.6f}", f"{r['max_abs_error']:.4g}", f"{r['seconds']:.2f}",
                      "yes" if r["ane_safe"] else "[red]no[/red]")
    console.print(table)


@click.command()
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("--layers", "layer_list", default="0", show_default=True, help="Layers to sweep, e.g. 0,8,17.")
@click.option("--formats", "format_list", default="int8-tensor,int8-channel,int4-block32,lut4-g16,lut6-g16,lut8-g8",
              show_default=True, help="Comma-separated format specs.")
@click.option("--importance/--no-importance", default=True, show_default=True)
@json_option
def sweep(model: str | None, layer_list: str, format_list: str, importance: bool, as_json: bool) -> None:
    """A formats x tensors table: weight SQNR, output SQNR and bits per weight."""
    from anepack.quant import parse_format
    from anepack.validate.recipes import parse_layers, tensor_layer

    parsed = [parse_format(spec) for spec in format_list.split(",") if spec.strip()]
    layers = parse_layers(layer_list)
    with open_gguf(resolve_model(model)) as gguf:
        names = [info.name for info in gguf.tensors.values()
                 if len(info.shape) >= 2 and tensor_layer(info.name) in layers]
        if not names:
            raise click.BadParameter(f"no weight matrices in layers {layer_list}", param_hint="--layers")
        with err_console.status("calibrating"):
            activations, importance_vectors = _prepare(gguf, set(names), importance)
        rows = []
        with err_console.status("quantizing") as status:
            for name in names:
                weight = gguf.tensor(name)
                for fmt in parsed:
                    status.update(f"{name} {fmt.spec}")
                    rows.append({"tensor": name, **_measure(weight, fmt, importance_vectors, name, activations.get(name))})
    document = {"model": str(gguf.path), "layers": sorted(layers), "formats": [f.spec for f in parsed],
                "importance": importance, "results": rows}
    emit(document, as_json, _render_sweep)


def _render_sweep(doc: dict) -> None:
    table = Table(title="weight SQNR / output SQNR (dB) and bits per weight, per tensor and format")
    table.add_column("tensor")
    for spec in doc["formats"]:
        table.add_column(spec, justify="right")
    by_tensor: dict[str, dict] = {}
    for row in doc["results"]:
        by_tensor.setdefault(row["tensor"], {})[row["format"]] = row
    for tensor, cells in by_tensor.items():
        table.add_row(tensor, *(f"{cells[s]['sqnr_db']:.1f} / {_output_sqnr(cells[s], '.1f')} @ {cells[s]['bits_per_weight']:.2f}"
                                for s in doc["formats"]))
    console.print(table)
