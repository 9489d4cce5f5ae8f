"""`make bench`: run every benchmark script and collect their JSON under bench/results/.

Each script measures its own baseline in the same run and reports ratios, so the numbers
are comparable across machines; absolute figures describe this machine only.
Pass --quick for a shorter smoke run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["prepare.py", "train_step.py", "enhance.py", "metrics.py"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer iterations / shorter audio")
    parser.add_argument("--only", nargs="*", default=None, help="subset of scripts, e.g. enhance.py")
    args = parser.parse_args()
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    failed = []
    for script in args.only or SCRIPTS:
        cmd = [sys.executable, str(HERE / script), "--json", str(out / script.replace(".py", ".json"))]
        if args.quick:
            cmd.append("--quick")
        print(f"\n=== {script} ===", flush=True)
        start = time.perf_counter()
        rc = subprocess.call(cmd)
        print(f"--- {script}: exit {rc} in {time.perf_counter() - start:.0f} s", flush=True)
        if rc:
            failed.append(script)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
