"""CLI commands over the GGUF source: ``dequant`` and ``inspect``."""

from __future__ import annotations

from pathlib import Path

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from anepack.cli.output import console, emit, err_console, json_option, model_argument
from anepack.source.default_model import resolve_model
from anepack.source.gguf_file import open_gguf


def progress_bar(description: str, total: int) -> tuple[Progress, int]:
    """A rich progress bar on stderr, so ``--json`` output on stdout stays clean."""
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[item]}"),
        console=err_console,
        transient=True,
    )
    return bar, bar.add_task(description, total=total, item="")


@click.command()
@click.argument("source", type=click.Path(dir_okay=False))
@click.argument("target", type=click.Path(dir_okay=False))
@click.option("--type", "out_type", type=click.Choice(["f32", "f16"]), default="f32", show_default=True)
@json_option
def dequant(source: str, target: str, out_type: str, as_json: bool) -> None:
    """Copy SOURCE to TARGET with every tensor dequantized, keeping all metadata."""
    from anepack.source.dequant import dequantize_gguf

    with open_gguf(source) as gguf:
        total = len(gguf.tensors)
    bar, task = progress_bar("dequantizing", total)
    with bar:
        dequantize_gguf(source, target, out_type, progress=lambda name: bar.update(task, advance=1, item=name))
    document = {"source": source, "target": target, "type": out_type, "bytes": Path(target).stat().st_size}
    emit(document, as_json, lambda d: console.print(f"wrote {d['target']} ({d['type']}, {d['bytes']:,} bytes)"))


def _render_inspect(doc: dict) -> None:
    console.print(f"[bold]{doc['file']}[/bold]  architecture [bold]{doc['architecture']}[/bold], "
                  f"{doc['parameters']:,} parameters, {doc['bytes']:,} bytes")
    hyper = Table(title="hyperparameters", show_header=False)
    for key, value in doc["hyperparameters"].items():
        hyper.add_row(key, str(value))
    console.print(hyper)
    kinds = Table(title="parameters by tensor kind")
    for column in ("kind", "tensors", "parameters", "bytes", "types"):
        kinds.add_column(column, justify="left" if column in ("kind", "types") else "right")
    for kind, row in doc["by_kind"].items():
        kinds.add_row(kind, str(row["tensors"]), f"{row['parameters']:,}", f"{row['bytes']:,}", ",".join(row["types"]))
    console.print(kinds)
    types = Table(title="GGUF storage types")
    for column in ("type", "tensors", "parameters", "bytes"):
        types.add_column(column, justify="left" if column == "type" else "right")
    for name, row in doc["by_type"].items():
        types.add_row(name, str(row["tensors"]), f"{row['parameters']:,}", f"{row['bytes']:,}")
    console.print(types)
    with_stats = [t for t in doc["tensors"] if "excess_kurtosis" in t]
    if with_stats:
        stats = Table(title="outlier statistics (INT8 SQNR: what linear int8 would give)")
        for column in ("tensor", "shape", "type", "max|w|/std", "kurtosis", "int8-tensor dB", "int8-channel dB"):
            stats.add_column(column, justify="left" if column in ("tensor", "shape", "type") else "right")
        for t in with_stats:
            stats.add_row(t["name"], "x".join(map(str, t["shape"])), t["type"], f"{t['max_abs_over_std']:.1f}",
                          f"{t['excess_kurtosis']:.2f}", f"{t['int8_tensor_sqnr_db']:.1f}", f"{t['int8_channel_sqnr_db']:.1f}")
        console.print(stats)


@click.command("inspect")
@model_argument
@click.option("--stats/--no-stats", default=True, show_default=True, help="Per-tensor outlier statistics.")
@json_option
def inspect_command(model: str | None, stats: bool, as_json: bool) -> None:
    """Architecture, hyperparameters, parameter counts, GGUF types and outlier statistics."""
    from anepack.inspection import inspect_model

    with open_gguf(resolve_model(model)) as gguf:
        if stats:
            matrices = sum(1 for info in gguf.tensors.values() if len(info.shape) >= 2)
            bar, task = progress_bar("outlier statistics", matrices)
            with bar:
                document = inspect_model(gguf, True, lambda name: bar.update(task, advance=1, item=name))
        else:
            document = inspect_model(gguf, False)
    emit(document, as_json, _render_inspect)
