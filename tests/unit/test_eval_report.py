"""The promotion report: report.json (strict, versioned, what `promote` reads), report.md (the
approver's headlines and tables) and report.html (self-contained, plots embedded), on simulated
routes — clear-cut, exploring, regression, tiny, empty — and through `evaluator report`."""

from __future__ import annotations

import base64
import html
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from devtools.simulate.tests import subset
from evaluator import cli
from evaluator.dataset import STATUS_CODES, EvalDataset
from evaluator.decision import DecisionPolicy, decide
from evaluator.report import REPORT_SCHEMA_VERSION, report_blocks, roc_points, write_report
from loadtests.bench_report import synthetic_dataset

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


def _structure_md(md: str) -> list[tuple[str, Any]]:
    """Headings, tables (rows), lists (items) and verdict lines of report.md, in order."""
    out: list[tuple[str, Any]] = []
    lines = md.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append((f"h{level}", line[level + 1:]))
        elif line.startswith("|"):
            rows = 0
            while i < len(lines) and lines[i].startswith("|"):
                rows += 1
                i += 1
            out.append(("table", rows - 2))  # header and separator
            continue
        elif line.startswith("- "):
            items = 0
            while i < len(lines) and lines[i].startswith("- "):
                items += 1
                i += 1
            out.append(("ul", items))
            continue
        i += 1
    return out


def _structure_html(page: str) -> list[tuple[str, Any]]:
    """The same structure read back from report.html (the plots section left out)."""
    page = re.sub(r"<h2>Plots</h2><div class=\"figs\">.*?</div>\n", "", page, flags=re.S)
    out: list[tuple[str, Any]] = []
    pattern = r"<(h[123])>(.*?)</h[123]>|<table>(.*?)</table>|<ul>(.*?)</ul>"
    for m in re.finditer(pattern, page, flags=re.S):
        if m.group(1):
            text = re.sub(r"</?strong>", "**", m.group(2)).replace("<code>", "`")
            out.append((m.group(1), html.unescape(text.replace("</code>", "`"))))
        elif m.group(3) is not None:
            out.append(("table", m.group(3).count("<tr>") - 1))
        else:
            out.append(("ul", m.group(4).count("<li>")))
    return out


def test_markdown_and_html_render_the_same_blocks(tmp_path: Path) -> None:
    """Both files come from one block list: the same headings, tables (with the same number of
    rows) and lists, in the same order, and every block of the list is in both."""
    ds = synthetic_dataset(6_000, seed=21, explore=0.3)
    report, md, page = write(ds, tmp_path)
    blocks = report_blocks(report)
    kinds = [b.kind for b in blocks]
    assert {"h1", "h2", "h3", "p", "ul", "table", "verdict", "figures"} <= set(kinds)
    expected = [(b.kind, b.text) if b.kind.startswith("h") else
                (b.kind, len(b.rows) if b.kind == "table" else len(b.items))
                for b in blocks if b.kind in ("h1", "h2", "h3", "table", "ul")]
    assert _structure_md(md) == expected
    assert _structure_html(page) == expected
    for b in blocks:
        if b.kind == "verdict":
            assert f"**{b.text}**" in md and f'<div class="verdict {b.verdict}">' in page
        if b.kind == "p":
            assert b.text in md


def test_drift_data_reaches_the_report_without_text(tmp_path: Path) -> None:
    """report.json holds drift's data, and the report's drift blocks are built from it: the same
    blocks from the DriftResult, from drift.json as loaded, and from what report.json embeds."""
    from evaluator.config import DriftConfig
    from evaluator.drift import FeatureData, compute_drift
    from evaluator.drift.data import _f
    from evaluator.report.drift import drift_blocks

    rng = np.random.default_rng(5)

    def frame(n: int, shift: float, t0: float) -> FeatureData:
        cols = {"amount": rng.normal(shift, 1.0, n), "age": rng.normal(0.0, 1.0, n)}
        scores = {"*": rng.random(n)}
        return FeatureData(columns=cols, ts=t0 + np.arange(n, dtype=float), scores=scores,
                           source="sim")

    result = compute_drift(frame(3000, 0.0, 0.0), frame(1500, 1.0, 5000.0),
                           DriftConfig(adaptive=False), route="fraud")
    drift_json = json.loads(json.dumps(result.to_dict()))
    report, md, page = write(synthetic_dataset(3_000, seed=12), tmp_path, drift=drift_json)
    embedded = drift_blocks(report["drift"])
    assert embedded == drift_blocks(result) == drift_blocks(drift_json)
    blocks = report_blocks(report)
    start = blocks.index(embedded[0])
    assert blocks[start:start + len(embedded)] == embedded
    features = embedded[2]
    amount = next(r for r in features.rows if r[0] == "amount")
    feature = next(f for f in result.features if f.name == "amount")
    assert amount[2] == _f(feature.psi) and amount[-1] == "**drift**"
    assert f"| amount | numeric | {_f(feature.psi)} |" in md
    assert f"<td>amount</td><td>numeric</td><td>{_f(feature.psi)}</td>" in page


