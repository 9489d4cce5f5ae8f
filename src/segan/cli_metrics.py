"""``segan metrics CLEAN DEGRADED``: score one pair of audio files with every metric."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click
import numpy as np

from .audio import AudioError, load_mono
from .metrics import METRIC_NAMES, RATE, score

# what each number is, for the table
_DESCRIPTIONS = {
    "pesq": "wide-band PESQ, P.862.2 (1-4.64)",
    "stoi": "STOI (0-1)",
    "estoi": "extended STOI (0-1)",
    "csig": "composite signal distortion (1-5)",
    "cbak": "composite background intrusion (1-5)",
    "covl": "composite overall quality (1-5)",
    "ssnr": "segmental SNR, dB (-10 to 35)",
}


def _load(path: Path, param: str) -> np.ndarray:
    try:
        return load_mono(path, RATE)
    except AudioError as exc:
        raise click.BadParameter(str(exc), param_hint=param) from None


def _jsonable(value: object) -> object:
    """NaN is not JSON: missing metrics become null."""
    return None if isinstance(value, float) and math.isnan(value) else value


def format_table(result: dict) -> str:
    """Aligned ``metric  value  description`` lines; missing values read ``n/a``."""
    width = max(len(name) for name in METRIC_NAMES)
    lines = []
    for name in METRIC_NAMES:
        value = result[name]
        shown = "n/a" if value is None or math.isnan(value) else f"{value:.4f}"
        lines.append(f"{name:<{width}}  {shown:>8}  {_DESCRIPTIONS[name]}")
    if result.get("pesq_error"):
        lines.append(f"PESQ (and CSIG/CBAK/COVL) missing: {result['pesq_error']}")
    return "\n".join(lines)


@click.command("metrics")
@click.argument("clean", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("degraded", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def metrics_command(clean: Path, degraded: Path, as_json: bool) -> None:
    """Score DEGRADED against the CLEAN reference: PESQ, STOI, ESTOI, CSIG, CBAK, COVL, SSNR.

    Any format and sample rate soundfile reads; both are mixed down to mono and
    resampled to 16 kHz, and the longer one is truncated to the shorter.
    """
    clean_audio = _load(clean, "CLEAN")
    degraded_audio = _load(degraded, "DEGRADED")
    result = score(clean_audio, degraded_audio, RATE)
    if as_json:
        payload = {key: _jsonable(value) for key, value in result.items()}
        payload.update(clean=str(clean), degraded=str(degraded), rate=RATE)
        click.echo(json.dumps(payload, indent=2))
    else:
        click.echo(format_table(result))
