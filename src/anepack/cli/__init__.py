"""The ``anepack`` command line: thin click commands over the library.

This is the only place that prints or exits. User errors (``AnepackError``) become one line
on stderr and exit code 2; every table-printing command also takes ``--json`` and then prints
exactly one JSON document on stdout.
"""

from __future__ import annotations

import click

from anepack import __version__
from anepack.errors import AnepackError


class _AnepackGroup(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except AnepackError as err:
            click.echo(f"anepack: error: {err}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("anepack: interrupted", err=True)
            ctx.exit(130)


@click.group(cls=_AnepackGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="anepack")
def main() -> None:
    """GGUF language models to validated Core ML shards for the Apple Neural Engine."""


def _register() -> None:
    from anepack.cli import golden_cmds, source_cmds, synth_cmd

    main.add_command(source_cmds.dequant)
    main.add_command(source_cmds.inspect_command)
    main.add_command(golden_cmds.golden)
    main.add_command(synth_cmd.synth)

    from anepack.cli import history_cmds

    main.add_command(history_cmds.runs)
    main.add_command(history_cmds.compare)
    main.add_command(history_cmds.report)

    from anepack.cli import validate_cmds

    main.add_command(validate_cmds.recipes)
    main.add_command(validate_cmds.validate)
    main.add_command(validate_cmds.recipe_group)

    from anepack.cli import quant_cmds

    main.add_command(quant_cmds.quantize_tensor)
    main.add_command(quant_cmds.sweep)

    from anepack.cli import convert_cmd

    main.add_command(convert_cmd.convert)

    from anepack.cli import lint_cmds

    main.add_command(lint_cmds.lint)

    from anepack.cli import runtime_cmds

    main.add_command(runtime_cmds.generate)


_register()
