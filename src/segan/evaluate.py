"""The ``evaluate`` stage: score SEGAN and three reference systems on the whole test set.

For every test utterance (full length, not windows) four systems are scored against the
clean reference with :func:`segan.metrics.score`:

* ``noisy``            the unprocessed input (the floor every system must beat)
* ``segan``            the model, via :func:`segan.enhance.enhance_signal`
* ``wiener``           a classic Wiener filter (:func:`segan.baselines.wiener`)
* ``spectral_gating``  noisereduce's spectral gating (:func:`segan.baselines.spectral_gating`)

How the work is split (2 CPU cores in CI): the model runs in the main process, one
utterance at a time with its windows batched, so there is one copy of the model (and the
GPU, when there is one, is used). Each enhanced utterance is handed at once to a process
pool (``evaluate.workers``, forkserver) that computes the two baselines and the 28 scores
(single-threaded numpy/C code, so processes are what parallelise them). The main process
enhances the next utterance while the pool scores, with a bounded queue, and torch gets
the cores the pool leaves free (at least one thread): on 2 cores, 2 workers + 1 torch
thread measured fastest, since scoring costs more than enhancing. Results are collected in
manifest order, so every output is identical for any number of workers.

With ``evaluate.workers > 1`` a script calling :func:`evaluate` must guard its entry point
with ``if __name__ == "__main__":`` (the forkserver re-imports the main module).

Outputs in ``reports_dir`` (all written atomically): ``metrics.json`` (DVC metrics: mean,
95 % CI and count per system and metric), ``eval_per_utterance.csv``, ``eval_by_snr.csv`` /
``eval_by_noise.csv`` (DVC plots, wide: PESQ per system under the bare system names, other
metrics as ``<metric>_<system>``, see :func:`segan.reports.wide_table`) with PNG bar charts
of every metric, ``results.md`` and ``examples/``.

The 95 % confidence interval is the t-distribution half-width over utterances,
``t(0.975, n-1) * sd / sqrt(n)``: utterance scores are independent draws from the test
set, and with n in the tens to hundreds the t interval is accurate and, unlike a
bootstrap, deterministic.
"""

from __future__ import annotations

import json
import collections
import logging
import math
import multiprocessing
import os
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import numpy as np
import pandas as pd
from tqdm import tqdm

from . import reports
from .audio import load_mono
from .config import Params
from .fsutil import atomic_dir, write_json, write_text

log = logging.getLogger(__name__)

SYSTEMS = ("noisy", "segan", "wiener", "spectral_gating")
METRICS = ("pesq", "stoi", "estoi", "csig", "cbak", "covl", "ssnr")
PER_UTTERANCE_COLUMNS = ("utterance", "system", "noise", "snr", "seconds", *METRICS, "pesq_error")

METRICS_JSON = "metrics.json"
PER_UTTERANCE_CSV = "eval_per_utterance.csv"
BY_SNR_CSV, BY_SNR_PNG = "eval_by_snr.csv", "eval_by_snr.png"
BY_NOISE_CSV, BY_NOISE_PNG = "eval_by_noise.csv", "eval_by_noise.png"
RESULTS_MD = "results.md"
EXAMPLES_DIR = "examples"


class EvaluationError(RuntimeError):
    """Scoring one utterance failed for a reason other than an undefined metric."""


# ----------------------------------------------------------------------------- per-utterance work
@dataclass(frozen=True)
class ScoreTask:
    """Everything a worker needs to score one utterance (arrays travel by pickle)."""

    index: int
    utterance: str
    clean_path: Path
    noisy: np.ndarray
    enhanced: np.ndarray
    rate: int
    prop_decrease: float


def system_outputs(noisy: np.ndarray, enhanced: np.ndarray, rate: int, prop_decrease: float) -> dict[str, np.ndarray]:
    """The signal each system produces for one noisy utterance, in :data:`SYSTEMS` order."""
    from .baselines import spectral_gating, wiener

    return {
        "noisy": noisy,
        "segan": enhanced,
        "wiener": wiener(noisy, rate),
        "spectral_gating": spectral_gating(noisy, rate, prop_decrease=prop_decrease),
    }


