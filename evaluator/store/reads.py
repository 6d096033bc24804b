"""The reads every dataset source offers: the store here, the landing zone's reader
(evaluator/lake/reader.py) there. Experiments and their span are built on three primitives."""

from __future__ import annotations

import abc

from evaluator.dataset import EvalDataset, ExperimentInfo


class DatasetReads(abc.ABC):
    """The reads built on `current_experiments`, `time_range` and `load_dataset`, shared by
    the store and the landing zone's reader (evaluator/lake/reader.py).

    Experiments: `load_experiments` loads every row since the earliest current experiment
    started, so the verdict's data never depends on a window.
    """

    @abc.abstractmethod
    def current_experiments(self, route: str) -> dict[str, ExperimentInfo]: ...

    @abc.abstractmethod
    def time_range(self, route: str) -> tuple[float, float] | None: ...

    @abc.abstractmethod
    def load_dataset(self, route: str, since: float | None = None, until: float | None = None,
                     *, task: str = "auto", threshold: float = 0.5,
                     require_label: bool = True) -> EvalDataset: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def experiment_span(self, route: str, window: float | None = None
                        ) -> tuple[dict[str, ExperimentInfo], float | None]:
        """(current experiments, the `since` that covers all of them).

        Without experiment ids (records from before experiments) `since` is the start of the
        `window` ending at the route's newest inference (None: everything), as it always was.
        """
        experiments = self.current_experiments(route)
        if experiments:
            return experiments, min(x.started for x in experiments.values())
        span = self.time_range(route) if window is not None else None
        return experiments, (None if span is None or window is None else span[1] - window)

    def load_experiments(self, route: str, window: float | None = None, *, task: str = "auto",
                         threshold: float = 0.5,
                         span: tuple[dict[str, ExperimentInfo], float | None] | None = None
                         ) -> EvalDataset:
        """Every labelled row since the earliest current experiment started, with
        `experiments` filled: the verdict's data, whatever a display window says.
        `span`: `experiment_span`'s answer when the caller already has it."""
        experiments, since = span if span is not None else self.experiment_span(route, window)
        dataset = self.load_dataset(route, since, None, task=task, threshold=threshold)
        dataset.experiments = experiments
        return dataset
