"""Start the MLflow UI against the project's store (``make ui``).

One worker and no job execution, bound to 127.0.0.1, so it starts in seconds on a laptop
and is never reachable from the network. ``start_ui()`` is also what the browser test uses.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from .fsutil import repo_root
from .tracking import artifact_root, tracking_uri


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(port: int = 0, root: Path | None = None, log_file=None) -> tuple[subprocess.Popen, str]:
    """Launch ``mlflow server`` on 127.0.0.1 and wait until it answers; returns (process, url)."""
    root = root or repo_root()
    port = port or free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
    # The same store and artifact folder the pipeline logs to (segan.tracking).
    store = tracking_uri(root)
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store,
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    artifacts = artifact_root(store)
    if artifacts:
        cmd += ["--default-artifact-root", artifacts]
    proc = subprocess.Popen(cmd, env=env, cwd=root, stdout=log_file or subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with code {proc.returncode}: {' '.join(cmd)}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"mlflow server did not answer on {url} within 120 s")


def main() -> None:
    parser = argparse.ArgumentParser(description="MLflow UI for this project's runs (127.0.0.1 only).")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", 5000)))
    args = parser.parse_args()
    print(f"starting MLflow UI on the store {tracking_uri()} ...", flush=True)
    proc, url = start_ui(args.port, log_file=sys.stderr)
    print(f"MLflow UI: {url}  (experiment 'segan'; Ctrl-C to stop)", flush=True)
    try:
        proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    main()
