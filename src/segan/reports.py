"""Evaluation reports: breakdown tables, bar charts, spectrograms and the Markdown results table.

Figures are drawn with matplotlib's object API (``Figure`` + Agg canvas), never pyplot, so
nothing depends on a display or on pyplot's global state, and every file is written
atomically (temp file + rename).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from .fsutil import atomic_path

# Metrics shown in breakdowns and charts (ESTOI stays in the per-utterance CSV and metrics.json).
CHART_METRICS = ("pesq", "stoi", "csig", "cbak", "covl", "ssnr")
LABELS = {"pesq": "PESQ", "stoi": "STOI", "estoi": "ESTOI", "csig": "CSIG", "cbak": "CBAK",
          "covl": "COVL", "ssnr": "segSNR (dB)"}
UNKNOWN = "unknown"


def _group_label(value: object, by: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return UNKNOWN
    if by == "snr":
        return f"{float(value):g}"
    return str(value)


def breakdown(per_utterance: pd.DataFrame, by: str, systems: Sequence[str],
              metrics: Sequence[str] = CHART_METRICS) -> pd.DataFrame:
    """Mean of each metric per (``by`` group, system), plus the utterance count ``n``.

    ``by`` is ``"snr"`` (ascending, numeric order) or ``"noise"`` (alphabetical); rows with an
    unknown group (NaN SNR) are labelled ``unknown`` and sorted last. NaN scores (a failed
    PESQ) are left out of a mean rather than poisoning it.
    """
    if by not in per_utterance.columns:
        raise KeyError(f"breakdown by {by!r}: no such column in the per-utterance table")
    df = per_utterance.copy()
    df[by] = [_group_label(v, by) for v in df[by]]
    grouped = df.groupby([by, "system"], sort=False)
    out = grouped[list(metrics)].mean().round(4)
    out["n"] = grouped.size()
    out = out.reset_index()

    def group_key(label: str) -> tuple:
        if label == UNKNOWN:
            return (1, 0.0, "")
        return (0, float(label), "") if by == "snr" else (0, 0.0, label)

    order = {s: i for i, s in enumerate(systems)}
    out["_g"] = out[by].map(group_key)
    out["_s"] = out["system"].map(lambda s: order.get(s, len(order)))
    return out.sort_values(["_g", "_s"]).drop(columns=["_g", "_s"]).reset_index(drop=True)


def wide_table(table: pd.DataFrame, by: str, systems: Sequence[str],
               metrics: Sequence[str] = CHART_METRICS, headline: str = "pesq") -> pd.DataFrame:
    """One row per group, for ``dvc plots`` (which draws one line/bar per column).

    Columns: ``by`` (SNR as a number, empty when unknown; noise as text), ``n`` (utterances),
    the ``headline`` metric (PESQ) per system under the bare system names (``noisy``,
    ``segan``, ...), then every other metric as ``<metric>_<system>``. Groups keep the
    order of :func:`breakdown`.
    """
    groups = list(dict.fromkeys(table[by]))
    indexed = table.set_index([by, "system"])
    rows = []
    for g in groups:
        key = float(g) if by == "snr" and g != UNKNOWN else (math.nan if by == "snr" else g)
        row: dict[str, object] = {by: key, "n": int(indexed.xs(g, level=by)["n"].max())}
        for metric in (headline, *[m for m in metrics if m != headline]):
            for system in systems:
                name = system if metric == headline else f"{metric}_{system}"
                row[name] = indexed[metric].get((g, system), math.nan)
        rows.append(row)
    return pd.DataFrame(rows)


def write_csv(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path, suffix=".csv") as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g", na_rep="")


def _save(fig, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    with atomic_path(path, suffix=".png") as tmp:
        # no "Software" stamp: the PNG then only changes when the numbers do
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})


def plot_breakdown(table: pd.DataFrame, by: str, path: Path, systems: Sequence[str],
                   metrics: Sequence[str] = CHART_METRICS, title: str = "") -> None:
    """Grouped bar charts (one bar per system in each ``by`` group), one subplot per metric."""
    from matplotlib.figure import Figure

    groups = list(dict.fromkeys(table[by]))
    systems = [s for s in systems if s in set(table["system"])]
    ncols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    width_in = min(30.0, max(11.0, 1.0 + 0.18 * len(groups) * len(systems) * ncols))
    height_in = 3.2 * nrows + 0.9
    fig = Figure(figsize=(width_in, height_in))
    # fixed margins instead of constrained layout: several times faster to draw, same look
    fig.subplots_adjust(left=0.05, right=0.97, bottom=0.6 / height_in, top=1 - 0.9 / height_in,
                        wspace=0.18, hspace=0.45)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    x = np.arange(len(groups))
    bar = 0.8 / max(1, len(systems))
    for ax, metric in zip(axes, metrics):
        for j, system in enumerate(systems):
            rows = table[table["system"] == system].set_index(by)
            values = [rows[metric].get(g, np.nan) for g in groups]
            ax.bar(x + (j - (len(systems) - 1) / 2) * bar, values, bar, label=system, color=f"C{j}")
        ax.set_title(LABELS.get(metric, metric))
        ax.set_xticks(x, groups, rotation=30 if by == "noise" and len(groups) > 4 else 0)
        ax.set_xlabel("SNR (dB)" if by == "snr" else "noise")
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 1 - 0.35 / height_in),
               ncols=len(systems), frameon=False)
    if title:
        fig.suptitle(title, y=1 - 0.08 / height_in, va="top")
    _save(fig, path)


def plot_spectrograms(signals: Mapping[str, np.ndarray], rate: int, path: Path, title: str = "") -> None:
    """Stacked log-magnitude spectrograms (e.g. noisy / enhanced / clean) on one colour scale."""
    from matplotlib.figure import Figure
    from scipy.signal import spectrogram

    nperseg = min(512, max(16, min(len(x) for x in signals.values())))
    specs = {}
    for name, x in signals.items():
        f, t, s = spectrogram(np.asarray(x, dtype=np.float64), fs=rate, nperseg=nperseg,
                              noverlap=nperseg * 3 // 4, window="hann", mode="magnitude")
        specs[name] = (f, t, 20 * np.log10(s + 1e-10))
    vmax = max(float(s.max()) for _, _, s in specs.values())
    height_in = 2.2 * len(specs) + 0.8
    fig = Figure(figsize=(10, height_in))
    fig.subplots_adjust(left=0.07, right=0.9, bottom=0.5 / height_in, top=1 - 0.45 / height_in, hspace=0.35)
    axes = fig.subplots(len(specs), 1, sharex=True, squeeze=False).ravel()
    image = None
    for ax, (name, (f, t, s)) in zip(axes, specs.items()):
        # imshow, not pcolormesh: a regular grid, and an order of magnitude faster to render
        image = ax.imshow(s, origin="lower", aspect="auto", cmap="magma", vmin=vmax - 80, vmax=vmax,
                          extent=(0.0, float(t[-1] + t[0]) if len(t) else 0.0, 0.0, rate / 2000),
                          interpolation="nearest")
        ax.set_ylabel("kHz")
        ax.set_title(name, loc="left", fontsize=10)
    axes[-1].set_xlabel("time (s)")
    if image is not None:
        cax = fig.add_axes((0.92, 0.5 / height_in, 0.015, 1 - 0.95 / height_in))
        fig.colorbar(image, cax=cax, label="dB")
    if title:
        fig.suptitle(title, y=1 - 0.05 / height_in, va="top")
    _save(fig, path)


def _cell(record: Mapping[str, object] | None, digits: int) -> str:
    if not record or record.get("mean") is None:
        return "n/a"
    mean = f"{record['mean']:.{digits}f}"
    ci = record.get("ci95")
    return mean if ci is None else f"{mean} ± {ci:.{digits}f}"


def results_markdown(summary: Mapping[str, object], systems: Sequence[str], metrics: Sequence[str],
                     *, notes: Sequence[str] = ()) -> str:
    """The results table: one row per system, one column per metric as ``mean ± ci95``."""
    digits = {"stoi": 3, "estoi": 3, "ssnr": 2}
    header = "| system | " + " | ".join(LABELS.get(m, m) for m in metrics) + " |"
    rule = "|---|" + "---:|" * len(metrics)
    lines = ["# Evaluation results", "", header, rule]
    for system in systems:
        records = summary.get(system) or {}
        cells = [_cell(records.get(m), digits.get(m, 2)) for m in metrics]  # type: ignore[union-attr]
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.extend(f"- {note}" for note in notes)
    return "\n".join(lines).rstrip() + "\n"
