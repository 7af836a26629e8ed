"""Shared CLI output: rich tables for people, one JSON document for programs."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable
from typing import Any

import click
import numpy as np
from rich.console import Console

json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of tables.")
# Bars: a cosine lies in [-1, 1], an agreement share in [0, 1]; a bar outside cannot be met or missed.
COSINE = click.FloatRange(-1.0, 1.0)
SHARE = click.FloatRange(0.0, 1.0)
model_argument = click.argument("model", required=False, type=click.Path(dir_okay=False))

# Piped output keeps whole rows: rich would otherwise wrap every table at 80 columns.
console = Console(width=None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", 200)))
err_console = Console(stderr=True)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def emit(document: dict[str, Any], as_json: bool, render: Callable[[dict[str, Any]], None]) -> None:
    """Print ``document`` as JSON on stdout, or hand it to ``render`` for rich output."""
    if as_json:
        click.echo(json.dumps(_jsonable(document), indent=2))
    else:
        render(document)
