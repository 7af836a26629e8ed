"""CLI commands over the run history: ``runs``, ``compare`` and ``report``."""

from __future__ import annotations

import click
from rich.table import Table

from anepack.cli.output import console, emit, json_option
from anepack.validate.history import RunStore

db_option = click.option("--db", "db_path", type=click.Path(dir_okay=False),
                         help="Run history file (default: $ANEPACK_DB, else runs.sqlite in the user data directory).")


def _run_id(store: RunStore, text: str) -> int:
    """A RUN argument: a run id, or ``latest`` for the newest run."""
    if text == "latest":
        return store.latest()
    try:
        return int(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is neither a run id nor 'latest'") from None


def _cell(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _verdict(row: dict) -> str:
    if row["passed"]:
        return "[green]pass[/green]"
    return "[yellow]forced[/yellow]" if row["forced"] else "[red]fail[/red]"


def _render_runs(doc: dict) -> None:
    table = Table(title=f"runs in {doc['db']} ({len(doc['runs'])} of {doc['total']}, newest first)")
    for column in ("id", "created", "kind", "model", "recipe", "verdict", "layer cos", "logit cos", "top-1", "bits"):
        table.add_column(column, justify="left" if column in ("created", "kind", "model", "recipe", "verdict") else "right")
    for row in doc["runs"]:
        table.add_row(str(row["id"]), row["created"], row["kind"], row["model"] or "-", row["recipe"] or "-",
                      _verdict(row), _cell(row["min_layer_cosine"], 5), _cell(row["min_logit_cosine"], 5),
                      _cell(row["min_top1"], 3), _cell(row["bits"], 2))
    console.print(table)


@click.command()
@db_option
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True, help="Show at most this many runs.")
@json_option
def runs(db_path: str | None, limit: int, as_json: bool) -> None:
    """List recorded runs, newest first, with their ids and headline numbers."""
    store = RunStore(db_path)
    if not store.path.exists():  # nothing recorded yet: an empty history, not an error
        document = {"db": str(store.path), "total": 0, "runs": []}
    else:
        document = {"db": str(store.path), "total": len(store), "runs": store.list(limit)}
    emit(document, as_json, _render_runs)


def _delta_cells(pair: dict, digits: int, higher_is_better: bool = True) -> list[str]:
    delta = pair["delta"]
    if delta is None or delta == 0:
        colour = None
    else:
        colour = "green" if (delta > 0) == higher_is_better else "red"
    shown = "-" if delta is None else f"{delta:+.{digits}f}"
    return [_cell(pair["a"], digits), _cell(pair["b"], digits), f"[{colour}]{shown}[/{colour}]" if colour else shown]


def _render_compare(doc: dict) -> None:
    a, b = doc["a"], doc["b"]
    console.print(f"A = run {a['id']} ({a['kind']}, {a['recipe'] or 'no recipe'}, {'pass' if a['passed'] else 'fail'}), "
                  f"B = run {b['id']} ({b['kind']}, {b['recipe'] or 'no recipe'}, {'pass' if b['passed'] else 'fail'}); "
                  "delta = B - A")
    if doc["same_model"] is False:
        console.print("[yellow]the two runs are of different model files[/yellow]")
    summary = Table(title="headline")
    for column in ("measure", "A", "B", "delta"):
        summary.add_column(column, justify="left" if column == "measure" else "right")
    for key, digits in (("min_layer_cosine", 5), ("min_logit_cosine", 5), ("min_top1", 3), ("bits", 2)):
        summary.add_row(key, *_delta_cells(doc["summary"][key], digits, higher_is_better=key != "bits"))
    console.print(summary)
    if doc["layers"]:
        layers = Table(title="per layer: min hidden-state cosine")
        for column in ("layer", "isolated A", "isolated B", "delta", "cumulative A", "cumulative B", "delta"):
            layers.add_column(column, justify="right")
        for row in doc["layers"]:
            layers.add_row(str(row["layer"]), *_delta_cells(row["isolated_min"], 5), *_delta_cells(row["cumulative_min"], 5))
        console.print(layers)
    if doc["prompts"]:
        prompts = Table(title="per prompt")
        for column in ("prompt", "min cos A", "min cos B", "delta", "mean KL A", "mean KL B", "delta",
                       "top-1 A", "top-1 B", "delta"):
            prompts.add_column(column, justify="left" if column == "prompt" else "right")
        for row in doc["prompts"]:
            prompts.add_row(row["name"], *_delta_cells(row["min_cosine"], 5),
                            *_delta_cells(row["mean_kl"], 4, higher_is_better=False),
                            *_delta_cells(row["top1_agreement"], 3))
        console.print(prompts)


@click.command()
@click.argument("run_a", metavar="A")
@click.argument("run_b", metavar="B")
@db_option
@json_option
def compare(run_a: str, run_b: str, db_path: str | None, as_json: bool) -> None:
    """Per-layer and per-prompt differences of run B from run A (ids or 'latest')."""
    store = RunStore(db_path)
    emit(store.compare(_run_id(store, run_a), _run_id(store, run_b)), as_json, _render_compare)


@click.command()
@click.argument("run", metavar="RUN")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="HTML file to write.")
@db_option
@json_option
def report(run: str, out_path: str, db_path: str | None, as_json: bool) -> None:
    """Write RUN (an id or 'latest') as one self-contained HTML report with plots."""
    from anepack.report.html import write_report

    store = RunStore(db_path)
    run_id = _run_id(store, run)
    record = store.get(run_id)
    write_report(record, out_path, run_id)
    document = {"run": run_id, "report": out_path, "passed": record["passed"]}
    emit(document, as_json, lambda d: console.print(
        f"wrote {d['report']} for run {d['run']} ({'passed' if d['passed'] else 'failed'})"))
