"""Stage `train`: adversarial SEGAN training (data/prepared -> data/models/generator.pt).

Resumes by itself from data/models/checkpoints/last.pt after a crash or Ctrl-C. With
`train.nproc_per_node > 1` it re-launches itself under torchrun (DistributedDataParallel)."""

import os
import subprocess
import sys
from pathlib import Path

from segan.stage import run_stage

PREPARED, MODELS, REPORTS = Path("data/prepared"), Path("data/models"), Path("reports")


def main(params, args):
    nproc = params.train.nproc_per_node
    if nproc > 1 and "LOCAL_RANK" not in os.environ:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "segan.train", "--params", str(args.params), "--prepared", str(PREPARED),
               "--out", str(MODELS), "--reports", str(REPORTS)]
        for item in args.overrides:
            cmd += ["--set", item]
        raise SystemExit(subprocess.call(cmd))
    from segan.train import train
    train(params, PREPARED, MODELS, REPORTS, progress=not args.quiet)


if __name__ == "__main__":
    from segan.train import TrainingDiverged
    run_stage("train", main, user_errors=(TrainingDiverged,))
