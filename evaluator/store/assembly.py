"""Numpy assembly of query results: per-model columns, feature columns, score series.

Pure numpy over the columns the queries fetched (no SQL here), so it is the same for both
engines. Scores: the first element (of the prediction's row) of the first output tensor, or of
the configured output; NaN when the model failed, emitted NaN/inf, or gave no such output.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from evaluator.dataset import (
    Array,
    EvalDataset,
    ExperimentInfo,
    JoinStats,
    ModelColumn,
    Role,
    Task,
)
from evaluator.store.engines import as_numbers
from evaluator.store.schema import MODE_NAMES, ROLE_CODES, ROLE_NAMES, SKIPPED


@dataclass
class FeatureFrame:
    """Input features of a route's predictions in a window, one numpy column per feature.

    Numeric tensors give float64 columns (NaN where a row lacks the tensor); BYTES tensors give
    object columns of str (None where missing). A tensor of width 1 is one column named after
    the tensor; wider tensors give `tensor[j]` columns unless `features.names` names them.
    """

    route: str
    since: float | None
    until: float | None
    ts: Array
    request_ids: Array
    columns: dict[str, Array]

    def __len__(self) -> int:
        return int(self.ts.shape[0])


@dataclass
class ScoreSeries:
    """One model's scores over a window, in time order (for prediction drift)."""

    model: str
    role: str  # its role on its newest row in the window (a promotion mid-window shows)
    scores: Array  # float64; NaN where the model emitted NaN/inf
    ts: Array  # float64 unix seconds of each prediction


class RowIndex:
    """Store id -> dataset row position (-1 for ids not in the dataset).

    A dense lookup table over the window's id range when that range is not much wider than the
    dataset (the usual case: ids follow ingest order); binary search otherwise.
    """

    def __init__(self, ids: Array) -> None:
        self.n = int(ids.size)
        self.lo = int(ids.min()) if self.n else 0
        self.hi = int(ids.max()) if self.n else -1
        span = self.hi - self.lo + 1
        self.lut: Array | None = None
        if self.n and span <= 8 * self.n + (1 << 20):
            self.lut = np.full(span, -1, dtype=np.int64)
            self.lut[ids - self.lo] = np.arange(self.n)
        else:
            self.order = np.argsort(ids, kind="stable")
            self.sorted = ids[self.order]

    def positions(self, ids: Array) -> Array:
        ids = ids.astype(np.int64, copy=False)
        out = np.full(ids.size, -1, dtype=np.int64)
        if not self.n:
            return out
        inside = (ids >= self.lo) & (ids <= self.hi)
        if self.lut is not None:
            out[inside] = self.lut[ids[inside] - self.lo]
            return out
        k = np.minimum(np.searchsorted(self.sorted, ids), self.n - 1)
        hit = inside & (self.sorted[k] == ids)
        out[hit] = self.order[k[hit]]
        return out


def present(codes: Array) -> Array:
    """Distinct small non-negative integer codes, O(n) (np.unique sorts)."""
    return np.flatnonzero(np.bincount(codes)) if codes.size else np.empty(0, dtype=np.int64)


def request_row_ids(request_ids: Array, row_ix: Array) -> Array:
    """Request ids, with `#row` appended for rows past the first of a batched request."""
    out = np.asarray(request_ids, dtype=object).copy()
    for k in np.flatnonzero(row_ix > 0):
        out[k] = f"{out[k]}#{int(row_ix[k])}"
    return out


def _detect_task(labels: Array, task: str) -> Task:
    if task == "classification":
        return "classification"
    if task == "regression":
        return "regression"
    finite = labels[np.isfinite(labels)]
    return "classification" if np.isin(finite, (0.0, 1.0)).all() else "regression"


def assemble(route: str, rows: dict[str, Array], outs: dict[str, Array],
             arms: dict[str, Array], names: Array, stats: JoinStats, task: str,
             threshold: float) -> EvalDataset:
    """The window's rows in time order (ties by ingest order), with every model's outcomes and
    the policy's arm probabilities scattered onto them."""
    ids = as_numbers(rows["id"], np.int64)
    ts = as_numbers(rows["ts"])
    order = np.lexsort((ids, ts))
    rows = {k: v[order] for k, v in rows.items()}
    index = RowIndex(ids[order])
    labels = as_numbers(rows["label"])
    champion, ordered = _model_columns(outs, index, names, as_numbers(rows["served"], np.int64))
    arm_probs = _arm_probs(arms, index, names)
    return EvalDataset(
        route=route,
        task=_detect_task(labels, task),
        champion=champion,
        request_ids=request_row_ids(rows["request_id"], as_numbers(rows["row_ix"], np.int64)),
        ts=as_numbers(rows["ts"]),
        labels=labels,
        rewards=as_numbers(rows["reward"]),
        served=names[as_numbers(rows["served"], np.int64)],
        propensity=as_numbers(rows["propensity"]),
        arm_probs=arm_probs,
        policy_types=names[as_numbers(rows["policy"], np.int64)],
        models=ordered,
        threshold=float(threshold),
        stats=stats,
        registry_version=as_numbers(rows["registry_version"], np.int64),
        label_ts=as_numbers(rows["received_ts"]),
    )


