"""The per-feature text table `evaluator drift` prints."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from evaluator.drift.data import _f
from evaluator.drift.result import DriftResult


def _as_dict(result: DriftResult | Mapping[str, Any]) -> dict[str, Any]:
    return result.to_dict() if isinstance(result, DriftResult) else dict(result)


def _status(row: Mapping[str, Any]) -> str:
    return str(row["status"]).upper() if row.get("drifted") else str(row["status"])


def feature_table(result: DriftResult | Mapping[str, Any]) -> str:
    """The per-feature table the CLI prints (plain text, fixed width)."""
    d = _as_dict(result)
    head = (f"{'feature':<22} {'kind':<11} {'n_ref':>7} {'n_live':>7} {'PSI':>7} {'thr':>6} "
            f"{'KS p':>8} {'W1/sd':>6} {'dmean':>6} {'JS':>6} {'chi2 p':>8} {'unseen':>7} "
            f"{'miss':>6} {'mds':>5} status")
    lines = [head, "-" * len(head)]
    for f in d.get("features", []):
        thr = (f.get("threshold") or {}).get("value")
        lines.append(
            f"{f['name'][:22]:<22} {f['kind']:<11} {f['n_ref']:>7} {f['n_live']:>7} "
            f"{_f(f.get('psi')):>7} {_f(thr, '.2f'):>6} {_f(f.get('ks_pvalue'), '.1e'):>8} "
            f"{_f(f.get('wasserstein_norm'), '.2f'):>6} {_f(f.get('mean_shift_sd'), '+.2f'):>6} "
            f"{_f(f.get('js_distance')):>6} {_f(f.get('chi2_pvalue'), '.1e'):>8} "
            f"{_f(f.get('unseen_share'), '.1%'):>7} {_f(f.get('missing_live'), '.1%'):>6} "
            f"{_f(f.get('min_detectable_shift_sd'), '.2f'):>5} {_status(f)}"
            + (f" ({', '.join(f['rules'])})" if f.get("rules") else ""))
    preds = d.get("predictions", [])
    if preds:
        lines.append("")
        head2 = (f"{'model':<22} {'role':<10} {'n_ref':>7} {'n_live':>7} {'PSI':>7} {'KS p':>8} "
                 f"{'mean':>13} {'positive':>15} status")
        lines += [head2, "-" * len(head2)]
        for p in preds:
            mean = f"{_f(p.get('mean_ref'))}->{_f(p.get('mean_live'))}"
            pos = (f"{_f(p.get('positive_share_ref'), '.1%')}->"
                   f"{_f(p.get('positive_share_live'), '.1%')}")
            lines.append(
                f"{p['model'][:22]:<22} {p['role'][:10]:<10} {p['n_ref']:>7} {p['n_live']:>7} "
                f"{_f(p.get('psi')):>7} {_f(p.get('ks_pvalue'), '.1e'):>8} {mean:>13} "
                f"{pos:>15} {_status(p)}")
    models = d.get("drifted_models") or []
    lines.append("")
    lines.append(f"verdict {d.get('verdict')}: {len(d.get('drifted_features', []))} drifted "
                 f"feature(s) ({_f(d.get('share'), '.0%')}); the dataset rule counts "
                 f"{len(d.get('dataset_features', []))} ({_f(d.get('dataset_share'), '.0%')}; "
                 f"{_f((d.get('settings') or {}).get('drift_share'), '.0%')} is dataset drift)"
                 f"{'; models: ' + ', '.join(models) if models else ''}")
    for note in d.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)
