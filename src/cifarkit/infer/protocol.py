"""The protocol every inference engine follows (cifarkit.infer.engines: this process; cifarkit.infer.ray: a Ray
cluster; the HTTP service): the same inputs (an InputPlan, or the paths, folders, shards and URIs to make one),
the same results in input order. `predict` yields Predictions and Failures; `tables` yields the same rows as
pyarrow Tables in cifarkit.infer.sinks.prediction_schema (what --format parquet writes).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

from cifarkit.infer.classifier import Result
from cifarkit.infer.config import DEFAULT_BATCH_SIZE
from cifarkit.infer.inputs import InputPlan

TABLE_ROWS = 4096  # rows per table that Engine.tables hands to a Parquet sink


def as_plan(inputs: InputPlan | Iterable[str | os.PathLike[str]]) -> InputPlan:
    """An InputPlan as given, or one resolved from paths (shards and URIs are checked now: CifarkitError)."""
    if isinstance(inputs, InputPlan):
        return inputs
    if isinstance(inputs, (str, bytes, os.PathLike)):
        inputs = [inputs]  # type: ignore[list-item]
    return InputPlan.resolve(inputs)  # type: ignore[arg-type]


class Engine:
    """The protocol every engine follows, and what they share: `labels` (the model's class names), `source` (its
    file), `predict`, `tables` (built here from `predict` in chunks of TABLE_ROWS; an engine that can build them
    where it classifies overrides it), `close`, and use as a context manager."""

    labels: tuple[str, ...]
    source: str

    def predict(self, inputs: Any, *, top_k: int = 1, batch_size: int = DEFAULT_BATCH_SIZE) -> Iterator[Result]:
        raise NotImplementedError

    def tables(self, inputs: Any, *, top_k: int = 1, batch_size: int = DEFAULT_BATCH_SIZE) -> Iterator[Any]:
        from cifarkit.infer.sinks import PredictionRows
        from cifarkit.shards import pyarrow_modules

        rows = PredictionRows(pyarrow_modules()[0])
        for r in self.predict(inputs, top_k=top_k, batch_size=batch_size):
            rows.add(r)
            if len(rows) >= TABLE_ROWS:
                yield rows.table()
        if len(rows):
            yield rows.table()

    def close(self) -> None:
        pass

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
