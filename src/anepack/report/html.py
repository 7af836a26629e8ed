"""One run record as a single self-contained HTML page: verdict, plots, blame table, bits.

Plots are drawn with matplotlib's object-oriented ``Figure`` API (no pyplot, so no GUI
backend is ever touched) and embedded as base64 PNGs; styles are inline. The page loads
nothing from anywhere, so it can be mailed, archived or opened offline.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import tomllib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from anepack.errors import AnepackError
from anepack.validate.record import RunRecord, summarize

_CSS = """
body { font: 15px/1.45 -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; color: #1d2330;
       max-width: 1100px; margin: 24px auto; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ccd; }
.verdict { padding: 14px 18px; border-radius: 6px; color: #fff; margin: 16px 0; }
.verdict strong { font-size: 24px; letter-spacing: 1px; } .verdict ul { margin: 6px 0 0; }
.pass { background: #1d7a3a; } .fail { background: #b3261e; } .forced { background: #b26a00; }
table { border-collapse: collapse; margin: 8px 0; font-size: 14px; }
th, td { border: 1px solid #ccd; padding: 3px 9px; text-align: right; }
th { background: #eef0f5; } td.text, th.text { text-align: left; }
tr.bad td { background: #fbe4e2; }
img.plot { max-width: 100%; display: block; margin: 8px 0; }
p.no-plot { color: #666; font-style: italic; }
pre { background: #f4f5f8; padding: 10px; overflow-x: auto; font-size: 13px; }
"""

_LAYER_COLOURS = ("#3b6fb6", "#e08a2c")


def _number(value: float | None, digits: int = 5) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return f"{value:.{digits}f}"


def _table(table_id: str, headers: Sequence[str] | None, rows: Iterable[Sequence[object]],
           text_columns: int = 1, bad_rows: Sequence[bool] | None = None) -> str:
    """An HTML table; the first ``text_columns`` columns are left-aligned text, the rest numbers."""

    def cell(tag: str, index: int, value: object) -> str:
        css = ' class="text"' if index < text_columns else ""
        return f"<{tag}{css}>{html.escape(str(value))}</{tag}>"

    head = ""
    if headers is not None:
        head = "<thead><tr>" + "".join(cell("th", i, h) for i, h in enumerate(headers)) + "</tr></thead>"
    body = []
    for row_index, row in enumerate(rows):
        css = ' class="bad"' if bad_rows is not None and bad_rows[row_index] else ""
        body.append(f"<tr{css}>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>")
    return f'<table id="{table_id}">{head}<tbody>{"".join(body)}</tbody></table>'


def _image(figure: Figure, plot_id: str, alt: str) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img class="plot" id="{plot_id}" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _missing(plot_id: str, sentence: str) -> str:
    return f'<p class="no-plot" id="{plot_id}-missing">{html.escape(sentence)}</p>'


def _zoomed_limits(values: Iterable[float | None], threshold: float) -> tuple[float, float]:
    """Y limits that show cosines near 1 in detail but always include the threshold."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    low = min([*finite, threshold])
    span = max(1.0 - low, 1e-4)
    return low - 0.15 * span, 1.0 + 0.05 * span


def _as_float(value: float | None) -> float:
    return math.nan if value is None else float(value)


def layer_cosine_plot(record: RunRecord) -> str:
    layers = sorted(record["layers"], key=lambda layer: layer["layer"])
    if not layers:
        return _missing("plot-layer-cosine", "No per-layer results in this run, so no per-layer cosine plot.")
    threshold = record["thresholds"]["min_layer_cosine"]
    figure = Figure(figsize=(10, 4.2), layout="constrained")
    axes = figure.subplots()
    positions = np.arange(len(layers))
    series = (("isolated_min", "isolated (only this layer quantized)"),
              ("cumulative_min", "cumulative (this layer and all before it)"))
    for offset, colour, (key, label) in zip((-0.2, 0.2), _LAYER_COLOURS, series):
        axes.bar(positions + offset, [_as_float(layer.get(key)) for layer in layers], width=0.4,
                 color=colour, label=label)
    axes.axhline(threshold, color="#b3261e", linestyle="--", linewidth=1.5, label=f"threshold {threshold}")
    axes.set_ylim(*_zoomed_limits([layer.get(k) for layer in layers for k, _ in series], threshold))
    axes.set_xticks(positions, [str(layer["layer"]) for layer in layers])
    for tick, layer in zip(axes.get_xticklabels(), layers):
        if not layer["passed"]:
            tick.set_color("#b3261e")
            tick.set_fontweight("bold")
    axes.set_xlabel("layer (failing layers in red)")
    axes.set_ylabel("min hidden-state cosine")
    axes.set_title("Per-layer minimum cosine against the unquantized reference")
    figure.legend(loc="outside lower center", ncols=3, fontsize=9)
    axes.grid(axis="y", alpha=0.3)
    return _image(figure, "plot-layer-cosine",
                  "Per-layer minimum hidden-state cosine, isolated and cumulative, with the threshold line")


def position_cosine_plot(record: RunRecord) -> str:
    prompts = [p for p in record["prompts"] if p.get("cosine_per_position")]
    if not prompts:
        return _missing("plot-position-cosine", "No per-position logit results in this run, so no logit plot.")
    threshold = record["thresholds"]["min_logit_cosine"]
    figure = Figure(figsize=(10, 4.2), layout="constrained")
    axes = figure.subplots()
    for prompt in prompts:
        cosines = [_as_float(v) for v in prompt["cosine_per_position"]]
        (line,) = axes.plot(range(len(cosines)), cosines, marker="o", markersize=3, linewidth=1.3,
                            label=prompt["name"])
        failing = prompt.get("first_failing_position")
        if failing is not None and failing < len(cosines):
            axes.plot([failing], [cosines[failing]], marker="X", markersize=11, color=line.get_color(),
                      markeredgecolor="#1d2330", linestyle="none")
    axes.axhline(threshold, color="#b3261e", linestyle="--", linewidth=1.5, label=f"threshold {threshold}")
    axes.set_ylim(*_zoomed_limits([v for p in prompts for v in p["cosine_per_position"]], threshold))
    axes.set_xlabel("token position (X: first position below the threshold)")
    axes.set_ylabel("logit cosine")
    axes.set_title("Per-position logit cosine against the golden reference")
    figure.legend(loc="outside lower center", ncols=min(len(prompts) + 1, 6), fontsize=9)
    axes.grid(alpha=0.3)
    return _image(figure, "plot-position-cosine", "Per-position logit cosine, one line per prompt, with the threshold line")


def _bits_grid(record: RunRecord) -> tuple[list[int], list[str], np.ndarray]:
    """Parameter-weighted bits per weight, rows = layers, columns = tensor kinds in first-seen order."""
    in_layers = [t for t in record["tensors"] if t.get("layer") is not None]
    layers = sorted({t["layer"] for t in in_layers})
    kinds = list(dict.fromkeys(t["kind"] for t in in_layers))
    bit_sums = np.zeros((len(layers), len(kinds)))
    weights = np.zeros_like(bit_sums)
    for tensor in in_layers:
        row, column = layers.index(tensor["layer"]), kinds.index(tensor["kind"])
        parameters = max(int(tensor.get("parameters") or 0), 1)
        bit_sums[row, column] += tensor["bits_per_weight"] * parameters
        weights[row, column] += parameters
    with np.errstate(invalid="ignore", divide="ignore"):
        return layers, kinds, np.where(weights > 0, bit_sums / weights, np.nan)


def bits_heatmap(record: RunRecord) -> str:
    layers, kinds, grid = _bits_grid(record)
    if not layers:
        return _missing("plot-bits-heatmap", "No per-tensor formats in this run, so no bits heatmap.")
    figure = Figure(figsize=(10, min(2.0 + 0.32 * len(layers), 16)), layout="constrained")
    axes = figure.subplots()
    colours = figure.colorbar(
        axes.imshow(np.ma.masked_invalid(grid), aspect="auto", interpolation="nearest",
                    cmap=colormaps["viridis"].with_extremes(bad="#dddddd")), ax=axes)
    colours.set_label("bits per weight")
    axes.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    axes.set_xticks(range(len(kinds)), [kind.removesuffix(".weight") for kind in kinds],
                    rotation=30, ha="right")
    if grid.size <= 400:
        middle = np.nanmean(grid)
        for (row, column), value in np.ndenumerate(grid):
            if math.isfinite(value):
                axes.text(column, row, f"{value:.2f}", ha="center", va="center", fontsize=8,
                          color="white" if value < middle else "black")
    axes.set_ylabel("layer")
    axes.set_title("Bits per weight by layer and tensor kind (grey: not in this run)")
    return _image(figure, "plot-bits-heatmap", "Heatmap of bits per weight, layers by tensor kind")


def recipe_description(record: RunRecord) -> str | None:
    """The ``description`` line of the recipe's TOML, if the record has a readable one."""
    recipe = record.get("recipe")
    if not recipe or not recipe.get("toml"):
        return None
    try:
        description = tomllib.loads(recipe["toml"]).get("description")
    except tomllib.TOMLDecodeError:
        return None
    return description if isinstance(description, str) else None


def _verdict(record: RunRecord) -> str:
    thresholds = record["thresholds"]
    reasons = []
    for layer in record["layers"]:
        if not layer["passed"]:
            lowest = min((v for v in (layer.get("isolated_min"), layer.get("cumulative_min")) if v is not None),
                         default=None)
            reasons.append(f"layer {layer['layer']}: min hidden-state cosine {_number(lowest)} "
                           f"(threshold {thresholds['min_layer_cosine']})")
    for prompt in record["prompts"]:
        if not prompt["passed"]:
            where = prompt.get("first_failing_position")
            at = "" if where is None else f", first below {thresholds['min_logit_cosine']} at position {where}"
            reasons.append(f"prompt {prompt['name']!r}: min logit cosine {_number(prompt['min_cosine'])}{at}")
    pooled = record.get("top1_pooled")
    if pooled is not None and pooled < thresholds["min_top1"]:
        reasons.append(f"top-1 agreement over every position {_number(pooled, 3)} "
                       f"(threshold {thresholds['min_top1']})")
    if record["passed"]:
        css, word = "pass", "PASSED"
        sentence = (f"Every measured layer and prompt met its threshold (layer cosine ≥ {thresholds['min_layer_cosine']}, "
                    f"logit cosine ≥ {thresholds['min_logit_cosine']}, top-1 ≥ {thresholds['min_top1']}).")
    elif record["forced"]:
        css, word = "forced", "FAILED, FORCED THROUGH"
        sentence = "The run failed its thresholds and the gate was overridden with --force."
    else:
        css, word = "fail", "FAILED"
        sentence = "The run did not meet its thresholds."
    items = "".join(f"<li>{html.escape(reason)}</li>" for reason in reasons)
    return (f'<div class="verdict {css}" id="verdict"><strong>{word}</strong> '
            f'<span>{html.escape(sentence)}</span>{f"<ul>{items}</ul>" if items else ""}</div>')


def _facts(record: RunRecord) -> str:
    recipe = record.get("recipe") or {}
    summary = summarize(record)
    rows = [
        ("kind", record["kind"]),
        ("created", record["created"]),
        ("model", record.get("model") or "–"),
        ("fingerprint", record.get("fingerprint") or "–"),
        ("recipe", recipe.get("name") or "–"),
        ("recipe description", recipe_description(record) or "–"),
        ("thresholds", ", ".join(f"{k} {v}" for k, v in record["thresholds"].items())),
        ("worst layer cosine", _number(summary["min_layer_cosine"])),
        ("worst logit cosine", _number(summary["min_logit_cosine"])),
        ("top-1 agreement, all positions", _number(record.get("top1_pooled"), 3)),
        ("worst prompt's top-1 agreement", _number(summary["min_top1"], 3)),
    ]
    return _table("facts", None, rows, text_columns=2)


def _bits_section(record: RunRecord) -> str:
    labels = {"layers_average": "layers, average", "lm_head": "LM head", "shipped_average": "shipped, average",
              "embedding_host": "embedding (on the host)"}
    bits = record["bits"]
    if not bits:
        return "<p>No bits summary in this run.</p>"
    return _table("bits-summary", ("part", "bits per weight"),
                  [(labels.get(key, key), _number(value, 2)) for key, value in bits.items()])


def _layers_section(record: RunRecord) -> str:
    layers = sorted(record["layers"], key=lambda layer: layer["layer"])
    parts = [layer_cosine_plot(record)]
    if layers:
        parts.append(_table(
            "layer-table", ("layer", "isolated min", "isolated mean", "cumulative min", "cumulative mean", "passed"),
            [(layer["layer"], _number(layer.get("isolated_min")), _number(layer.get("isolated_mean")),
              _number(layer.get("cumulative_min")), _number(layer.get("cumulative_mean")),
              "yes" if layer["passed"] else "no") for layer in layers],
            bad_rows=[not layer["passed"] for layer in layers]))
    blame_rows, bad = [], []
    for layer in layers:
        for entry in sorted(layer.get("blame", []), key=lambda e: -e["share"]):
            blame_rows.append((layer["layer"], entry["tensor"], entry["format"], _number(entry["bits_per_weight"], 2),
                               _number(entry["min_cosine"]), f"{100 * entry['share']:.1f}%"))
            bad.append(not layer["passed"])
    parts.append("<h2>Blame</h2>")
    if blame_rows:
        parts.append("<p>Each tensor quantized alone: its minimum cosine and its share of the layer's loss.</p>")
        parts.append(_table("blame-table", ("layer", "tensor", "format", "bits/weight", "min cosine alone", "share"),
                            blame_rows, text_columns=3, bad_rows=bad))
    else:
        parts.append("<p>No blame entries in this run.</p>")
    return "".join(parts)


def _prompts_section(record: RunRecord) -> str:
    prompts = record["prompts"]
    parts = [position_cosine_plot(record)]
    if prompts:
        parts.append(_table(
            "prompt-table", ("prompt", "tokens", "min cosine", "mean cosine", "max KL", "mean KL", "top-1",
                             "first failing position", "passed"),
            [(p["name"], p["tokens"], _number(p["min_cosine"]), _number(p["mean_cosine"]), f"{p['max_kl']:.2e}",
              f"{p['mean_kl']:.2e}", _number(p["top1_agreement"], 3),
              "–" if p.get("first_failing_position") is None else p["first_failing_position"],
              "yes" if p["passed"] else "no") for p in prompts],
            bad_rows=[not p["passed"] for p in prompts]))
    return "".join(parts)


def _tensors_section(record: RunRecord) -> str:
    parts = [bits_heatmap(record)]
    tensors = record["tensors"]
    if tensors:
        table = _table("tensor-table", ("tensor", "format", "bits/weight", "parameters"),
                       [(t["name"], t["format"], _number(t["bits_per_weight"], 2), f"{t['parameters']:,}")
                        for t in tensors], text_columns=2)
        parts.append(f"<details><summary>All {len(tensors)} tensors</summary>{table}</details>")
    return "".join(parts)


def render_report(record: RunRecord, run_id: int | None = None) -> str:
    """The whole report as one HTML document that references no external resource."""
    title = f"anepack run {run_id}" if run_id is not None else "anepack run"
    title += f": {record['kind']}"
    recipe = record.get("recipe")
    versions = record.get("versions") or {}
    timings = record.get("timings") or {}
    notes = record.get("notes") or []
    sections = [
        f"<h1>{html.escape(title)}</h1>",
        _verdict(record),
        _facts(record),
        "<h2>Bits</h2>", _bits_section(record),
        "<h2>Layers</h2>", _layers_section(record),
        "<h2>Prompts</h2>", _prompts_section(record),
        "<h2>Formats per tensor</h2>", _tensors_section(record),
        "<h2>Versions and timings</h2>",
        _table("versions", ("package", "version"), [(k, v or "–") for k, v in versions.items()], text_columns=2),
        _table("timings", ("step", "seconds"), [(k, _number(v, 2)) for k, v in timings.items()]),
    ]
    if notes:
        sections.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    if recipe and recipe.get("toml"):
        sections.append(f"<h2>Recipe</h2><details><summary>{html.escape(recipe['name'])} (TOML)</summary>"
                        f"<pre>{html.escape(recipe['toml'])}</pre></details>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
            f"<body>{''.join(sections)}</body></html>\n")


def write_report(record: RunRecord, path: str | os.PathLike[str], run_id: int | None = None) -> Path:
    """Render and write atomically: a temporary file beside ``path``, then a rename."""
    path = Path(path)
    document = render_report(record, run_id)
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_text(document, encoding="utf-8")
        os.replace(partial, path)
    except OSError as err:
        raise AnepackError(path, f"cannot write the report ({err.strerror})") from None
    finally:
        partial.unlink(missing_ok=True)
    return path
