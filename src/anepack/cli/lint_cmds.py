"""CLI command ``anepack lint``: the residency lint of a build, as tables or one JSON document."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from anepack.cli.output import console, emit, json_option


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:.1f} KiB"


def _percent(share: float) -> str:
    return f"{100 * share:.1f}%"


def _rule_list(rules: list[dict]) -> str:
    return ", ".join(rule["rule"] + (f" ({rule['weight']})" if "weight" in rule else "") for rule in rules)


def _render_packages(doc: dict) -> None:
    table = Table(title=f"predicted Neural Engine residency of {doc['path']}")
    for column in ("package", "ops on ANE", "op share", "weights on ANE", "byte share", "all on ANE"):
        table.add_column(column, justify="left" if column == "package" else "right")
    rows = [(Path(package["package"]).name, package["totals"], package["all_on_ane"]) for package in doc["packages"]]
    if len(rows) > 1:
        rows.append(("total", doc["totals"], doc["all_on_ane"]))
    for name, totals, all_on_ane in rows:
        table.add_row(
            name, f"{totals['ops_on_ane']} / {totals['ops']}", _percent(totals["op_share"]),
            f"{_size(totals['weight_bytes_on_ane'])} / {_size(totals['weight_bytes'])}",
            _percent(totals["byte_share"]),
            "yes" if all_on_ane else "[red]no[/red]",
        )
    console.print(table)


def _render_fallbacks(doc: dict, measured: bool) -> None:
    # One row per op and reason, with the functions (prefill, decode) that hold it merged.
    rows: dict[tuple, list[str]] = {}
    for package in doc["packages"]:
        for op in package["ops"]:
            if op["device"] == "ane":
                continue
            key = (Path(package["package"]).name, op["output"], op["op_type"], op["device"],
                   op["measured"] if measured else None, _rule_list(op["rules"]))
            rows.setdefault(key, []).append(op["function"])
    if not rows:
        return
    table = Table(title="ops predicted off the Neural Engine")
    columns = ["package", "op", "type", "functions", "predicted", *(["measured"] if measured else []), "rules (weight)"]
    for column in columns:
        table.add_column(column)
    for (package, output, op_type, device, measured_device, rules), functions in rows.items():
        cells = [package, output, op_type, ", ".join(functions), device]
        table.add_row(*cells, *([measured_device] if measured else []), rules)
    console.print(table)


def _render_rules(doc: dict) -> None:
    if not doc["rules_fired"]:
        return
    table = Table(title="rules that fired")
    for column in ("rule", "device", "ops", "weights", "weight bytes", "reason", "source"):
        table.add_column(column, justify="right" if column in ("ops", "weights", "weight bytes") else "left")
    for rule in doc["rules_fired"]:
        table.add_row(rule["rule"], rule["device"], str(rule["ops"]), str(rule["weights"]),
                      _size(rule["weight_bytes"]), rule["reason"], rule["source"])
    console.print(table)


def _render_measured(doc: dict) -> None:
    agreement = doc["measured"]
    console.print(
        f"Core ML's compute plan: {agreement['ops_on_ane']} of {agreement['ops']} ops on the Neural Engine; "
        f"the prediction agrees on {agreement['agree']} of {agreement['ops']}"
    )
    disagreements = [(Path(package["package"]).name, op) for package in doc["packages"] for op in package["ops"]
                     if op["measured"] != op["device"]]
    if not disagreements:
        return
    table = Table(title="ops where Core ML's plan differs from the prediction")
    for column in ("package", "function", "op", "type", "predicted", "measured"):
        table.add_column(column)
    for package, op in disagreements:
        table.add_row(package, op["function"], op["output"], op["op_type"], op["device"], op["measured"])
    console.print(table)


def render_lint(doc: dict) -> None:
    measured = "measured" in doc
    _render_packages(doc)
    _render_fallbacks(doc, measured)
    _render_rules(doc)
    if measured:
        _render_measured(doc)
    totals = doc["totals"]
    if doc["all_on_ane"]:
        console.print("[green]verdict: every op and every weight is predicted on the Neural Engine[/green]")
    else:
        off_bytes = _size(totals["weight_bytes"] - totals["weight_bytes_on_ane"])
        console.print(f"[red]verdict: {totals['ops'] - totals['ops_on_ane']} ops and {off_bytes} of weights "
                      "are predicted off the Neural Engine[/red]")


@click.command("lint")
@click.argument("shards", type=click.Path(exists=True, file_okay=False))
@click.option("--measure", is_flag=True,
              help="Also read Core ML's compute plan (macOS 14.4+) and show its device per op beside the prediction.")
@json_option
def lint(shards: str, measure: bool, as_json: bool) -> None:
    """Predict which ops and weights of SHARDS (a build directory or one .mlpackage) run on the
    Neural Engine, with the rule and source behind every predicted fallback.

    Exits 1 when anything is predicted off the Neural Engine, so scripts can gate on it."""
    from anepack.coreml.lint import lint_shards

    document = lint_shards(shards, measure=measure)
    emit(document, as_json, render_lint)
    if not document["all_on_ane"]:
        raise SystemExit(1)
