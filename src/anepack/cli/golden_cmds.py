"""CLI commands ``golden record`` and ``golden check``."""

from __future__ import annotations

import dataclasses

import click
from rich.table import Table

from anepack.cli.output import COSINE, SHARE, console, emit, json_option
from anepack.cli.source_cmds import progress_bar
from anepack.source.default_model import resolve_model


@click.group()
def golden() -> None:
    """Golden references: llama.cpp's logits for a prompt set, and checks against them."""


@golden.command("record")
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("--prompts", "prompts_path", type=click.Path(dir_okay=False), help="JSONL prompts (default: built-in set).")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="Golden file to write (.npz).")
@json_option
def record_command(model: str | None, prompts_path: str | None, out_path: str, as_json: bool) -> None:
    """Run llama.cpp on MODEL over the prompts and store token ids and logits."""
    from anepack import golden as golden_lib

    model_path = resolve_model(model)
    prompts = golden_lib.load_prompts(prompts_path)
    bar, task = progress_bar("llama.cpp", len(prompts))
    with bar:
        result = golden_lib.record(model_path, prompts, lambda name: bar.update(task, advance=1, item=name))
    result.save(out_path)
    document = {
        "golden": out_path,
        "model": str(model_path),
        "fingerprint": result.fingerprint,
        "referee": result.referee,
        "prompts": [{"name": p.name, "tokens": len(p.tokens)} for p in result.prompts],
    }
    emit(document, as_json, lambda d: console.print(
        f"wrote {d['golden']}: {len(d['prompts'])} prompts, "
        f"{sum(p['tokens'] for p in d['prompts'])} positions, referee {d['referee']}"))


def render_checks(doc: dict, title: str) -> None:
    table = Table(title=title)
    for column in ("prompt", "tokens", "min cos", "mean cos", "max KL", "mean KL", "top-1", "first fail", "ok"):
        table.add_column(column, justify="left" if column == "prompt" else "right")
    for p in doc["prompts"]:
        table.add_row(
            p["name"], str(p["tokens"]), f"{p['min_cosine']:.6f}", f"{p['mean_cosine']:.6f}",
            f"{p['max_kl']:.2e}", f"{p['mean_kl']:.2e}", f"{p['top1_agreement']:.3f}",
            "-" if p["first_failing_position"] is None else str(p["first_failing_position"]),
            "[green]yes[/green]" if p["passed"] else "[red]no[/red]",
        )
    console.print(table)
    verdict = "[bold green]PASS[/bold green]" if doc["passed"] else "[bold red]FAIL[/bold red]"
    bar = doc["thresholds"]["min_top1"]
    if doc["thresholds"].get("top1_per_prompt"):
        top1 = f"top-1 agreement >= {bar} on every prompt"
    else:
        positions = sum(p["tokens"] for p in doc["prompts"])
        pooled = sum(p["top1_matches"] for p in doc["prompts"]) / positions
        top1 = f"top-1 agreement over all {positions} positions {pooled:.3f} (bar {bar})"
    console.print(f"{verdict}: logit cosine >= {doc['thresholds']['min_cosine']} at every position, {top1}")


# Weight types llama.cpp multiplies without rounding the activations to 8 bits.
UNQUANTIZED_TYPES = ("F32", "F16", "BF16")


@golden.command("check")
@click.argument("paths", nargs=-1, required=True, type=click.Path(dir_okay=False), metavar="[MODEL] GOLDEN")
@click.option("--min-cosine", type=COSINE, default=0.99, show_default=True, help="Per-position logit cosine bar.")
@click.option("--min-top1", type=SHARE, default=0.95, show_default=True, help="Per-prompt top-1 agreement bar.")
@click.option("--fp16", is_flag=True, help="Run the reference with every intermediate rounded to float16.")
@click.option("--emulate-llamacpp", is_flag=True,
              help="Compute matmuls and GELU as llama.cpp's CPU backend does (activation quantization).")