# -- through the command line -----------------------------------------------------------------


def test_cli_report_writes_all_three_files(tmp_path: Path) -> None:
    from tests.unit.test_eval_store import CHAL, T0, LogDir, inference, label

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
    # 300 requests: too few for a verdict, and for a p99 bound (the fixture's 3 ms vs 1 ms is
    # within the 2 ms margin anyway): the latency guardrail is "insufficient", not a failure
    assert report["decisions"][0]["decision"] == "INCONCLUSIVE"
    checks = {c["name"]: c for c in report["decisions"][0]["guardrails"]["checks"]}
    assert checks["latency_p99_ratio"]["passed"] is None
    assert report["drift"] is None
    assert f"**{CHAL}: INCONCLUSIVE — " in (out / "report.md").read_text()
    assert_self_contained((out / "report.html").read_text(), min_images=3)
    assert cli.main(["promote", "--config", str(path), "--route", "fraud", "--dry-run"]) == 3


# -- experiments, data health, guardrail intervals, BLOCKED (issue 13) ------------------------


class _Extended:
    """A real decision whose to_dict() also carries keys a newer decision module adds
    (experiment, data_health, guardrail intervals, BLOCKED): the report renders what it gets."""

    def __init__(self, real: Any, **changes: Any) -> None:
        self.real, self.changes = real, changes
        self.policy, self.challenger = real.policy, real.challenger

    def to_dict(self) -> dict[str, Any]:
        d = self.real.to_dict()
        for key, value in self.changes.items():
            d[key] = value(d) if callable(value) else value
        return d


def _with_intervals(d: dict[str, Any]) -> dict[str, Any]:
    g = json.loads(json.dumps(d["guardrails"]))
    for i, c in enumerate(g["checks"]):
        c["interval"] = [0.25 + i, 4.5 + i]
    return g


HEALTH = {  # the shape of evaluator.gates.health.DataHealthResult.to_dict()
    "challenger": "fraud_v5", "status": "fail", "alpha": 0.001, "n": 4000, "experiment": None,
    "reasons": ["fraud_v5: 74% of its copies were shed"],
    "checks": [{"name": "served_vs_propensity", "status": "pass", "detail": "", "n": 4000,
                "statistic": 0.68, "p_value": 0.41, "p_adjusted": 0.82, "observed": {},
                "expected": {}},
               {"name": "shed_vs_scored", "status": "fail", "detail": "shedding is not random",
                "n": 4000, "statistic": None, "p_value": 2.5e-06, "p_adjusted": 5e-06,
                "observed": {"shed": 740}, "expected": {"shed": 500}}],
}


@pytest.fixture(scope="module")
def bound(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, str]:
    from evaluator.dataset import ExperimentInfo

    ds = synthetic_dataset(4_000, seed=5, sigmas=(1.0, 0.6, 1.6))
    ds.registry_version = np.full(len(ds), 7, dtype=np.int64)
    start = float(ds.ts.min())
    ds.experiments = {"fraud_v4": ExperimentInfo("fraud_v4:exp-1", start, float(ds.ts.max()),
                                                 "fraud_v3", 7)}
    v4, v5 = decide(ds, None)
    decisions = [_Extended(v4, guardrails=_with_intervals),
                 _Extended(v5, decision="BLOCKED", data_health=HEALTH,
                           guardrails=_with_intervals,
                           # the injected gate replaces the real one's line in the reasons
                           reasons=lambda d: [r for r in d["reasons"]
                                              if not r.startswith("data health")])]
    out = tmp_path_factory.mktemp("bound")
    paths = write_report(ds, decisions, out, generated_at=1_767_300_000.0)  # type: ignore[arg-type]
    return (load_strict(paths["json"]), paths["markdown"].read_text(),
            paths["html"].read_text())


