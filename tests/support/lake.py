"""Helpers for landing-zone tests: datasets compared field by field, NaN-aware."""

from __future__ import annotations

from dataclasses import asdict, fields

import numpy as np

from evaluator.dataset import EvalDataset


def _same(a: object, b: object) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            return False
        if a.dtype.kind == "f" and b.dtype.kind == "f":
            return bool(np.array_equal(a, b, equal_nan=True))
        return bool((a == b).all()) if a.size else True
    return a == b


def dataset_differences(a: EvalDataset, b: EvalDataset) -> list[str]:
    """Names of the fields (and model columns) where two datasets differ; empty when equal."""
    out: list[str] = []
    for f in fields(EvalDataset):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.name == "models":
            if list(x) != list(y):
                out.append(f"models order {list(x)} != {list(y)}")
                continue
            for name in x:
                for g in fields(x[name]):
                    if not _same(getattr(x[name], g.name), getattr(y[name], g.name)):
                        out.append(f"models[{name}].{g.name}")
        elif f.name == "arm_probs":
            if sorted(x) != sorted(y) or not all(_same(x[k], y[k]) for k in x):
                out.append("arm_probs")
        elif f.name == "stats":
            if asdict(x) != asdict(y):
                out.append(f"stats {asdict(x)} != {asdict(y)}")
        elif not _same(x, y):
            out.append(f.name)
    return out
