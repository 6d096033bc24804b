"""The promotion report: report.json (strict, versioned, what `promote` reads), report.md (the
approver's headlines and tables) and report.html (self-contained, plots embedded), on simulated
routes — clear-cut, exploring, regression, tiny, empty — and through `evaluator report`."""

from __future__ import annotations

import base64
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from evaluator import cli
from evaluator.bench_report import synthetic_dataset
from evaluator.dataset import STATUS_CODES, EvalDataset
from evaluator.decision import DecisionPolicy, decide
from evaluator.report import REPORT_SCHEMA_VERSION, markdown_to_blocks, roc_points, write_report
from evaluator.simulate_tests import subset

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _reject_constant(name: str) -> Any:
    raise AssertionError(f"non-strict JSON constant {name} in report.json")


def load_strict(path: Path) -> dict[str, Any]:
    """Parse report.json refusing NaN / Infinity, as strict consumers (jq, browsers) do."""
    return json.loads(path.read_text(), parse_constant=_reject_constant)


def write(ds: EvalDataset, out: Path, policy: DecisionPolicy | None = None,
          **kwargs: Any) -> tuple[dict[str, Any], str, str]:
    paths = write_report(ds, decide(ds, policy), out, generated_at=1_767_300_000.0, **kwargs)
    assert set(paths) == {"json", "markdown", "html"}
    for p in paths.values():
        assert p.exists()
        assert p.parent == out
    return load_strict(paths["json"]), paths["markdown"].read_text(), paths["html"].read_text()


def assert_self_contained(page: str, min_images: int) -> list[bytes]:
    """No external resources: every src is a data: URI, no stylesheets or scripts by URL."""
    srcs = re.findall(r"""\bsrc\s*=\s*["']([^"']*)["']""", page)
    assert all(s.startswith("data:image/png;base64,") for s in srcs), srcs
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page)
    assert "<link" not in page and "<script" not in page and "@import" not in page
    images = [base64.b64decode(s.split(",", 1)[1]) for s in srcs]
    assert len(images) >= min_images
    assert all(img.startswith(PNG_MAGIC) for img in images)
    return images


# -- clear-cut: one better, one worse challenger ----------------------------------------------


@pytest.fixture(scope="module")
def clear_cut(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, str]:
    ds = synthetic_dataset(20_000, seed=3, sigmas=(1.0, 0.6, 1.6))
    return write(ds, tmp_path_factory.mktemp("clear"))


def test_json_is_versioned_strict_and_has_the_expected_verdicts(
        clear_cut: tuple[dict[str, Any], str, str]) -> None:
    report, _, _ = clear_cut
    assert report["report_schema_version"] == REPORT_SCHEMA_VERSION == 1
    assert report["status"] == "ok"
    assert report["message"] is None
    assert report["route"] == "fraud"
    assert report["task"] == "classification"
    assert report["champion"] == "fraud_v3"
    assert report["challengers"] == ["fraud_v4", "fraud_v5"]
    assert report["n"] == 20_000
    assert report["generated_at"] == 1_767_300_000.0
    assert report["window"]["since_iso"].startswith("2026-01-01")
    assert report["join_stats"]["joined"] == 20_000
    verdicts = {d["challenger"]: d["decision"] for d in report["decisions"]}
    assert verdicts == {"fraud_v4": "PROMOTE", "fraud_v5": "KEEP"}
    for d in report["decisions"]:  # each decision carries its numbers, not only a verdict
        assert d["primary"]["test"] == "delong"
        assert d["primary"]["p_adjusted"] is not None
        assert d["primary"]["correction"] == "holm"
        assert d["sequential"]["p_adjusted"] is not None
        assert d["sequential"]["path"]["log_lr"]
        assert d["power"]["required_n"] > 0
        assert d["guardrails"]["status"] == "pass"
        assert d["non_inferiority"] is not None
        assert d["reasons"][0].startswith(d["decision"])
    # metrics with confidence intervals, for every model, on common rows
    models = report["metrics"]["models"]
    assert set(models) == {"fraud_v3", "fraud_v4", "fraud_v5"}
    for mm in models.values():
        auroc = mm["metrics"]["auroc"]
        assert auroc["ci_low"] < auroc["value"] < auroc["ci_high"]
        assert {"log_loss", "brier", "accuracy", "f1", "ece"} <= set(mm["metrics"])
    assert models["fraud_v4"]["metrics"]["auroc"]["value"] > \
        models["fraud_v3"]["metrics"]["auroc"]["value"]
    # shadow traffic: no exploration, no off-policy section, the champion served everything
    assert report["exploration"]["exploring"] is False
    assert report["exploration"]["arm_shares"] == {"fraud_v3": {"served": 20_000, "share": 1.0}}
    assert report["offpolicy"] is None
    assert set(report["figures"]) == {"roc", "calibration", "scores", "sequential"}
    assert {"metrics", "figures", "report_total"} <= set(report["timings_s"])


