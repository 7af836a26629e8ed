"""CLI command ``generate``: continue a prompt through built shards (MIL interpreter or Core ML)."""

from __future__ import annotations

import click

from anepack.cli.output import emit, err_console, json_option
from anepack.cli.source_cmds import progress_bar
from anepack.runtime.backends import BACKENDS


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


@click.command()
@click.argument("shards", type=click.Path(file_okay=False))
@click.option("--prompt", required=True, help="Text to continue (a BOS token is prepended).")
@click.option("--max-tokens", default=32, show_default=True, type=click.IntRange(min=1),
              help="Tokens to generate at most.")
@click.option("--backend", type=click.Choice(BACKENDS), default="mil", show_default=True,
              help="mil: anepack's MIL interpreter (anywhere); coreml: Core ML on the Neural Engine (macOS).")
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="0 is greedy; higher flattens the distribution.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(min=0, max=1, min_open=True),
              help="Sample only from the most likely tokens holding this much probability.")
@click.option("--seed", type=int, help="Seed of the sampler (sampling only).")
@click.option("--no-stop", is_flag=True, help="Keep going after an end-of-sequence token.")
@json_option
def generate(shards: str, prompt: str, max_tokens: int, backend: str, temperature: float, top_p: float,
             seed: int | None, no_stop: bool, as_json: bool) -> None:
    """Continue PROMPT with the model built into the shard directory SHARDS."""
    from anepack.runtime.host_files import tokenizer_path
    from anepack.runtime.sampling import Sampler, generate as generate_text
    from anepack.runtime.shards import ShardRuntime
    from anepack.tokenizer import Tokenizer

    sampler = Sampler(temperature, top_p, seed)
    runtime = ShardRuntime(shards, backend)
    with Tokenizer(tokenizer_path(shards)) as tokenizer:
        bar, task = progress_bar(f"generating ({backend})", max_tokens)
        with bar:
            result = generate_text(runtime, tokenizer, prompt, max_tokens, sampler, stop_at_eos=not no_stop,
                                   progress=lambda count: bar.update(task, completed=count))
    timings = result.timings
    document = {
        "shards": shards,
        "backend": backend,
        "prompt": prompt,
        "prompt_tokens": result.prompt_tokens,
        "tokens": result.tokens,
        "text": result.text,
        "sampler": {"temperature": temperature, "top_p": top_p, "seed": seed},
        "timings": {
            "prefill_s": timings.prefill_seconds,
            "decode_s": timings.decode_seconds,
            "prefill_tokens_per_s": timings.prefill_tokens_per_second,
            "decode_tokens_per_s": timings.decode_tokens_per_second,
        },
    }

    def render(doc: dict) -> None:
        # The text goes out verbatim: rich would read brackets in it as markup.
        click.echo(doc["prompt"] + doc["text"])
        err_console.print(
            f"{len(doc['tokens'])} tokens after a {len(doc['prompt_tokens'])}-token prompt ({doc['backend']} backend): "
            f"prefill {_rate(doc['timings']['prefill_tokens_per_s'])} tokens/s, "
            f"decode {_rate(doc['timings']['decode_tokens_per_s'])} tokens/s",
            style="dim", soft_wrap=True,
        )

    emit(document, as_json, render)