def test_each_verdict_is_bound_to_its_experiment(bound: tuple[dict[str, Any], str, str]) -> None:
    report, md, _ = bound
    assert report["generated_at"] == 1_767_300_000.0
    assert report["registry_version"] == 7
    assert report["window"]["basis"] == "experiments"
    v4, v5 = report["decisions"]
    assert v4["experiment"]["id"] == "fraud_v4:exp-1"
    assert {k: v4["experiment"][k] for k in ("route", "champion", "challenger",
                                               "registry_version")} == \
        {"route": "fraud", "champion": "fraud_v3", "challenger": "fraud_v4",
         "registry_version": 7}
    assert v4["experiment"]["started_iso"].startswith("2026-01-01")
    assert v4["experiment"]["data_end"] >= v4["experiment"]["started"]
    assert report["experiments"]["fraud_v4"]["id"] == "fraud_v4:exp-1"
    # no experiment id: the implicit one (the data itself), still bound to a version
    assert v5["experiment"]["id"] is None and v5["experiment"]["registry_version"] == 7
    assert "experiment `fraud_v4:exp-1` started 2026-01-01" in md
    assert cli.report_binding(report, "fraud_v4")["experiment"] == "fraud_v4:exp-1"
    assert cli.report_binding(report, "fraud_v4")["registry_version"] == 7


def test_blocked_data_health_and_guardrail_intervals_are_shown(
        bound: tuple[dict[str, Any], str, str]) -> None:
    report, md, page = bound
    assert report["verdict_counts"] == {"PROMOTE": 1, "KEEP": 0, "BLOCKED": 1,
                                        "INCONCLUSIVE": 0}
    assert "Verdicts: PROMOTE 1 · KEEP 0 · BLOCKED 1 · INCONCLUSIVE 0" in md
    assert "**fraud_v5: BLOCKED — " in md
    assert '<div class="verdict BLOCKED">' in page
    css = re.search(r"\.verdict\.BLOCKED\{([^}]*)\}", page)
    keep = re.search(r"\.verdict\.KEEP\{([^}]*)\}", page)
    assert css and keep and css.group(1) != keep.group(1)  # a colour of its own
    # the data-health gate: status, each check with its p-value and numbers
    assert "### Data health (sample ratio mismatch)" in md
    assert "data health: fail; fraud_v5: 74% of its copies were shed" in md
    assert ("| fraud_v5 | shed_vs_scored | **FAIL** | 2.50e-06 (5.00e-06) | shedding is not "
            "random |") in md, md
    # no explanation of its own: its numbers
    assert ("| fraud_v5 | served_vs_propensity | pass | 0.41 (0.82) | n 4000; statistic 0.68 |"
            in md)
    # each guardrail check with its interval and limit
    rows = [ln for ln in md.split("## Guardrails")[1].splitlines() if ln.startswith("| fraud_v4")]
    assert rows and all(re.search(r"\[[\d.]+%?(?: ms)?, [\d.]+%?\]|\[[\d.]+, [\d.]+\]", r)
                        for r in rows), rows
    assert "| interval | limit |" in md


def test_one_sign_convention_clear_power_labels_and_no_negative_zero(
        bound: tuple[dict[str, Any], str, str], clear_cut: tuple[dict[str, Any], str, str]
) -> None:
    report, md, page = bound
    tests = md.split("## Tests")[1].split("##")[0]
    assert "improvement [CI]" in tests and "difference" not in tests.split("\n|")[0]
    assert "| n for target power | achieved power at min effect |" in tests
    assert re.search(r"\| [\d,]+ \(80% power\) \| \d+% \(min effect 0\.01\) \|", tests), tests
    # a better challenger reads as a positive improvement everywhere, for losses too
    v4 = next(d for d in report["decisions"] if d["challenger"] == "fraud_v4")
    assert v4["primary"]["improvement"] > 0
    assert f"improvement +{v4['primary']['improvement']:.3g}" in md
    # the report's own text (tables, headlines; the reasons' wording is decision.py's)
    own = "\n".join(ln for ln in md.splitlines() if ln.startswith(("|", "**")))
    assert not re.search(r"(?<![\w.])-0(?![.\d])", own)
    assert "+-" not in own
    for table in re.findall(r"\| challenger \| test \| improvement \[CI\].*?\n\n", md, re.S):
        assert "difference" not in table
    # wide tables scroll inside their own box instead of hiding columns
    assert page.count('<div class="table-wrap"><table>') == page.count("<table>")
    assert ".table-wrap{max-width:100%;overflow-x:auto" in page  # checked at 1300 px in chromium


