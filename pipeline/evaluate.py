"""Stage `evaluate`: enhance the whole test set with the exported model and score it
against the noisy input, a Wiener filter and spectral gating (PESQ, STOI, CSIG, CBAK,
COVL, SSNR) -> reports/metrics.json, breakdowns, plots and the completed model card."""

from pathlib import Path

from segan.stage import run_stage

EXPORTED = Path("data/models/exported")


def main(params, args):
    from segan.evaluate import card_with_metrics, evaluate
    summary = evaluate(params, Path("data/prepared"), str(EXPORTED / "generator.ts"), Path("reports"),
                       run_file=Path("data/models/mlflow_run.json"), progress=not args.quiet)
    card_with_metrics(EXPORTED / "model_card.json", summary, Path("reports/model_card.json"))


if __name__ == "__main__":
    run_stage("evaluate", main)
