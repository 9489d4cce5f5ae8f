"""``segan check-metrics``: fail CI when the model's evaluation metrics regress.

Exit codes: 0 all gated metrics within tolerance (or baseline updated), 1 a regression
(or a missing/NaN metric), 2 a missing or malformed metrics/baseline/params file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .config import ConfigError, GateConfig, load_params
from .gate import GateError, compare, count_note, format_table, load_metrics, update_baseline

EXIT_REGRESSION = 1
EXIT_BAD_INPUT = 2


def _gate_config(ctx: click.Context, params_path: Path) -> tuple[GateConfig, Path]:
    """params.gate and the folder its relative baseline path is resolved against.

    A missing *default* params.yaml falls back to the built-in defaults (so the command also
    works on a bare metrics file); a missing file given explicitly is an error.
    """
    explicit = ctx.get_parameter_source("params_path") is not click.core.ParameterSource.DEFAULT
    if not params_path.exists() and not explicit:
        return GateConfig(), Path(".")
    try:
        params = load_params(params_path)
    except ConfigError as exc:
        raise GateError(str(exc)) from None
    return params.gate, params_path.parent


def _fail(message: str) -> None:
    click.echo(f"Error: {message}", err=True)
    sys.exit(EXIT_BAD_INPUT)


@click.command("check-metrics")
@click.option("--metrics", "metrics_path", type=click.Path(path_type=Path), default=Path("reports/metrics.json"),
              show_default=True, help="Current metrics written by the evaluate stage.")
@click.option("--baseline", "baseline_path", type=click.Path(path_type=Path), default=None,
              help="Baseline metrics to compare against [default: params gate.baseline].")
@click.option("--params", "params_path", type=click.Path(path_type=Path), default=Path("params.yaml"),
              show_default=True, help="Params file with the gate section (system, tolerances, baseline).")
@click.option("--system", default=None, help="System to gate [default: params gate.system].")
@click.option("--update-baseline", is_flag=True,
              help="Copy the current metrics to the baseline path (a deliberate refresh) and exit 0.")
@click.pass_context
def check_metrics_command(ctx: click.Context, metrics_path: Path, baseline_path: Path | None,
                          params_path: Path, system: str | None, update_baseline: bool) -> None:
    """Compare evaluation metrics with the committed baseline; exit 1 on a regression.

    Every metric in gate.tolerances is higher-is-better: it fails when NEW < OLD - tolerance,
    or when it is missing or NaN in the current metrics.
    """
    try:
        gate, base_dir = _gate_config(ctx, params_path)
        system = system or gate.system
        if baseline_path is None:
            baseline_path = Path(gate.baseline)
            if not baseline_path.is_absolute():
                baseline_path = base_dir / baseline_path

        if update_baseline:
            _do_update(metrics_path, baseline_path, system, gate.tolerances)
            return

        current = load_metrics(metrics_path, system, what="metrics")
        baseline = load_metrics(baseline_path, system, what="baseline")
        rows = compare(baseline, current, gate.tolerances, system)
    except GateError as exc:
        _fail(str(exc))
        return

    click.echo(f"Comparing {metrics_path} (new) with {baseline_path} (old), system {system!r}:")
    click.echo(format_table(rows, system))
    note = count_note(baseline, current, system)
    if note:
        click.echo(note)
    failed = [r for r in rows if not r.ok]
    if failed:
        names = ", ".join(r.metric for r in failed)
        click.echo(f"\nREGRESSION: {len(failed)} of {len(rows)} metrics failed the gate ({names}). "
                   "If the change is intended, refresh the baseline with "
                   "`segan check-metrics --update-baseline` and commit it.", err=True)
        sys.exit(EXIT_REGRESSION)
    click.echo(f"\nOK: all {len(rows)} metrics within tolerance.")


def _do_update(metrics_path: Path, baseline_path: Path, system: str, tolerances: dict[str, float]) -> None:
    """Show what changes (when an old baseline is readable), then replace the baseline."""
    try:
        old = load_metrics(baseline_path, system, what="baseline")
    except GateError:
        old = None
    current = update_baseline(metrics_path, baseline_path, system)
    if old is not None:
        click.echo(format_table(compare(old, current, tolerances, system), system))
    click.echo(f"Baseline updated: copied {metrics_path} to {baseline_path}. Commit it to make it the new gate.")