def test_losses_use_the_same_improvement_sign(tmp_path: Path) -> None:
    ds = synthetic_dataset(3_000, seed=8, task="regression", sigmas=(1.0, 0.5),
                           names=("price_v1", "price_v2"), route="price")
    report, md, _ = write(ds, tmp_path, DecisionPolicy(primary_metric="rmse", min_effect=0.05))
    p = report["decisions"][0]["primary"]
    assert p["difference"] < 0 < p["improvement"]  # lower RMSE: a negative difference
    assert f"improvement +{p['improvement']:.3g}" in md
    secondary = md.split("### Secondary tests")[1]
    row = next(ln for ln in secondary.splitlines() if "paired_t_squared_error" in ln)
    assert "| +" in row  # the loss test's improvement is positive as well


def test_one_look_gets_a_short_axis_not_years() -> None:
    from evaluator.report import look_limits

    lo, hi = look_limits(np.array([1_767_300_000.0]), use_time=True)
    assert hi - lo == 7200.0  # an hour each side of the only look
    lo, hi = look_limits(np.array([1_767_300_000.0, 1_767_300_000.0 + 86_400 * 10]), True)
    assert hi - lo == pytest.approx(86_400 * 10 * 1.1)
    assert look_limits(np.array([np.nan]), True) is None
    assert look_limits(np.array([500.0]), use_time=False) == (499.0, 501.0)


def test_arm_shares_leave_idle_gaps_empty(tmp_path: Path) -> None:
    ds = synthetic_dataset(4_000, seed=2, explore=0.3, days=14)
    keep = (ds.ts < ds.ts.min() + 3 * 86_400) | (ds.ts > ds.ts.min() + 10 * 86_400)
    ds = subset(ds, keep)  # a week without traffic in the middle
    report, _, page = write(ds, tmp_path)
    assert "arm_shares" in report["figures"]
    assert re.search(r"in 48 equal time bins; \d+ bins without traffic are left empty", page)


def test_no_negative_zero() -> None:
    from evaluator.report.format import _num

    assert _num(-0.0, "+.3g") == "0" and _num(-1e-9, ".3f") == "0.000"
    assert _num(-1e-9, ".2%") == "0.00%"
    assert _num(-0.25, "+.3g") == "-0.25" and _num(0.25, "+.3g") == "+0.25"


def _cli_config(tmp_path: Path) -> Path:
    path = tmp_path / "evaluator.yaml"
    path.write_text(json.dumps({  # JSON is YAML
        "source": {"path": str(tmp_path / "log")},
        "store": {"path": str(tmp_path / "store.duckdb"), "lock_timeout_s": 5},
        "report": {"out": str(tmp_path / "reports"), "window": "1h"},
        "drift": {"out": str(tmp_path / "drift")},
        "decision": {"min_samples": 50},
    }))
    return path


def test_cli_report_uses_every_row_of_the_current_experiment(tmp_path: Path) -> None:
    from tests.unit.test_eval_store import CHAL, T0, LogDir, experiment_inference, label

    path = _cli_config(tmp_path)
    log = LogDir(tmp_path / "log")
    old = [experiment_inference(f"o{i}", T0 + i * 60, "exp-old", version=2) for i in range(50)]
    new = [experiment_inference(f"n{i}", T0 + 86_400 + i * 600, "exp-new", version=3)
           for i in range(200)]  # 33 hours of data, far more than the 1h window
    log.write("inferences", *old, *new)
    log.write("labels", *(label(r["request_id"], i % 2, T0 + 5 * 86_400)
                          for i, r in enumerate(old + new)))
    assert cli.main(["run", "--once", "--config", str(path)]) == 0
    assert cli.main(["report", "--config", str(path), "--route", "fraud"]) == 0
    report = load_strict(tmp_path / "reports" / "report.json")
    assert report["n"] == 200  # all of exp-new, nothing of exp-old, whatever the window
    assert report["window"]["basis"] == "experiments"
    assert report["window"]["since"] == T0 + 86_400
    x = report["decisions"][0]["experiment"]
    assert (x["id"], x["challenger"], x["champion"], x["registry_version"]) == \
        ("exp-new", CHAL, "fraud_v3", 3)
    assert (x["started"], x["data_end"]) == (T0 + 86_400, T0 + 86_400 + 199 * 600)
    binding = cli.report_binding(report, CHAL)
    assert binding["experiment"] == "exp-new" and binding["registry_version"] == 3


