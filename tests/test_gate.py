"""The CI regression gate: `segan check-metrics` against doctored metrics files."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from segan.cli_gate import check_metrics_command
from segan.gate import GateError, compare, format_table, load_metrics

TOLERANCES = {"pesq": 0.05, "stoi": 0.01, "csig": 0.05, "cbak": 0.05, "covl": 0.05, "ssnr": 0.5}

BASELINE = {
    "noisy": {"pesq": {"mean": 1.97, "ci95": 0.05, "n": 40}, "stoi": {"mean": 0.91, "ci95": 0.01, "n": 40}},
    "segan": {
        "pesq": {"mean": 2.30, "ci95": 0.05, "n": 40},
        "stoi": {"mean": 0.93, "ci95": 0.01, "n": 40},
        "estoi": {"mean": 0.80, "ci95": 0.01, "n": 40},
        "csig": {"mean": 3.40, "ci95": 0.06, "n": 40},
        "cbak": {"mean": 2.90, "ci95": 0.05, "n": 40},
        "covl": {"mean": 2.80, "ci95": 0.06, "n": 40},
        "ssnr": {"mean": 7.50, "ci95": 0.40, "n": 40},
    },
    "pesq_missing": {"total": 0},
}


def doctored(**changes: float | None) -> dict:
    """The baseline with some segan metric means replaced (None removes the metric)."""
    out = copy.deepcopy(BASELINE)
    for metric, value in changes.items():
        if value is None:
            del out["segan"][metric]
        else:
            out["segan"][metric]["mean"] = value
    return out


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder with params.yaml (gate section) and a committed baseline; the cwd,
    so the default relative paths resolve as they do in CI."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "reports").mkdir()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"gate": {
        "baseline": "reports/baseline_metrics.json", "system": "segan", "tolerances": TOLERANCES}}))
    (tmp_path / "reports" / "baseline_metrics.json").write_text(json.dumps(BASELINE))
    return tmp_path


def run_gate(workdir: Path, current: dict | str | None, *args: str):
    """Write reports/metrics.json (dict -> JSON, str -> raw text) and invoke the command."""
    metrics = workdir / "reports" / "metrics.json"
    if isinstance(current, dict):
        metrics.write_text(json.dumps(current))
    elif isinstance(current, str):
        metrics.write_text(current)
    return CliRunner().invoke(check_metrics_command, list(args), catch_exceptions=False)


def test_identical_metrics_pass(workdir: Path) -> None:
    result = run_gate(workdir, BASELINE)
    assert result.exit_code == 0, result.output
    assert "segan.pesq" in result.output and "OK: all 6 metrics" in result.output


def test_pesq_drop_within_tolerance_passes(workdir: Path) -> None:
    result = run_gate(workdir, doctored(pesq=2.26, ssnr=7.1))
    assert result.exit_code == 0, result.output
    assert "-0.0400" in result.output
    assert "note:" not in result.output


def test_different_test_set_size_is_noted(workdir: Path) -> None:
    current = doctored()
    for record in current["segan"].values():
        record["n"] = 8
    result = run_gate(workdir, current)
    assert result.exit_code == 0
    assert "baseline scored 40 utterances, current 8" in result.output


def test_pesq_drop_beyond_tolerance_fails(workdir: Path) -> None:
    result = run_gate(workdir, doctored(pesq=2.20))
    assert result.exit_code == 1, result.output
    assert "REGRESSION" in result.output and "pesq" in result.output
    line = next(l for l in result.output.splitlines() if l.startswith("segan.pesq"))
    assert "FAIL" in line and "2.3000" in line and "2.2000" in line and ">= 2.2500" in line
    assert "FAIL" not in next(l for l in result.output.splitlines() if l.startswith("segan.stoi"))


def test_improvement_passes(workdir: Path) -> None:
    result = run_gate(workdir, doctored(pesq=2.9, stoi=0.99))
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("current", [doctored(covl=None), doctored(covl=float("nan"))])
def test_missing_or_nan_metric_fails(workdir: Path, current: dict) -> None:
    result = run_gate(workdir, current)
    assert result.exit_code == 1, result.output
    assert "segan.covl" in result.output


def test_null_metric_fails(workdir: Path) -> None:
    current = copy.deepcopy(BASELINE)
    current["segan"]["pesq"]["mean"] = None  # what evaluate writes when every PESQ failed
    result = run_gate(workdir, current)
    assert result.exit_code == 1
    assert "not a finite number" in result.output


@pytest.mark.parametrize("text, expected", [
    (None, "not found"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"noisy": {}}', "no system 'segan'"),
    ('{"segan": 3}', "should map metric names"),
])
def test_malformed_metrics_exit_2_naming_file(workdir: Path, text: str | None, expected: str) -> None:
    result = run_gate(workdir, text)
    assert result.exit_code == 2, result.output
    assert "reports/metrics.json" in result.output and expected in result.output


def test_malformed_baseline_exit_2_naming_file(workdir: Path) -> None:
    (workdir / "reports" / "baseline_metrics.json").write_text("")
    result = run_gate(workdir, BASELINE)
    assert result.exit_code == 2
    assert "baseline_metrics.json" in result.output and "not valid JSON" in result.output


def test_missing_explicit_baseline_and_params(workdir: Path) -> None:
    result = run_gate(workdir, BASELINE, "--baseline", "nope.json")
    assert result.exit_code == 2 and "nope.json" in result.output
    result = run_gate(workdir, BASELINE, "--params", "other.yaml")
    assert result.exit_code == 2 and "other.yaml" in result.output


def test_params_tolerances_and_system_are_used(workdir: Path) -> None:
    (workdir / "params.yaml").write_text(yaml.safe_dump({"gate": {
        "baseline": "reports/baseline_metrics.json", "system": "segan", "tolerances": {"pesq": 0.2}}}))
    result = run_gate(workdir, doctored(pesq=2.15, stoi=0.5))  # stoi not gated now
    assert result.exit_code == 0, result.output
    assert "segan.stoi" not in result.output
    # --system gates another entry of the same files
    result = run_gate(workdir, BASELINE, "--system", "noisy")
    assert result.exit_code == 0, result.output
    assert "noisy.pesq" in result.output


def test_update_baseline(workdir: Path) -> None:
    worse = doctored(pesq=1.5)
    result = run_gate(workdir, worse, "--update-baseline")
    assert result.exit_code == 0, result.output
    assert "Baseline updated" in result.output
    baseline = workdir / "reports" / "baseline_metrics.json"
    assert json.loads(baseline.read_text()) == worse
    assert (workdir / "reports" / "metrics.json").read_bytes() == baseline.read_bytes()
    assert not list((workdir / "reports").glob("*.tmp"))
    assert run_gate(workdir, worse).exit_code == 0  # gate now passes against the new baseline


def test_update_baseline_refuses_malformed_metrics(workdir: Path) -> None:
    before = (workdir / "reports" / "baseline_metrics.json").read_text()
    result = run_gate(workdir, "{}", "--update-baseline")
    assert result.exit_code == 2
    assert (workdir / "reports" / "baseline_metrics.json").read_text() == before


def test_compare_rows() -> None:
    rows = compare(BASELINE, doctored(pesq=2.0, stoi=None), {"pesq": 0.05, "stoi": 0.01, "csig": 0.0})
    by = {r.metric: r for r in rows}
    assert [r.metric for r in rows] == ["pesq", "stoi", "csig"]
    assert not by["pesq"].ok and by["pesq"].change == pytest.approx(-0.3)
    assert by["pesq"].allowed == pytest.approx(2.25)
    assert not by["stoi"].ok and by["stoi"].new is None
    assert by["csig"].ok  # equal is fine at zero tolerance
    # bare numbers are accepted; a metric missing from the baseline fails
    rows = compare({"segan": {"pesq": 2.0}}, {"segan": {"pesq": 2.0, "stoi": 0.9}}, {"pesq": 0.0, "stoi": 0.0})
    assert rows[0].ok and not rows[1].ok and "baseline" in rows[1].reason
    assert "FAIL" in format_table(rows, "segan")
    with pytest.raises(GateError):
        compare(BASELINE, BASELINE, {})


def test_load_metrics_errors(tmp_path: Path) -> None:
    with pytest.raises(GateError, match="missing.json"):
        load_metrics(tmp_path / "missing.json", "segan")