def _model_columns(outs: dict[str, Array], index: RowIndex, names: Array, served: Array
                   ) -> tuple[str, dict[str, ModelColumn]]:
    """(champion, model -> column), champion first, then challengers by name (a stable order
    for reports). Models missing on a row read as `skipped` with a NaN score there."""
    n = index.n
    o_pos = index.positions(outs["inf_id"])
    keep = o_pos >= 0  # the id range also holds unlabelled rows and other routes
    o_pos = o_pos[keep]
    o_model = as_numbers(outs["model"], np.int64)[keep]
    o_role = as_numbers(outs["role"], np.int64)[keep]
    o_mode = as_numbers(outs["mode"], np.int64)[keep]
    o_status = as_numbers(outs["status"], np.int64)[keep]
    o_score = as_numbers(outs["score"])[keep]
    o_latency = as_numbers(outs["latency_ms"])[keep]
    o_experiment = as_numbers(outs["experiment"], np.int64)[keep]  # -1: unknown
    o_sample_rate = as_numbers(outs["sample_rate"])[keep]

    # The champion is the model in the champion role on the most recent row.
    champ_rows = np.flatnonzero(o_role == ROLE_CODES["champion"])
    if champ_rows.size:
        champion = str(names[o_model[champ_rows[np.argmax(o_pos[champ_rows])]]])
    else:
        champion = str(names[np.bincount(served).argmax()])

    models: dict[str, ModelColumn] = {}
    for mid in present(o_model):
        name = str(names[mid])
        mask = o_model == mid
        pos = o_pos[mask]
        scores = np.full(n, np.nan)
        status = np.full(n, SKIPPED, dtype=np.int8)
        latency = np.full(n, np.nan)
        scores[pos] = o_score[mask]
        status[pos] = o_status[mask]
        latency[pos] = o_latency[mask]
        modes = tuple(MODE_NAMES.get(int(m) - 1, "unknown") for m in present(o_mode[mask] + 1))
        role: Role = "champion" if name == champion else "challenger"
        experiment: Array | None = None
        sample_rate: Array | None = None
        if role == "challenger":
            codes = np.full(n, -1, dtype=np.int64)
            codes[pos] = o_experiment[mask]
            experiment = np.full(n, None, dtype=object)
            known = codes >= 0
            experiment[known] = names[codes[known]]
            sample_rate = np.full(n, np.nan)
            sample_rate[pos] = o_sample_rate[mask]
        models[name] = ModelColumn(name=name, role=role, scores=scores, status=status,
                                   latency_ms=latency, modes=modes, experiment=experiment,
                                   sample_rate=sample_rate)
    ordered = {champion: models[champion]} if champion in models else {}
    ordered.update({k: models[k] for k in sorted(models) if k != champion})
    return champion, ordered


def _arm_probs(arms: dict[str, Array], index: RowIndex, names: Array) -> dict[str, Array]:
    """Each arm's probability under the logging policy per row (0 where it was not an arm)."""
    arm_probs: dict[str, Array] = {}
    if arms["inf_id"].size:
        a_pos = index.positions(arms["inf_id"])
        keep = a_pos >= 0
        a_pos = a_pos[keep]
        a_model = as_numbers(arms["model"], np.int64)[keep]
        a_prob = as_numbers(arms["prob"])[keep]
        for mid in present(a_model):
            mask = a_model == mid
            col = np.zeros(index.n)
            col[a_pos[mask]] = a_prob[mask]
            arm_probs[str(names[mid])] = col
    return arm_probs