def score_utterance(task: ScoreTask) -> list[dict[str, Any]]:
    """Run the baselines and score all four systems for one utterance (runs in a worker).

    Undefined metrics (PESQ on silence, ...) come back as NaN with ``pesq_error`` set;
    anything else raises :class:`EvaluationError` naming the utterance and system.
    """
    from .metrics import score

    system = "clean"
    try:
        clean = load_mono(task.clean_path, task.rate)
        n = min(len(clean), len(task.noisy))
        if len(clean) != len(task.noisy):
            log.warning("%s: clean has %d samples, noisy %d; scoring the first %d",
                        task.utterance, len(clean), len(task.noisy), n)
        clean = clean[:n]
        rows = []
        outputs = system_outputs(task.noisy[:n], task.enhanced[:n], task.rate, task.prop_decrease)
        for system, signal in outputs.items():
            s = score(clean, np.asarray(signal)[:n], task.rate)
            rows.append({"system": system, **{m: float(s[m]) for m in METRICS}, "pesq_error": s.get("pesq_error")})
        return rows
    except Exception as exc:  # noqa: BLE001 - re-raised with the utterance named
        raise EvaluationError(f"utterance {task.utterance!r} ({task.clean_path}), system {system!r}: "
                              f"{type(exc).__name__}: {exc}") from exc


# ----------------------------------------------------------------------------- statistics
def mean_ci95(values: Iterable[float]) -> dict[str, float | int | None]:
    """Mean, t-distribution 95 % half-width and count of the finite values (None when undefined)."""
    from scipy.stats import t

    v = np.asarray(list(values), dtype=np.float64)
    v = v[np.isfinite(v)]
    n = int(v.size)
    if n == 0:
        return {"mean": None, "ci95": None, "n": 0}
    ci = None
    if n > 1:
        ci = round(float(t.ppf(0.975, n - 1) * v.std(ddof=1) / math.sqrt(n)), 4)
    return {"mean": round(float(v.mean()), 4), "ci95": ci, "n": n}


def summarize(per_utterance: pd.DataFrame) -> dict[str, Any]:
    """The ``metrics.json`` content: per system and metric ``{mean, ci95, n}``, plus counts.

    ``pesq_missing`` counts the (utterance, system) pairs whose PESQ (and so CSIG/CBAK/COVL)
    is undefined, by system and by reason.
    """
    out: dict[str, Any] = {}
    for system in SYSTEMS:
        rows = per_utterance[per_utterance["system"] == system]
        out[system] = {m: mean_ci95(rows[m]) for m in METRICS}
    errors = per_utterance[per_utterance["pesq_error"].notna() & (per_utterance["pesq_error"] != "")]
    out["pesq_missing"] = {
        "total": int(len(errors)),
        "by_system": {s: int((errors["system"] == s).sum()) for s in SYSTEMS},
        "reasons": {str(k): int(v) for k, v in errors["pesq_error"].value_counts(sort=False).sort_index().items()},
    }
    first = per_utterance.drop_duplicates("utterance")
    out["utterances"] = int(len(first))
    out["seconds"] = round(float(first["seconds"].sum()), 2)
    return out


# ----------------------------------------------------------------------------- parallel map
T = TypeVar("T")
R = TypeVar("R")


def ordered_map(fn: Callable[[T], R], items: Iterable[T], executor: Executor | None, in_flight: int) -> Iterator[R]:
    """``map(fn, items)`` on ``executor`` in input order with at most ``in_flight`` pending.

    ``items`` is consumed lazily, so producing an item (enhancing an utterance) overlaps
    with scoring the ones already submitted, and memory stays bounded.
    """
    if executor is None:
        yield from map(fn, items)
        return
    it = iter(items)
    pending: collections.deque[Future[R]] = collections.deque()
    try:
        for item in it:
            pending.append(executor.submit(fn, item))
            if len(pending) >= in_flight:
                break
        while pending:
            result = pending.popleft().result()
            for item in it:
                pending.append(executor.submit(fn, item))
                break
            yield result
    finally:
        for fut in pending:
            fut.cancel()


def make_executor(workers: int) -> ProcessPoolExecutor | None:
    """A forkserver pool (fork-safe although the main process runs torch threads); None for 1."""
    if workers <= 1:
        return None  # in-process: no start-up cost, plain tracebacks
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        # import the scoring stack once in the server (no-op if it already runs), not once per worker
        ctx.set_forkserver_preload(["segan.evaluate", "segan.metrics", "segan.baselines", "noisereduce", "pesq",
                                    "pystoi"])
    else:
        ctx = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(workers, mp_context=ctx)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))  # honours taskset/cgroup CPU pinning
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _share_cores_with_pool(workers: int) -> int:
    """Give torch (the model, in this process) the cores the scoring pool leaves free.

    Measured on 2 cores (paper-size model, 3 s utterances): scoring one utterance (two
    baselines + 28 metrics) costs ~1.5x its enhancement, so 2 pool workers + 1 torch thread
    is fastest; torch's default of one thread per core oversubscribes and was ~1.7x slower.
    Returns the previous thread count to restore (0 when nothing was changed).
    """
    if workers <= 0:
        return 0
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, _cpu_count() - workers))
    return before


