"""``segan enhance``: denoise audio files with an exported (or checkpointed) SEGAN generator."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

DEFAULT_MODEL = Path("data/models/exported/generator.ts")

log = logging.getLogger(__name__)


def default_model() -> Path:
    from .fsutil import repo_root

    return repo_root() / DEFAULT_MODEL


@click.command("enhance", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="INPUT...")
@click.option("-o", "--out-dir", "out_dir", required=True, metavar="OUTDIR",
              type=click.Path(path_type=Path, file_okay=False),
              help="Folder for the enhanced files (created). Each output keeps its input's name, rate, "
                   "channel count, length and format; files found in an INPUT folder keep their "
                   "sub-folders. Must not be the folder of an input.")
@click.option("-m", "--model", "model", default=None, metavar="SPEC",
              help="generator.ts (TorchScript), generator.onnx (ONNX Runtime), a training checkpoint "
                   "generator.pt, or an MLflow URI such as models:/segan-generator/1. "
                   "Default: the pipeline's export, <project>/data/models/exported/generator.ts.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where the model runs (auto = cuda when available).")
@click.option("--overlap", type=click.FloatRange(0.0, 0.9), default=0.5, show_default=True,
              help="Fraction by which consecutive model windows overlap (cross-faded).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Windows per model call.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the latent noise z: the same input and seed give the same output.")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs (default: keep them and skip).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def enhance_command(inputs: tuple[Path, ...], out_dir: Path, model: str | None, device: str, overlap: float,
                    batch_size: int, seed: int, overwrite: bool, quiet: bool) -> None:
    """Enhance INPUT audio files or folders (searched recursively) into OUTDIR.

    Any format soundfile reads, any sample rate (resampled to the model's and back), mono or
    multi-channel (each channel enhanced), any length. Files that cannot be read are
    reported and skipped; the exit status is then 1.

    \b
    Examples:
      segan enhance noisy.wav -o enhanced/
      segan enhance recordings/ -o enhanced/ --model models:/segan-generator/3
    """
    from .enhance import EnhanceError, enhance_files
    from .loading import ModelLoadError, load_enhancer

    spec = model or str(default_model())
    if model is None and not Path(spec).exists():
        raise click.UsageError(f"no --model given and the pipeline's export {spec} does not exist; "
                               "run `dvc repro export` or pass --model")
    try:
        runner = load_enhancer(spec, device=device)
    except ModelLoadError as exc:
        raise click.ClickException(str(exc)) from None
    log.info("model %s", runner)
    try:
        summary = enhance_files(list(inputs), out_dir, runner, overlap=overlap, batch_size=batch_size, seed=seed,
                                overwrite=overwrite, progress=not quiet)
    except EnhanceError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(summary.format(), err=not summary.ok)
    if summary.kept:
        click.echo(f"kept {len(summary.kept)} existing output(s); pass --overwrite to replace them", err=True)
    if not summary.ok:
        sys.exit(1)