@json_option
def check_command(paths: tuple[str, ...], min_cosine: float, min_top1: float, fp16: bool, emulate_llamacpp: bool,
                  as_json: bool) -> None:
    """Run the numpy reference of MODEL on GOLDEN's prompts and compare with llama.cpp's logits."""
    from anepack import golden as golden_lib
    from anepack.reference import build
    from anepack.reference.llamacpp_emulation import LlamaCppArithmetic
    from anepack.source.config import routes_experts
    from anepack.source.gguf_file import open_gguf
    from anepack.source.weights import source_weights, stored_name
    from anepack.validate.weights import quantizable_tensors

    if len(paths) > 2:
        raise click.UsageError("expected [MODEL] GOLDEN")
    model_path = resolve_model(paths[0] if len(paths) == 2 else None)
    golden_file = golden_lib.Golden.load(paths[-1])
    thresholds = golden_lib.Thresholds(min_cosine, min_top1, top1_per_prompt=True)
    with open_gguf(model_path) as gguf:
        emulate = LlamaCppArithmetic(gguf) if emulate_llamacpp else None
        model = build(gguf.config, source_weights(gguf), fp16=fp16, emulate=emulate)
        other_file = golden_file.check_model(paths[-1], model_path, gguf.config.vocab_size)
        routed = routes_experts(gguf.config)
        # the layer matrices and the LM head (the embedding table, when tied), as stored
        stored_types = {gguf.info(stored_name(gguf, name)).type_name for name in quantizable_tensors(gguf)}
        quantized_types = sorted(stored_types - set(UNQUANTIZED_TYPES))
        overflows = []

        def logits(tokens):
            result = model.forward(tokens)
            overflows.append(None if result.overflow is None else dataclasses.asdict(result.overflow))
            return result.logits

        bar, task = progress_bar("numpy reference", len(golden_file.prompts))
        with bar:
            checks = golden_lib.check(golden_file, logits, lambda name: bar.update(task, advance=1, item=name))
    summaries = [c.summary(thresholds) | {"fp16_overflow": overflow} for c, overflow in zip(checks, overflows)]
    document = {
        "model": str(model_path),
        "golden": paths[-1],
        "golden_model": golden_file.model,
        "same_model_file": other_file is None,
        "quantized_weight_types": quantized_types,
        "routed": routed,
        "fp16": fp16,
        "emulate_llamacpp": emulate_llamacpp,
        "thresholds": {"min_cosine": min_cosine, "min_top1": min_top1, "top1_per_prompt": True},
        "prompts": summaries,
        "passed": all(s["passed"] for s in summaries),
    }

    def render(doc: dict) -> None:
        render_checks(doc, f"numpy reference vs llama.cpp ({doc['model']})")
        if not doc["same_model_file"]:
            console.print(f"note: {golden_lib.OTHER_FILE_NOTE} ({doc['golden_model']})")
        if not doc["passed"] and doc["routed"] and not doc["emulate_llamacpp"]:
            console.print(
                "note: this model routes tokens to experts, and llama.cpp's float16 GELU table moves router "
                "logits enough to swap an expert where two nearly tie, which moves that position and the ones "
                "after it; --emulate-llamacpp computes as llama.cpp does")
        if not doc["passed"] and doc["quantized_weight_types"]:
            console.print(
                f"note: llama.cpp multiplies this file's {'/'.join(doc['quantized_weight_types'])} weights by "
                "activations rounded to 8 bits, and that rounding moves its logits (see --emulate-llamacpp); "
                "to check the reference's arithmetic alone, compare on a dequantized copy: "
                f"anepack dequant {doc['model']} COPY.gguf, then golden record and check on COPY.gguf")
        for prompt in doc["prompts"]:
            overflow = prompt["fp16_overflow"]
            if overflow is not None:
                console.print(f"fp16 overflow in {prompt['name']}: layer {overflow['layer']}, position "
                              f"{overflow['position']}, value {overflow['value']:.0f} at {overflow['where']}")

    emit(document, as_json, render)