def example_indices(count: int, total: int) -> list[int]:
    """``count`` utterance indices spread evenly over the test set (covering its SNRs/noises)."""
    if count <= 0 or total <= 0:
        return []
    return sorted({int(round(i)) for i in np.linspace(0, total - 1, min(count, total))})


# ----------------------------------------------------------------------------- the stage
def evaluate(params: Params, prepared_dir: Path, model_spec: str, reports_dir: Path, *,
             run_file: Path | None = None, progress: bool = True, device: str | None = None) -> dict:
    """Enhance and score the test set; write the reports; return the ``metrics.json`` content.

    ``device`` defaults to ``params.train.device`` (``auto``: CUDA when available). When
    ``run_file`` (``mlflow_run.json`` beside the generator) exists, the means are logged as
    ``eval/<system>/<metric>`` into the training run, with the reports as artifacts.
    """
    from .data.dataset import load_test_manifest
    from .enhance import enhance_signal
    from .loading import load_enhancer

    prepared_dir, reports_dir = Path(prepared_dir), Path(reports_dir)
    cfg, enh = params.evaluate, params.enhance
    manifest = load_test_manifest(prepared_dir)
    if cfg.max_utterances > 0:
        manifest = manifest.head(cfg.max_utterances)
    if manifest.empty:
        raise ValueError(f"{prepared_dir}: the test manifest lists no utterances")
    manifest = manifest.reset_index(drop=True)

    executor = make_executor(cfg.workers)  # started first: its workers boot while the model loads
    threads_before = _share_cores_with_pool(cfg.workers if executor else 0)
    try:
        runner = load_enhancer(model_spec, device=device or params.train.device)
        rate = int(runner.sample_rate)
        log.info("evaluating %s on %d test utterances (%.1f min) with %d worker(s)", model_spec, len(manifest),
                 manifest["seconds"].sum() / 60, cfg.workers)
        examples = set(example_indices(cfg.num_examples, len(manifest)))

        with atomic_dir(reports_dir / EXAMPLES_DIR) as examples_tmp:
            def tasks() -> Iterator[ScoreTask]:
                for i, row in manifest.iterrows():
                    noisy = load_mono(prepared_dir / row["noisy_path"], rate)
                    enhanced = enhance_signal(noisy, rate, runner, overlap=enh.overlap,
                                              batch_size=enh.batch_size, seed=enh.seed)
                    enhanced = np.asarray(enhanced, dtype=np.float32)
                    if enhanced.shape != noisy.shape:
                        raise EvaluationError(f"{model_spec}: enhance_signal returned shape {enhanced.shape} "
                                              f"for input {noisy.shape} ({row['utterance']})")
                    if i in examples:
                        write_example(examples_tmp, row["utterance"], prepared_dir / row["clean_path"],
                                      noisy, enhanced, rate)
                    yield ScoreTask(int(i), row["utterance"], prepared_dir / row["clean_path"], noisy,
                                    enhanced, rate, cfg.noisereduce_prop_decrease)

            records: list[dict[str, Any]] = []
            bar = tqdm(total=len(manifest), desc="evaluate", unit="utt", disable=None if progress else True)
            with bar:
                for (_, row), scored in zip(manifest.iterrows(),
                                            ordered_map(score_utterance, tasks(), executor, 2 * cfg.workers)):
                    for r in scored:
                        records.append({"utterance": row["utterance"], "noise": row["noise"], "snr": row["snr"],
                                        "seconds": row["seconds"], **r})
                    bar.update()
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        if threads_before:
            import torch

            torch.set_num_threads(threads_before)

    per_utterance = pd.DataFrame.from_records(records, columns=list(PER_UTTERANCE_COLUMNS))
    summary = summarize(per_utterance)
    written = write_reports(per_utterance, summary, reports_dir, model_spec=model_spec)
    log_to_run(run_file, summary, [*written, *sorted((reports_dir / EXAMPLES_DIR).glob("*"))])
    _log_headline(summary)
    return summary


def write_example(folder: Path, utterance: str, clean_path: Path, noisy: np.ndarray, enhanced: np.ndarray,
                  rate: int) -> None:
    """noisy / enhanced / clean wavs and a spectrogram comparison for one utterance."""
    from scipy.io import wavfile

    clean = load_mono(clean_path, rate)
    for name, x in (("noisy", noisy), ("enhanced", enhanced), ("clean", clean)):
        # float32 wav: no clipping or requantisation of what the metrics saw. scipy's writer,
        # not libsndfile's, which stamps float wavs with the time (DVC would see a new output
        # every run). ``folder`` is a temp dir swapped in whole, so no per-file temp is needed.
        wavfile.write(folder / f"{utterance}_{name}.wav", rate, np.ascontiguousarray(x, dtype=np.float32))
    reports.plot_spectrograms({"noisy": noisy, "enhanced (segan)": enhanced, "clean": clean}, rate,
                              folder / f"{utterance}_spectrogram.png", title=utterance)


