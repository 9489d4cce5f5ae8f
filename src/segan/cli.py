"""The ``segan`` command line. Subcommands live beside the code they drive and are
registered here lazily, so ``segan --help`` stays fast (no torch import)."""

from __future__ import annotations

import importlib
import logging

import click

# name -> "module:attribute" of a click command
COMMANDS = {
    "enhance": "segan.cli_enhance:enhance_command",
    "metrics": "segan.cli_metrics:metrics_command",
    "check-metrics": "segan.cli_gate:check_metrics_command",
    "preset": "segan.preset:preset_command",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(package_name="segan")
def main(verbose: int) -> None:
    """SEGAN speech enhancement: train, export, evaluate and enhance.

    The pipeline itself runs with `dvc repro` (see README); these commands work on files.
    """
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(levelname)s %(name)s: %(message)s")


if __name__ == "__main__":  # pragma: no cover
    main()