def tensor_columns(tensor: str, n: int, pos: Array, width: Array, numeric: Array,
                    num: Array, cat: Array,
                    names: Sequence[str] | None) -> dict[str, Array]:
    """Scatter one input tensor's stored rows into named per-feature columns."""
    out: dict[str, Array] = {}
    w = int(width.max()) if width.size else 0
    if w <= 0:
        return out
    cols = list(names) if names is not None and len(names) == w else \
        ([tensor] if w == 1 else [f"{tensor}[{j}]" for j in range(w)])
    if numeric.all():
        matrix = np.full((n, w), np.nan)
        uniform = bool((width == w).all()) and all(v is not None for v in num)
        if uniform:
            matrix[pos] = np.frombuffer(b"".join(num), dtype="<f8").reshape(-1, w)
        else:
            for p, k, v in zip(pos, width, num, strict=True):
                if v is not None and k:
                    matrix[p, :k] = np.frombuffer(bytes(v), dtype="<f8")[:k]
        for j, name in enumerate(cols):
            out[name] = matrix[:, j].copy()
        return out
    import orjson

    matrix_obj = np.full((n, w), None, dtype=object)
    for p, v in zip(pos, cat, strict=True):
        if v is not None:
            values = orjson.loads(v)
            matrix_obj[p, :len(values)] = [str(x) for x in values[:w]]
    for j, name in enumerate(cols):
        out[name] = matrix_obj[:, j].copy()
    return out


def latest_experiments(champion: str, groups: Sequence[tuple[str, str, Any, Any, Any]]
                       ) -> dict[str, ExperimentInfo]:
    """Each challenger's newest experiment with `champion`, from (model, experiment, first ts,
    last ts, highest registry version) groups."""
    out: dict[str, ExperimentInfo] = {}
    for name, exp, started, end, version in groups:
        info = ExperimentInfo(id=exp, started=float(started), data_end=float(end),
                              champion=champion, registry_version=int(version))
        known = out.get(name)
        if known is None or (info.started, info.id) > (known.started, known.id):
            out[name] = info
    return dict(sorted(out.items()))


def feature_frame(route: str, since: float | None, until: float | None, ts: Array,
                  request_ids: Array, row_ix: Array, pos: Array, tensor: Array, numeric: Array,
                  width: Array, num: Array, cat: Array, lookup: Array,
                  names: Mapping[str, Sequence[str]] | None) -> FeatureFrame:
    """A FeatureFrame from predictions in time order and their input rows (`pos`: the
    prediction each input row belongs to; `tensor`: name codes into `lookup`)."""
    names = names or {}
    n = int(ts.size)
    columns: dict[str, Array] = {}
    for tid in sorted(present(tensor), key=lambda i: str(lookup[i])):
        mask = tensor == tid
        name = str(lookup[tid])
        columns.update(tensor_columns(name, n, pos[mask], width[mask], numeric[mask],
                                      num[mask], cat[mask], names.get(name)))
    return FeatureFrame(route, since, until, ts if n else np.empty(0),
                        request_row_ids(request_ids, row_ix), columns)


def score_series_of(models: Array, roles: Array, scores: Array, ts: Array,
                    lookup: Array) -> dict[str, ScoreSeries]:
    """Per model (codes into `lookup`), its scores and times; rows already in time order."""
    out: dict[str, ScoreSeries] = {}
    for mid in sorted(present(models), key=lambda i: str(lookup[i])):
        mask = models == mid
        name = str(lookup[mid])
        out[name] = ScoreSeries(name, ROLE_NAMES.get(int(roles[mask][-1]), "challenger"),
                                scores[mask], ts[mask])
    return out


def features_of(route: str, since: float | None, until: float | None, rows: dict[str, Array],
                index: RowIndex, inputs: dict[str, Array], lookup: Array,
                names: Mapping[str, Sequence[str]] | None) -> FeatureFrame:
    """`queries.feature_rows`' answer as a FeatureFrame."""
    pos = index.positions(inputs["inf_id"])
    keep = pos >= 0
    return feature_frame(
        route, since, until, as_numbers(rows["ts"]), rows["request_id"],
        as_numbers(rows["row_ix"], np.int64), pos[keep],
        as_numbers(inputs["name"], np.int64)[keep],
        lookup[as_numbers(inputs["datatype"], np.int64)[keep]] != "BYTES",
        as_numbers(inputs["width"], np.int64)[keep], inputs["num"][keep], inputs["cat"][keep],
        lookup, names)


def scores_of(outs: dict[str, Array], lookup: Array) -> dict[str, ScoreSeries]:
    """`queries.score_rows`' answer as score series, in time order (ties by ingest order)."""
    ts = as_numbers(outs["ts"])
    order = np.lexsort((as_numbers(outs["id"], np.int64), ts))
    return score_series_of(as_numbers(outs["model"], np.int64)[order],
                           as_numbers(outs["role"], np.int64)[order],
                           as_numbers(outs["score"])[order], ts[order], lookup)
