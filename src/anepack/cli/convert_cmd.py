"""CLI command ``convert``: the main job, GGUF in, validated ANE shards and a report out."""

from __future__ import annotations

import resource
import time

import click
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from anepack.cli.golden_cmds import render_checks
from anepack.cli.history_cmds import db_option
from anepack.cli.output import console, emit, err_console, json_option, model_argument
from anepack.source.default_model import resolve_model
from anepack.source.gguf_file import open_gguf


@click.command()
@model_argument
@click.option("--recipe", "recipe_name",
              help="Built-in recipe or TOML file [default: 'default' on the default model, whose tensors it "
                   "was searched for; 'int8-per-channel' on any other model].")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--max-shard-mb", default=1024.0, show_default=True, help="Size budget per .mlpackage.")
@click.option("--chunk", default=64, show_default=True, help="Prefill chunk T (tokens per prefill call).")
@click.option("--context", "context_length", default=512, show_default=True, help="KV cache length C.")
@click.option("--force", is_flag=True, help="Build even if the pre-flight gate fails (recorded).")
@click.option("--prompts", "prompts_path", type=click.Path(dir_okay=False), help="Validation prompts (JSONL).")
@click.option("--importance/--no-importance", default=True, show_default=True)
@db_option
@json_option
def convert(model, recipe_name, out_dir, max_shard_mb, chunk, context_length, force, prompts_path, importance,
            db_path, as_json):
    """Calibrate, gate, build the shards, check them against the golden reference, lint, report."""
    from anepack.convert import ConvertOptions, convert as run_convert
    from anepack.validate.history import RunStore
    from anepack.validate.recipes import load_recipe

    # The built-in `default` recipe names the default model's tensors and layers, so only that
    # model gets it unasked.
    recipe = load_recipe(recipe_name or ("default" if model is None else "int8-per-channel"))
    options = ConvertOptions(chunk=chunk, context=context_length, max_shard_mb=max_shard_mb, force=force,
                             use_importance=importance)
    started = time.perf_counter()
    bar = Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=err_console,
                   transient=True)
    with bar, open_gguf(resolve_model(model)) as gguf:
        task = bar.add_task("convert", total=1.0)

        def progress(message: str, fraction: float | None) -> None:
            bar.update(task, description=message[:80], completed=fraction if fraction is not None else 0.0)

        record = run_convert(gguf, recipe, out_dir, options, prompts_path, progress)
    run_id = RunStore(db_path).add(record)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    document = {"run": run_id, "passed": record["passed"], "out": out_dir, "recipe": recipe.name,
                "seconds": time.perf_counter() - started, "peak_mb": peak_mb, "bits": record["bits"],
                "artifact": record["artifact"], "prompts": record["prompts"], "notes": record["notes"],
                "top1_pooled": record["top1_pooled"],
                "thresholds": {"min_cosine": options.min_logit_cosine, "min_top1": options.min_top1}}

    def render(doc: dict) -> None:
        render_checks(doc, f"shards in {doc['out']} (MIL interpreter) vs the source model's exact logits")
        for note in doc["notes"]:
            console.print(f"- {note}")
        bits = doc["bits"]
        verdict = "[bold green]PASS[/bold green]" if doc["passed"] else "[bold red]FAIL[/bold red]"
        console.print(f"{verdict} recipe {doc['recipe']}: {bits['layers_average']:.2f} bits/weight in the layers, "
                      f"{bits['lm_head']:.2f} in the LM head; {doc['seconds']:.0f} s, peak {doc['peak_mb']:.0f} MB; "
                      f"run {doc['run']}, report {doc['out']}/report.html")

    emit(document, as_json, render)
