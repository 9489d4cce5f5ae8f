"""Shared entry-point plumbing for the thin ``pipeline/*.py`` stage scripts.

A stage script is ``run_stage(name, body)``: logging is set up, params.yaml is loaded
and validated (overrides from ``--set key=value`` for runs without DVC), and an
expected failure (bad params, bad input data) ends with one clear line and exit code 2
instead of a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable

import yaml

from .config import ConfigError, Params, load_params

log = logging.getLogger("segan.stage")

# Errors a user can fix (input data, params); anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError, ValueError)


def parse_overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: expected key=value, e.g. train.g_lambda=50")
        out[key.strip()] = yaml.safe_load(value)
    return out


def run_stage(name: str, body: Callable[[Params, argparse.Namespace], object],
              configure: Callable[[argparse.ArgumentParser], None] | None = None,
              user_errors: tuple[type[BaseException], ...] = ()) -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    parser = argparse.ArgumentParser(prog=f"pipeline/{name}.py", description=f"DVC stage '{name}'.")
    parser.add_argument("--params", default="params.yaml", type=Path, help="params file (default params.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param for this run, e.g. --set train.max_steps=10")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    if configure:
        configure(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [{name}] %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    start = time.perf_counter()
    try:
        params = load_params(args.params, parse_overrides(args.overrides))
        body(params, args)
    except USER_ERRORS + user_errors as exc:
        log.error("%s", exc)
        sys.exit(2)
    except KeyboardInterrupt:
        log.error("interrupted")
        sys.exit(130)
    log.info("stage %s done in %.1f s", name, time.perf_counter() - start)
