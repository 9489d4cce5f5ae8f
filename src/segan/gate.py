"""CI regression gate: compare a fresh ``metrics.json`` against a committed baseline.

Every gated metric is higher-is-better (PESQ, STOI, CSIG, CBAK, COVL, segSNR). A metric
fails when ``new < old - tolerance``, or when it is missing or not a finite number in the
current metrics (a metric that silently disappeared is a regression, not a pass).

Both files are the shape written by :mod:`segan.evaluate`::

    {"segan": {"pesq": {"mean": 2.31, "ci95": 0.04, "n": 824}, ...}, "noisy": {...}, ...}

A bare number in place of the ``{"mean": ...}`` record is accepted too, so a hand-written
baseline can stay minimal.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .fsutil import write_text


class GateError(ValueError):
    """A metrics or baseline file that is missing or not in the expected shape."""


@dataclass(frozen=True)
class Row:
    """One gated metric: old (baseline) and new (current) values and the verdict."""

    metric: str
    old: float | None
    new: float | None
    tolerance: float
    ok: bool
    reason: str = ""

    @property
    def change(self) -> float | None:
        if self.old is None or self.new is None:
            return None
        return self.new - self.old

    @property
    def allowed(self) -> float | None:
        """The lowest new value that still passes."""
        return None if self.old is None else self.old - self.tolerance


def load_metrics(path: str | Path, system: str, *, what: str = "metrics") -> dict:
    """Read a metrics JSON file and check it has a mapping for ``system``.

    Raises :class:`GateError` naming the file when it is missing, not JSON, or lacks the system.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        hint = " (create it deliberately with `segan check-metrics --update-baseline`)" if what == "baseline" else ""
        raise GateError(f"{what} file {path} not found{hint}") from None
    except OSError as exc:
        raise GateError(f"{what} file {path}: cannot read ({exc.strerror})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise GateError(f"{what} file {path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise GateError(f"{what} file {path}: expected a JSON object of systems, got {type(data).__name__}")
    if system not in data:
        systems = sorted(k for k, v in data.items() if isinstance(v, dict))
        raise GateError(f"{what} file {path}: no system {system!r} (found {systems})")
    if not isinstance(data[system], dict):
        raise GateError(f"{what} file {path}: {system!r} should map metric names to values, "
                        f"got {data[system]!r}")
    return data


def metric_value(entry: Any) -> float | None:
    """The mean of a metric record (``{"mean": x}`` or a bare number); None if absent or not finite."""
    if isinstance(entry, dict):
        entry = entry.get("mean")
    if isinstance(entry, bool) or not isinstance(entry, (int, float)):
        return None
    value = float(entry)
    return value if math.isfinite(value) else None


def compare(baseline: dict, current: dict, tolerances: dict[str, float], system: str = "segan") -> list[Row]:
    """Gate ``current[system]`` against ``baseline[system]`` for every metric in ``tolerances``.

    Rows come in ``tolerances`` order. A row fails when the new value is missing/NaN, the
    baseline lacks the metric (refresh it with ``--update-baseline``), or ``new < old - tol``.
    """
    if not tolerances:
        raise GateError("no metrics to gate: gate.tolerances is empty")
    base_sys = baseline.get(system) or {}
    cur_sys = current.get(system) or {}
    rows = []
    for metric, tol in tolerances.items():
        tol = float(tol)
        if tol < 0 or not math.isfinite(tol):
            raise GateError(f"gate.tolerances.{metric}: expected a finite value >= 0, got {tol!r}")
        old = metric_value(base_sys.get(metric))
        new = metric_value(cur_sys.get(metric))
        if new is None:
            reason = "missing" if metric not in cur_sys else "not a finite number"
            rows.append(Row(metric, old, None, tol, False, f"{reason} in current metrics"))
        elif old is None:
            rows.append(Row(metric, None, new, tol, False, "missing in baseline (refresh it with --update-baseline)"))
        elif new < old - tol:
            rows.append(Row(metric, old, new, tol, False, f"dropped by {old - new:.4g} > tolerance {tol:g}"))
        else:
            rows.append(Row(metric, old, new, tol, True))
    return rows


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def format_table(rows: list[Row], system: str) -> str:
    """A plain-text table in the spirit of ``dvc metrics diff``."""
    header = ("Metric", "Old", "New", "Change", "Allowed", "Status")
    body = []
    for r in rows:
        allowed = "-" if r.allowed is None else f">= {r.allowed:.4f}"
        status = "ok" if r.ok else f"FAIL: {r.reason}"
        body.append((f"{system}.{r.metric}", _fmt(r.old), _fmt(r.new), _fmt(r.change, signed=True),
                     allowed, status))
    widths = [max(len(line[i]) for line in (header, *body)) for i in range(len(header) - 1)]

    def line(cells: tuple[str, ...]) -> str:
        left = [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:-1], widths[1:])]
        return "  ".join(left + [cells[-1]]).rstrip()

    return "\n".join([line(header), *map(line, body)])


def count_note(baseline: dict, current: dict, system: str) -> str | None:
    """A warning when the two files were scored on different numbers of utterances.

    Means over different test sets are not comparable (e.g. a baseline from the full test set
    against a CI run with ``evaluate.max_utterances``); the gate still runs, but says so.
    """
    def counts(data: dict) -> set[int]:
        return {int(v["n"]) for v in (data.get(system) or {}).values()
                if isinstance(v, dict) and isinstance(v.get("n"), int) and not isinstance(v.get("n"), bool)}

    old, new = counts(baseline), counts(current)
    if old and new and max(old) != max(new):
        return (f"note: baseline scored {max(old)} utterances, current {max(new)}; "
                "the means come from different test sets")
    return None


def update_baseline(metrics_path: str | Path, baseline_path: str | Path, system: str) -> dict:
    """Validate the current metrics and copy them to the baseline path atomically."""
    current = load_metrics(metrics_path, system)
    # Byte-for-byte copy (after validation) so the committed baseline diffs cleanly.
    write_text(baseline_path, Path(metrics_path).read_text())
    return current