def test_cli_exploration_rewards_reach_the_off_policy_table(tmp_path: Path) -> None:
    """Records shaped as the gateway writes them under `policy --type epsilon_greedy --reward
    correct`: the label carries the reward the gateway computed for the served arm."""
    from tests.unit.test_eval_store import CHAL, CHAMP, T0, LogDir, inference, outcome

    path = _cli_config(tmp_path)
    log = LogDir(tmp_path / "log")
    rng = np.random.default_rng(4)
    records, labels = [], []
    for i in range(400):
        y = float(rng.random() < 0.4)
        s_champ = float(np.clip(0.5 * y + 0.5 * rng.random(), 0, 1))
        s_chal = float(np.clip(0.7 * y + 0.3 * rng.random(), 0, 1))
        served = CHAL if rng.random() < 0.2 else CHAMP
        prop = 0.2 if served == CHAL else 0.8
        outputs = {CHAMP: outcome(s_champ, role="champion", mode="served", latency=1.0),
                   CHAL: {**outcome(s_chal, mode="explore", latency=1.0),
                          "experiment": "explore-1", "sample_rate": 1.0}}
        records.append(inference(f"e{i}", T0 + i * 60, outputs=outputs, registry_version=4,
                                 policy={"type": "epsilon_greedy", "epsilon": 0.4},
                                 served={"model": served, "version": "1"}, propensity=prop,
                                 arms={CHAMP: 0.8, CHAL: 0.2}))
        score = s_chal if served == CHAL else s_champ
        reward = float((score >= 0.5) == (y == 1))  # reward: correct, computed by the gateway
        labels.append({"schema_version": 1, "kind": "label", "request_id": f"e{i}",
                       "label": y, "reward": reward, "event_time": T0 + 9e5,
                       "received_ts": T0 + 9e5})
    log.write("inferences", *records)
    log.write("labels", *labels)
    assert cli.main(["run", "--once", "--config", str(path)]) == 0
    assert cli.main(["report", "--config", str(path), "--route", "fraud"]) == 0
    report = load_strict(tmp_path / "reports" / "report.json")
    off = report["offpolicy"]
    assert off is not None and off["n"] == 400  # every request was rewarded
    for arm in (CHAMP, CHAL):
        for name in ("ips", "snips", "dr"):
            assert isinstance(off["arms"][arm]["estimates"][name]["value"], float), (arm, name)
    md = (tmp_path / "reports" / "report.md").read_text()
    assert "from 400 rewarded requests" in md


def test_tests_table_reads_like_the_decision(bound: tuple[dict[str, Any], str, str]) -> None:
    """The Tests table's non-inferiority is the always-valid bound the reasons use, and a paired
    t on a loss carries the improvement's sign (issue 13: no mixed signs)."""
    report, md, _ = bound
    for d in report["decisions"]:
        seq = d["sequential"]
        row = next(line for line in md.splitlines()
                   if line.startswith(f"| {d['challenger']} | AUROC"))
        assert "always-valid lower bound" in row
        assert f"{seq['cs_low']:+.3g}" in row
        sec = next(line for line in md.splitlines()
                   if line.startswith(f"| {d['challenger']} | paired_t_log_loss"))
        statistic = float(sec.split("|")[4])
        improvement = float(sec.split("|")[3].split()[0])
        assert (statistic > 0) == (improvement > 0), sec
    assert " 1 looks " not in md


def test_report_fail_on_blocked_exits_with_its_own_code(tmp_path: Path) -> None:
    """`report` writes the report whatever the verdicts (exit 0); `--fail-on-blocked` then exits
    EXIT_BLOCKED when a guardrail blocked a challenger, here 20% failed copies."""
    from tests.unit.test_eval_store import T0, LogDir, inference, label

    path = tmp_path / "evaluator.yaml"
    path.write_text(json.dumps({
        "source": {"path": str(tmp_path / "log")},
        "store": {"path": str(tmp_path / "store.duckdb"), "lock_timeout_s": 5},
        "report": {"out": str(tmp_path / "reports")},
        "drift": {"out": str(tmp_path / "drift")},
    }))
    log = LogDir(tmp_path / "log")
    rng = np.random.default_rng(21)
    y = rng.random(400) < 0.4
    log.write("inferences", *(inference(f"r{i}", T0 + i * 60, champ=float(rng.random()),
                                        chal=float(rng.random()),
                                        chal_status="error" if i % 5 == 0 else "ok")
                              for i in range(400)))
    log.write("labels", *(label(f"r{i}", float(y[i]), T0 + 1e6) for i in range(400)))
    assert cli.main(["run", "--once", "--config", str(path)]) == 0
    assert cli.main(["report", "--config", str(path), "--route", "fraud"]) == cli.ExitCode.OK
    decision = load_strict(tmp_path / "reports" / "report.json")["decisions"][0]
    assert decision["decision"] == "BLOCKED"
    assert cli.main(["report", "--config", str(path), "--route", "fraud",
                     "--fail-on-blocked"]) == cli.ExitCode.BLOCKED
