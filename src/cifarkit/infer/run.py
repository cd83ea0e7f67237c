"""Inference stage: InferConfig -> infer() -> InferResult: every input classified by the engine the config
names and written, row by row as results come, to the output it names.

    from cifarkit.infer import InferConfig, infer
    result = infer(InferConfig(inputs=("photos/",), model="model.onnx", format="csv", output="predictions.csv"))
    result.done, result.failed

Memory stays flat whatever the number of inputs: folders are walked lazily, at most a few batches are decoded
at a time, and rows are written as they come. An input that cannot be read or classified is told to the
reporter as an error note (and, in Parquet output, written as a row with its error); the others carry on.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import IO, Any

from cifarkit.errors import CifarkitError
from cifarkit.escape import unescape_name
from cifarkit.infer.classifier import Classifier, Failure
from cifarkit.infer.config import InferConfig
from cifarkit.infer.engines import open_engine
from cifarkit.infer.inputs import InputPlan
from cifarkit.infer.outputs import check_output, text_output
from cifarkit.infer.protocol import Engine
from cifarkit.infer.providers import ProviderFallbackWarning
from cifarkit.infer.sinks import PredictionParts, Writer
from cifarkit.stage import Reporter, Silent

FAILURES_KEPT = 100  # failure messages kept in the result (every failure is counted and told to the reporter)


@dataclass
class InferResult:
    done: int = 0  # images classified and written
    failed: int = 0  # inputs that could not be read or classified
    seconds: float = 0.0  # wall time of the classification, loading excluded
    failures: list[str] = field(default_factory=list)  # the first FAILURES_KEPT failure messages
    output: str | None = None  # where the results went (None: the caller's stream)


def infer(cfg: InferConfig, reporter: Reporter | None = None, *, stream: IO[str] | None = None) -> InferResult:
    """Classify every input of `cfg` and write the results; `stream` (default: sys.stdout at each write) takes
    the text formats when `cfg.output` is None. Raises CifarkitError, before anything is written, for a bad
    option, model, shard, URI or output."""
    cfg.validate()
    rep = reporter or Silent()
    if cfg.engine == "http":  # the model is the server's: its labels come from GET /v1/model
        engine = open_engine(cfg.url or "", engine="http", url=cfg.url, threads=cfg.threads)
        labels, source = engine.labels, None
    else:
        clf = _load(cfg, rep)
        labels, source = clf.labels, clf.source
    if cfg.top_k > len(labels):
        raise CifarkitError(f"--top-k {cfg.top_k} is more than the model's {len(labels)} classes")
    if cfg.output is not None and cfg.format != "parquet":
        check_output(cfg.output, cfg.inputs, source)
    plan = InputPlan.resolve(cfg.inputs)  # shards and URIs are checked here
    if cfg.engine != "http":
        engine = open_engine(
            clf, engine=cfg.engine, threads=cfg.threads, ray_address=cfg.ray_address, ray_actors=cfg.ray_actors
        )
    result = InferResult(output=cfg.output)
    rep.phase("images classified")
    t0 = time.perf_counter()
    with engine:
        if cfg.format == "parquet":
            _to_parquet(engine, plan, cfg, rep, result)
        else:
            with text_output(cfg.output, stream) as f:
                _to_text(engine, plan, f, cfg, rep, result)
    result.seconds = time.perf_counter() - t0
    return result


def _load(cfg: InferConfig, rep: Reporter) -> Classifier:
    """The model on cfg.device; a GPU provider that did not start under --device auto is a warning note (and
    the model runs on the CPU)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ProviderFallbackWarning)
        clf = Classifier.from_file(cfg.model, device=cfg.device, load_timeout=cfg.load_timeout)  # type: ignore[arg-type]
    for w in caught:
        if issubclass(w.category, ProviderFallbackWarning):
            rep.note(str(w.message), "warning")
        else:  # what the caller's filters let through: shown as it would have been
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return clf


def _to_text(engine: Engine, plan: InputPlan, f: Any, cfg: InferConfig, rep: Reporter, result: InferResult) -> None:
    writer = Writer(f, cfg.format, engine.labels, cfg.top_k)
    writer.start()
    t0 = time.perf_counter()
    for r in engine.predict(plan, top_k=cfg.top_k, batch_size=cfg.batch_size):
        if isinstance(r, Failure):
            _failed(result, r.message, rep)
        else:
            result.done += 1
            writer.row(r)
            if result.done % cfg.batch_size == 0:
                f.flush()  # a reader downstream of a pipe sees each batch as it is done
        rep.progress(result.done, failed=result.failed, images_per_s=result.done / _since(t0))
    writer.end()
    f.flush()


def _to_parquet(engine: Engine, plan: InputPlan, cfg: InferConfig, rep: Reporter, result: InferResult) -> None:
    """A folder of part files, written under a temporary name and renamed to cfg.output at the end: it appears
    complete, with a row for every input, or not at all. Tables go from the engine to the file as they come."""
    from cifarkit.atomic import staged_folder

    assert cfg.output is not None
    t0 = time.perf_counter()
    with staged_folder(cfg.output, "--output") as tmp:
        parts = PredictionParts(tmp)
        for table in engine.tables(plan, top_k=cfg.top_k, batch_size=cfg.batch_size):
            errors = table.column("error").drop_null().to_pylist()  # escaped, as the row's text
            for message in errors:
                _failed(result, unescape_name(message), rep)
            result.done += table.num_rows - len(errors)
            parts.table(table)
            rep.progress(result.done, failed=result.failed, images_per_s=result.done / _since(t0))
        parts.close()


def _failed(result: InferResult, message: str, rep: Reporter) -> None:
    result.failed += 1
    if len(result.failures) < FAILURES_KEPT:
        result.failures.append(message)
    rep.note(message, "error")


def _since(t0: float) -> float:
    return max(time.perf_counter() - t0, 1e-9)
