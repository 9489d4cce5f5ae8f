"""`segan preset FILE`: turn a preset of dotted overrides into `-S key=value` arguments for
`dvc exp run`, or write it into params.yaml. The preset is validated against the schema first."""

from __future__ import annotations

import json
from pathlib import Path

import click
import yaml

from .config import ConfigError, apply_override, load_params


def read_preset(path: Path) -> dict:
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise click.ClickException(f"{path}: cannot read preset ({exc})") from None
    if not isinstance(raw, dict):
        raise click.ClickException(f"{path}: expected a mapping of dotted keys to values")
    return raw


def as_cli_value(value) -> str:
    # JSON is valid YAML and has no spaces with these separators, so the shell keeps it one word.
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


@click.command("preset")
@click.argument("preset", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--params", "params_file", default="params.yaml", show_default=True,
              type=click.Path(dir_okay=False, path_type=Path), help="params file the preset applies to")
@click.option("--write", is_flag=True, help="write the preset into the params file instead of printing -S args")
def preset_command(preset: Path, params_file: Path, write: bool) -> None:
    """Print `-S key=value` arguments for `dvc exp run` from a PRESET file.

    Example: dvc exp run -n paper $(segan preset presets/paper.yaml)
    """
    overrides = read_preset(preset)
    try:
        load_params(params_file, overrides)  # fail here, not half-way into a DVC run
    except ConfigError as exc:
        raise click.ClickException(f"{preset}: {exc}") from None
    if write:
        from .fsutil import write_text

        raw = yaml.safe_load(params_file.read_text())
        for key, value in overrides.items():
            apply_override(raw, key, value)
        write_text(params_file, yaml.safe_dump(raw, sort_keys=False))
        click.echo(f"wrote {len(overrides)} setting(s) from {preset} into {params_file}")
        return
    click.echo(" ".join(f"-S {key}={as_cli_value(value)}" for key, value in overrides.items()))