def write_reports(per_utterance: pd.DataFrame, summary: dict, reports_dir: Path, *, model_spec: str) -> list[Path]:
    """Write metrics.json, the CSVs, the charts and results.md; return their paths."""
    reports_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: reports_dir / name for name in (METRICS_JSON, PER_UTTERANCE_CSV, BY_SNR_CSV, BY_SNR_PNG,
                                                   BY_NOISE_CSV, BY_NOISE_PNG, RESULTS_MD)}
    write_json(paths[METRICS_JSON], summary)
    reports.write_csv(per_utterance, paths[PER_UTTERANCE_CSV])
    for by, csv, png in (("snr", BY_SNR_CSV, BY_SNR_PNG), ("noise", BY_NOISE_CSV, BY_NOISE_PNG)):
        table = reports.breakdown(per_utterance, by, SYSTEMS)
        reports.write_csv(reports.wide_table(table, by, SYSTEMS), paths[csv])
        reports.plot_breakdown(table, by, paths[png], SYSTEMS, title=f"Mean scores by {'SNR' if by == 'snr' else 'noise type'}")
    missing = summary["pesq_missing"]
    notes = [
        f"{summary['utterances']} test utterances ({summary['seconds'] / 60:.1f} min), full length; "
        f"model `{model_spec}`.",
        "Cells: mean ± 95 % confidence half-width (t-distribution over utterances).",
        "PESQ: wide-band P.862.2; CSIG/CBAK/COVL: Hu & Loizou composite; SSNR: segmental SNR (dB).",
    ]
    if missing["total"]:
        reasons = "; ".join(f"{k} ({v})" for k, v in missing["reasons"].items())
        notes.append(f"PESQ undefined for {missing['total']} utterance/system pair(s), left out of PESQ and "
                     f"CSIG/CBAK/COVL means: {reasons}.")
    write_text(paths[RESULTS_MD], reports.results_markdown(summary, SYSTEMS, METRICS, notes=notes))
    return list(paths.values())


def log_to_run(run_file: Path | None, summary: dict, artifacts: list[Path]) -> None:
    """Add the means and reports to the training run recorded in ``run_file``; failures only warn."""
    if run_file is None:
        return
    run_file = Path(run_file)
    if not run_file.exists():
        log.warning("MLflow: %s not found; evaluation results are not logged to the training run", run_file)
        return
    try:
        from .tracking import open_run_from_file

        tracker = open_run_from_file(run_file)
        metrics = {f"eval/{system}/{m}": rec["mean"] for system in SYSTEMS
                   for m, rec in summary[system].items() if rec["mean"] is not None}
        metrics["eval/pesq_missing"] = summary["pesq_missing"]["total"]
        tracker.log_metrics(metrics, step=0)
        for path in artifacts:
            where = "evaluation/examples" if path.parent.name == EXAMPLES_DIR else "evaluation"
            tracker.log_artifact(path, artifact_path=where)
    except Exception as exc:  # noqa: BLE001 - tracking must never fail the evaluation
        log.warning("MLflow: logging the evaluation to the run in %s failed (%s: %s)", run_file,
                    type(exc).__name__, exc)


def _log_headline(summary: dict) -> None:
    def fmt(system: str, metric: str) -> str:
        mean = summary[system][metric]["mean"]
        return "n/a" if mean is None else f"{mean:.3f}"

    for system in SYSTEMS:
        log.info("%-16s PESQ %s  STOI %s  CSIG %s  CBAK %s  COVL %s  SSNR %s", system,
                 *(fmt(system, m) for m in ("pesq", "stoi", "csig", "cbak", "covl", "ssnr")))


def card_with_metrics(card_path: Path, summary: dict, out_path: Path) -> dict:
    """The export's model card with the evaluation filled in, written to ``out_path``.

    The card beside the exported files stays as the export stage wrote it (rewriting it
    would make DVC consider the export stale); this copy is the complete card.
    """
    card = json.loads(Path(card_path).read_text())
    card["metrics"] = {system: {m: v["mean"] for m, v in summary[system].items() if isinstance(v, dict)}
                       for system in SYSTEMS if system in summary}
    card["metrics_source"] = "reports/metrics.json (mean over the test set)"
    write_json(out_path, card)
    return card