def test_promote_reads_the_report(clear_cut: tuple[dict[str, Any], str, str]) -> None:
    verdict, model, reason = cli.read_decision(clear_cut[0])
    assert (verdict, model) == ("PROMOTE", "fraud_v4")
    assert "significantly better" in reason


def test_markdown_has_a_headline_per_challenger_and_the_tables(
        clear_cut: tuple[dict[str, Any], str, str]) -> None:
    report, md, _ = clear_cut
    for d in report["decisions"]:
        line = next(ln for ln in md.splitlines() if ln.startswith(f"**{d['challenger']}: "))
        assert f"{d['challenger']}: {d['decision']} — AUROC " in line
        assert "95% CI" in line
        assert "Holm p = " in line
        assert "sequential p = " in line
        assert "guardrails pass" in line
    v4 = report["decisions"][0]["primary"]
    assert f"AUROC {v4['challenger']:.4g} vs {v4['champion']:.4g}" in md
    for heading in ("## Decisions", "## Join", "## Model metrics", "## Tests", "## Guardrails",
                    "## Arm shares", "## Off-policy values", "## Notes"):
        assert heading in md
    assert "| fraud_v4 | AUROC (delong) |" in md
    assert "latency_p99_ratio" in md
    assert "Not applicable: no exploration" in md
    assert "orphan labels" in md  # join bookkeeping surfaces in the notes
    assert "nan" not in md.lower().replace("nanos", "")


def test_html_is_self_contained_with_plots_and_the_same_content(
        clear_cut: tuple[dict[str, Any], str, str]) -> None:
    report, _, page = clear_cut
    assert page.startswith("<!DOCTYPE html>")
    assert "<style>" in page
    assert_self_contained(page, min_images=len(report["figures"]))
    for fig in report["figures"]:
        assert f'id="fig-{fig}"' in page
    assert 'class="verdict PROMOTE"' in page
    assert 'class="verdict KEEP"' in page
    for s in report["summary"]:
        assert s["headline"].replace("—", "—") in page


# -- robustness ---------------------------------------------------------------------------------


