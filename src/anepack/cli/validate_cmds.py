"""CLI commands for recipes and validation: ``recipes``, ``validate layers|golden|gate``, ``recipe search``."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from anepack.atomic import atomic_write_bytes
from anepack.cli.golden_cmds import render_checks
from anepack.cli.history_cmds import db_option
from anepack.cli.output import COSINE, SHARE, console, emit, err_console, json_option, model_argument
from anepack.source.default_model import resolve_model
from anepack.source.gguf_file import open_gguf

recipe_option = click.option("--recipe", "recipe_name", default="int8-per-channel", show_default=True,
                             help="Built-in recipe name or a recipe TOML file.")
prompts_option = click.option("--prompts", "prompts_path", type=click.Path(dir_okay=False),
                              help="Validation prompts, JSONL (default: the built-in golden set).")
importance_option = click.option("--importance/--no-importance", default=True, show_default=True,
                                 help="Weight clustering and rounding by calibration activations.")


def _store_record(record: dict, db_path: str | None) -> int:
    from anepack.validate.history import RunStore

    return RunStore(db_path).add(record)


def _bits_line(bits: dict) -> str:
    return (f"bits per weight: layers {bits['layers_average']:.3f}, LM head {bits['lm_head']:.3f}, "
            f"shipped {bits['shipped_average']:.3f} (host embedding table {bits['embedding_host']:.1f})")


@click.command()
@model_argument
@json_option
def recipes(model: str | None, as_json: bool) -> None:
    """List the built-in recipes with their bits per weight on MODEL."""
    from anepack.validate.bits import recipe_bits
    from anepack.validate.recipes import builtin_recipe_names, load_recipe

    rows = []
    with open_gguf(resolve_model(model)) as gguf:
        for name in builtin_recipe_names():
            recipe = load_recipe(name)
            _, bits = recipe_bits(gguf, recipe)
            ane_safe = all(rule.format.ane_safe for rule in recipe.rules)
            rows.append({"name": name, "description": recipe.description, "bits_per_weight": bits["shipped_average"],
                         "layers_bits_per_weight": bits["layers_average"], "lm_head_bits_per_weight": bits["lm_head"],
                         "ane_safe": ane_safe})

    def render(doc: dict) -> None:
        table = Table(title=f"built-in recipes on {doc['model']}")
        for column in ("recipe", "shipped bpw", "layers bpw", "LM head bpw", "ANE-safe", "description"):
            table.add_column(column, justify="left" if column in ("recipe", "description", "ANE-safe") else "right")
        for row in doc["recipes"]:
            table.add_row(row["name"], f"{row['bits_per_weight']:.3f}", f"{row['layers_bits_per_weight']:.3f}",
                          f"{row['lm_head_bits_per_weight']:.3f}", "yes" if row["ane_safe"] else "[red]no[/red]",
                          row["description"])
        console.print(table)

    emit({"model": str(resolve_model(model)), "recipes": rows}, as_json, render)


@click.group()
def validate() -> None:
    """Validate a recipe on a model: per layer, end to end, or the pre-flight gate."""


def render_layers(doc: dict) -> None:
    from anepack.validate.run import UNMATCHED_NOTE

    record = doc["record"]
    table = Table(title=f"recipe {record['recipe']['name']}: hidden-state cosine per layer (run {doc['run']})")
    for column in ("layer", "isolated min", "isolated mean", "cumulative min", "cumulative mean", "ok", "most blamed (share, cos alone)"):
        table.add_column(column, justify="left" if column.startswith("most") else "right")
    for layer in record["layers"]:
        blame = ", ".join(f"{b['tensor'].split('.', 2)[2]} {b['format']} ({b['share']:.0%}, {b['min_cosine']:.4f})"
                          for b in layer["blame"][:3])
        table.add_row(str(layer["layer"]), f"{layer['isolated_min']:.5f}", f"{layer['isolated_mean']:.5f}",
                      f"{layer['cumulative_min']:.5f}", f"{layer['cumulative_mean']:.5f}",
                      "[green]yes[/green]" if layer["passed"] else "[red]no[/red]", blame or "-")
    console.print(table)
    console.print(_bits_line(record["bits"]))
    for note in record["notes"]:
        if note.startswith(UNMATCHED_NOTE):
            console.print(note, markup=False)
    verdict = "[bold green]PASS[/bold green]" if record["passed"] else "[bold red]FAIL[/bold red]"
    console.print(f"{verdict}: every checked layer's min cosine >= {record['thresholds']['min_layer_cosine']} "
                  "(isolated and cumulative)")


def _layers_document(record: dict, run_id: int) -> dict:
    return {"run": run_id, "passed": record["passed"], "record": record}


@validate.command("layers")
@model_argument
@recipe_option
@click.option("--layers", "layer_choice", default="sample", show_default=True, help="sample, all, or a list like 0,5,17.")
@click.option("--threshold", type=COSINE, default=0.97, show_default=True, help="Minimum hidden-state cosine per layer.")
@click.option("--blame/--no-blame", default=True, show_default=True, help="Quantize one tensor at a time to assign blame.")
@prompts_option
@importance_option
@db_option
@json_option
def layers_command(model, recipe_name, layer_choice, threshold, blame, prompts_path, importance, db_path, as_json):
    """Hidden-state cosine after chosen layers, isolated and cumulative, with per-tensor blame."""
    from anepack.validate.layers import parse_layer_choice
    from anepack.validate.recipes import load_recipe
    from anepack.validate.run import ValidationContext, layers_run

    recipe = load_recipe(recipe_name)
    with open_gguf(resolve_model(model)) as gguf:
        try:
            layers = parse_layer_choice(layer_choice, gguf.config.n_layers)
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint="--layers") from None
        with err_console.status("validating") as status:
            context = ValidationContext.prepare(gguf, prompts_path, importance, status.update)
            record = layers_run(context, recipe, layers, threshold, blame, progress=status.update)
    run_id = _store_record(record, db_path)
    emit(_layers_document(record, run_id), as_json, render_layers)


@validate.command("gate")
@model_argument
@recipe_option
@click.option("--sample", "sample_size", default=5, show_default=True, help="How many layers the gate checks.")
@click.option("--threshold", type=COSINE, default=0.97, show_default=True, help="Minimum hidden-state cosine per layer.")
@prompts_option
@importance_option
@db_option
@json_option
def gate_command(model, recipe_name, sample_size, threshold, prompts_path, importance, db_path, as_json):
    """The pre-flight gate a full build runs first: the layer check on a sample of layers."""
    from anepack.validate.recipes import load_recipe
    from anepack.validate.run import ValidationContext, gate_run

    recipe = load_recipe(recipe_name)
    with open_gguf(resolve_model(model)) as gguf:
        with err_console.status("pre-flight gate") as status:
            context = ValidationContext.prepare(gguf, prompts_path, importance, status.update)
            record = gate_run(context, recipe, sample_size, threshold, progress=status.update)
    run_id = _store_record(record, db_path)
    emit(_layers_document(record, run_id), as_json, render_layers)


@validate.command("golden")
@model_argument
@recipe_option
@click.option("--golden", "golden_path", type=click.Path(dir_okay=False),
              help="Golden file from 'anepack golden record' (default: the exact numpy reference on --prompts).")
@click.option("--min-cosine", type=COSINE, default=0.97, show_default=True, help="Per-position logit cosine bar.")
@click.option("--min-top1", type=SHARE, default=0.90, show_default=True,
              help="Top-1 agreement bar, pooled over every position of every prompt.")
@prompts_option
@importance_option
@db_option
@json_option
def golden_command(model, recipe_name, golden_path, min_cosine, min_top1, prompts_path, importance, db_path, as_json):
    """The full quantized stack on every golden prompt: logit cosine, KL, top-1 per position."""
    from anepack.golden import OTHER_FILE_NOTE, Golden
    from anepack.validate.recipes import load_recipe
    from anepack.validate.run import UNMATCHED_NOTE, ValidationContext, golden_run

    recipe = load_recipe(recipe_name)
    golden = Golden.load(golden_path) if golden_path else None
    with open_gguf(resolve_model(model)) as gguf:
        other_file = golden.check_model(golden_path, gguf.path, gguf.config.vocab_size) if golden else None
        with err_console.status("golden check") as status:
            context = ValidationContext.prepare(gguf, prompts_path, importance, status.update)
            record = golden_run(context, recipe, golden, min_cosine, min_top1, progress=status.update)
        if other_file:
            record["notes"].append(other_file)
    run_id = _store_record(record, db_path)
    document = {"run": run_id, "passed": record["passed"], "model": record["model"],
                "top1_pooled": record["top1_pooled"],
                "thresholds": {"min_cosine": min_cosine, "min_top1": min_top1},
                "prompts": record["prompts"], "bits": record["bits"], "record": record}

    def render(doc: dict) -> None:
        render_checks(doc, f"recipe {recipe.name}: quantized stack vs reference logits (run {doc['run']})")
        console.print(_bits_line(doc["bits"]))
        for note in doc["record"]["notes"]:
            if note.startswith(("routing:", OTHER_FILE_NOTE, UNMATCHED_NOTE)):
                console.print(note)

    emit(document, as_json, render)


@click.group("recipe")
def recipe_group() -> None:
    """Recipe tools: search for a mixed-bit recipe."""


@recipe_group.command("search")
@model_argument
@click.option("--max-bpw", type=click.FloatRange(min=0, min_open=True), default=5.0, show_default=True, help="Most bits per weight over the layers' matrices.")
@click.option("--min-layer-cos", type=COSINE, default=0.98, show_default=True,
              help="Cumulative hidden-state cosine every layer must keep on the calibration prompts.")
@click.option("--min-final-cos", type=COSINE, default=None,
              help="Also keep the final hidden state (the LM head's input) at this cosine.")
@click.option("--min-logit-cos", type=COSINE, default=0.97, show_default=True,
              help="Per-position logit cosine the stack must keep on the calibration prompts.")
@click.option("--min-top1", type=SHARE, default=0.90, show_default=True,
              help="Top-1 agreement, pooled over the calibration prompts' positions, the stack must keep.")
@click.option("--allow-gpu-formats", is_flag=True, help="Also consider formats that fall off the ANE (int4 per-block).")
@click.option("--name", default="searched", show_default=True, help="Name of the written recipe.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="Recipe TOML to write.")
@importance_option
@json_option
def search_command(model, max_bpw, min_layer_cos, min_final_cos, min_logit_cos, min_top1, allow_gpu_formats, name,
                   out_path, importance, as_json):
    """Apple-style mixed-bit search: score tensors alone, compress them cumulatively, keep what holds the targets."""
    from anepack.validate.run import calibrate, calibration_tokens
    from anepack.validate.search import search_recipe

    with open_gguf(resolve_model(model)) as gguf:
        with err_console.status("recipe search") as status:
            _, tokens = calibration_tokens(gguf)
            importance_vectors = calibrate(gguf) if importance else None
            result = search_recipe(gguf, tokens, importance_vectors, min_layer_cos, max_bpw, name,
                                   allow_gpu_formats, min_logit_cos, min_top1, progress=status.update,
                                   min_final_cosine=min_final_cos)
    path = Path(out_path)
    atomic_write_bytes(path, result.recipe.text.encode())
    counts: dict[str, int] = {}
    for rule in result.recipe.rules:
        counts[rule.format.spec] = counts.get(rule.format.spec, 0) + (len(rule.layers) if rule.layers else 1)
    document = {"recipe": str(path), "name": name, "passed": result.within_budget, "max_bpw": max_bpw,
                "bits": result.bits, "tensors_per_format": counts,
                "layer_cosine": result.layer_cosine, "final_cosine": result.final_cosine,
                "head_cosine": result.head_cosine, "head_top1": result.head_top1, "steps": result.log}

    def render(doc: dict) -> None:
        table = Table(title=f"recipe {doc['name']} -> {doc['recipe']}")
        table.add_column("format")
        table.add_column("tensors", justify="right")
        for spec, count in sorted(doc["tensors_per_format"].items()):
            table.add_row(spec, str(count))
        console.print(table)
        console.print(_bits_line(doc["bits"]))
        console.print(f"calibration: min cumulative layer cosine {min(doc['layer_cosine']):.4f}, "
                      f"final hidden state {doc['final_cosine']:.4f}, "
                      f"logit cosine {doc['head_cosine']:.4f}, top-1 {doc['head_top1']:.3f}")
        if doc["passed"]:
            console.print(f"[bold green]PASS[/bold green]: within {doc['max_bpw']} bits per weight")
        else:
            console.print(f"[bold red]FAIL[/bold red]: the target needs {doc['bits']['layers_average']:.3f} bits "
                          f"per weight, over --max-bpw {doc['max_bpw']} (recipe written anyway)")

    emit(document, as_json, render)
