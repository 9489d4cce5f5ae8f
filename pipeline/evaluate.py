"""Stage `evaluate`: enhance the whole test set with the exported model and score it
against the noisy input, a Wiener filter and spectral gating (PESQ, STOI, CSIG, CBAK,
COVL, SSNR) -> reports/metrics.json, breakdowns and plots."""

from pathlib import Path

from segan.stage import run_stage


def main(params, args):
    from segan.evaluate import evaluate
    evaluate(params, Path("data/prepared"), "data/models/exported/generator.ts", Path("reports"),
             run_file=Path("data/models/mlflow_run.json"), progress=not args.quiet)


if __name__ == "__main__":
    run_stage("evaluate", main)