def test_nan_scores_latencies_and_failures_never_reach_the_json(tmp_path: Path) -> None:
    ds = synthetic_dataset(6_000, seed=5, sigmas=(1.0, 0.6, 1.0))
    bad = ds.models["fraud_v5"]
    status = bad.status.copy()
    scores = bad.scores.copy()
    latency = bad.latency_ms.copy()
    status[::10] = STATUS_CODES["timeout"]
    scores[::10] = np.nan
    latency[::7] = np.nan
    scores[1::97] = np.inf  # a broken model output
    models = {**ds.models, "fraud_v5": replace(bad, status=status, scores=scores,
                                               latency_ms=latency)}
    report, md, page = write(replace(ds, models=models), tmp_path)
    text = (tmp_path / "report.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    v5 = next(d for d in report["decisions"] if d["challenger"] == "fraud_v5")
    assert v5["decision"] == "BLOCKED"  # 10% timeouts fail the error-rate guardrail
    assert v5["guardrails"]["status"] == "fail"
    assert "**FAIL**" in md
    assert "fraud_v5: excluded from the paired comparison" in md
    assert_self_contained(page, min_images=3)


def test_exploring_route_has_off_policy_values_and_arm_shares(tmp_path: Path) -> None:
    ds = synthetic_dataset(8_000, seed=6, sigmas=(1.0, 0.6, 1.4), explore=0.3)
    report, md, page = write(ds, tmp_path)
    ex = report["exploration"]
    assert ex["exploring"] is True
    assert set(ex["arm_shares"]) == {"fraud_v3", "fraud_v4", "fraud_v5"}
    assert sum(v["served"] for v in ex["arm_shares"].values()) == 8_000
    assert ex["policy_types"] == {"epsilon_greedy": 8_000}
    off = report["offpolicy"]
    assert off is not None
    dr = {arm: v["estimates"]["dr"]["value"] for arm, v in off["arms"].items()}
    assert all(v is not None for v in dr.values())
    assert dr["fraud_v4"] > dr["fraud_v5"]  # the better model earns more reward
    assert "| arm | served | unsupported | ESS | max weight | IPS | SNIPS | DM | DR |" in md
    assert "arm_shares" in report["figures"]
    assert_self_contained(page, min_images=5)


def test_regression_route(tmp_path: Path) -> None:
    ds = synthetic_dataset(6_000, seed=7, task="regression", sigmas=(1.0, 0.5, 1.0))
    report, md, page = write(ds, tmp_path, DecisionPolicy(primary_metric="rmse", min_effect=0.05))
    assert report["task"] == "regression"
    assert report["decisions"][0]["challenger"] == "fraud_v4"
    assert report["decisions"][0]["decision"] == "PROMOTE"
    assert set(report["metrics"]["models"]["fraud_v3"]["metrics"]) == {"rmse", "mae"}
    assert set(report["figures"]) == {"predicted_vs_actual", "residuals", "sequential"}
    assert "fraud_v4: PROMOTE — RMSE " in md
    assert_self_contained(page, min_images=3)


def test_tiny_dataset_is_inconclusive_not_a_crash(tmp_path: Path) -> None:
    ds = subset(synthetic_dataset(2_000, seed=8, sigmas=(1.0, 0.6, 1.6)), slice(0, 40))
    report, md, page = write(ds, tmp_path)
    assert [d["decision"] for d in report["decisions"]] == ["INCONCLUSIVE", "INCONCLUSIVE"]
    assert "fraud_v4: INCONCLUSIVE — " in md
    assert_self_contained(page, min_images=1)


def test_empty_dataset_gives_a_clear_message(tmp_path: Path) -> None:
    ds = subset(synthetic_dataset(100, seed=9), slice(0, 0))
    report, md, page = write(ds, tmp_path)
    assert report["status"] == "empty"
    assert "No labelled requests for route 'fraud'" in report["message"]
    assert report["message"] in md
    assert "No labelled requests" in page
    assert report["figures"] == []
    assert all(d["decision"] == "INCONCLUSIVE" for d in report["decisions"])
    assert cli.read_decision(report)[0] == "INCONCLUSIVE"


def test_champion_only_dataset(tmp_path: Path) -> None:
    ds = synthetic_dataset(500, seed=10, sigmas=(1.0,), names=("fraud_v3",))
    report, md, page = write(ds, tmp_path)
    assert report["status"] == "no_challengers"
    assert report["decisions"] == []
    assert "No challenger scored" in md
    assert "No decisions" in md
    assert_self_contained(page, min_images=3)  # the champion's own curves


def test_drift_section_is_embedded(tmp_path: Path) -> None:
    from evaluator.config import DriftConfig
    from evaluator.drift import FeatureData, compute_drift

    rng = np.random.default_rng(11)

    def frame(n: int, shift: float, t0: float) -> FeatureData:
        cols = {"amount": rng.normal(shift, 1.0, n), "age": rng.normal(0.0, 1.0, n)}
        ts = t0 + np.arange(n, dtype=float)
        return FeatureData(columns=cols, ts=ts, source="sim")

    result = compute_drift(frame(3000, 0.0, 0.0), frame(1500, 1.0, 5000.0),
                           DriftConfig(adaptive=False), route="fraud")
    report, md, page = write(synthetic_dataset(3_000, seed=12), tmp_path, drift=result)
    assert report["drift"]["verdict"] == result.verdict
    assert "amount" in report["drift"]["drifted_features"]
    assert f"## Drift: {result.verdict}" in md
    assert "| amount | numeric |" in md
    assert f"<h2>Drift: {result.verdict}</h2>" in page


# -- helpers --------------------------------------------------------------------------------------


def test_roc_points_lie_on_the_exact_curve() -> None:
    rng = np.random.default_rng(13)
    y = (rng.random(30_000) < 0.3).astype(float)
    s = np.round(rng.random(30_000) * 0.6 + 0.3 * y, 2)  # ties
    fpr, tpr = roc_points(y, s, max_points=50)
    assert fpr[0] == tpr[0] == 0.0 and fpr[-1] == tpr[-1] == 1.0
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    # every point is exact: some threshold t0 gives FPR = P(s >= t0 | 0), TPR = P(s >= t0 | 1)
    thresholds = np.unique(s)
    fprs = (s[y == 0][:, None] >= thresholds[None, :]).mean(axis=0)
    tprs = (s[y == 1][:, None] >= thresholds[None, :]).mean(axis=0)
    for f, t in zip(fpr[1:-1], tpr[1:-1], strict=True):
        assert np.any(np.isclose(fprs, f) & np.isclose(tprs, t))
    with pytest.raises(ValueError, match="both classes"):
        roc_points(np.zeros(10), np.linspace(0, 1, 10))


def test_markdown_fragment_parser() -> None:
    blocks = markdown_to_blocks("## Drift: OK\n\nLine one.\nLine two.\n\n| a | b |\n|---|---:|\n"
                                "| 1 | **2** |\n\n- x\n- y\n")
    assert [b.kind for b in blocks] == ["h2", "p", "table", "ul"]
    assert blocks[1].text == "Line one. Line two."
    assert blocks[2].header == ("a", "b")
    assert blocks[2].rows == (("1", "**2**"),)
    assert blocks[3].items == ("x", "y")


# -- through the command line -----------------------------------------------------------------


def test_cli_report_writes_all_three_files(tmp_path: Path) -> None:
    from tests.test_eval_store import CHAL, T0, LogDir, inference, label

    path = tmp_path / "evaluator.yaml"
    path.write_text(json.dumps({  # JSON is YAML
        "source": {"path": str(tmp_path / "log")},
        "store": {"path": str(tmp_path / "store.duckdb"), "lock_timeout_s": 5},
        "report": {"out": str(tmp_path / "reports"), "window": "7d"},
        "drift": {"out": str(tmp_path / "drift")},
    }))
    log = LogDir(tmp_path / "log")
    rng = np.random.default_rng(14)
    y = rng.random(300) < 0.4
    log.write("inferences", *(inference(f"r{i}", T0 + i * 600, champ=float(rng.random()),
                                        chal=float(0.5 * rng.random() + 0.5 * y[i]))
                              for i in range(300)))
    log.write("labels", *(label(f"r{i}", float(y[i]), T0 + 1e6) for i in range(300)))
    assert cli.main(["run", "--once", "--config", str(path)]) == 0
    assert cli.main(["report", "--config", str(path), "--route", "fraud"]) == 0
    out = tmp_path / "reports"
    report = load_strict(out / "report.json")
    assert report["report_schema_version"] == 1
    assert report["n"] == 300
    assert report["window"]["until"] == pytest.approx(T0 + 299 * 600)
    assert report["window"]["since"] == pytest.approx(T0 + 299 * 600 - 7 * 86_400)
    assert [d["challenger"] for d in report["decisions"]] == [CHAL]
    # the fixture's challenger answers in 3 ms against the champion's 1 ms: p99 ratio 3 > 1.5
    assert report["decisions"][0]["decision"] == "BLOCKED"
    assert report["decisions"][0]["reasons"][0] == "BLOCKED: guardrail failed (latency_p99_ratio)"
    assert report["drift"] is None
    assert f"**{CHAL}: BLOCKED — " in (out / "report.md").read_text()
    assert_self_contained((out / "report.html").read_text(), min_images=3)
    assert cli.main(["promote", "--config", str(path), "--route", "fraud", "--dry-run"]) == 3
