"""Inference engines behind one protocol. Every engine takes the same inputs (an InputPlan, or the paths, folders,
shards and URIs to make one) and yields the same results in input order: a Prediction for each image, a Failure
(naming the input and why) for each input that could not be read or classified, by the same decoding rule
(cifarkit.preprocess) and the same escaping rule for what is printed (cifarkit.escape). A caller never asks
which engine it holds.

    from cifarkit.infer import open_engine
    with open_engine("model.onnx", engine="ray") as engine:      # or "local"; or ("http://HOST:PORT", engine="http")
        for r in engine.predict(["photos/"], top_k=3):
            print(r.source, r.label if isinstance(r, Prediction) else r.message)

The protocol itself is cifarkit.infer.protocol.Engine; this module holds the local engine and open_engine, the
Ray engine is cifarkit.infer.ray, the HTTP engine (a running cifar-serve) cifarkit.infer.http.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from cifarkit.errors import CifarkitError
from cifarkit.infer.classifier import Classifier, Result
from cifarkit.infer.config import DEFAULT_BATCH_SIZE, ENGINES
from cifarkit.infer.protocol import Engine, as_plan


class LocalEngine(Engine):
    """This process: files read and decoded in `threads` threads (None: cores + 1; 0: the calling thread), a
    bounded window of batches in flight, one onnxruntime session (cifarkit.infer.classifier.Classifier)."""

    def __init__(self, clf: Classifier, *, threads: int | None = None) -> None:
        self.clf, self.threads = clf, threads
        self.labels, self.source = clf.labels, clf.source

    def predict(self, inputs: Any, *, top_k: int = 1, batch_size: int = DEFAULT_BATCH_SIZE) -> Iterator[Result]:
        plan = as_plan(inputs)
        return self.clf.predict_paths(plan.items(), top_k=top_k, batch_size=batch_size, threads=self.threads)


def open_engine(
    model: str | os.PathLike[str] | Classifier,
    *,
    engine: str = "local",
    device: str = "auto",
    threads: int | None = None,
    ray_address: str | None = None,
    ray_actors: int | None = None,
    url: str | None = None,
    quiet: bool = True,
) -> Engine:
    """The engine named `engine` for `model` (a model.onnx, a folder holding one, or a loaded Classifier).
    local: this process, `device` and decoding `threads`. ray: actors on the Ray cluster at `ray_address`
    (default: $RAY_ADDRESS, else a cluster started on this machine, else a new local Ray that close() stops),
    `ray_actors` of them (default one per CPU). http: the cifar-serve at `url` (or `model` given as its URL;
    `threads` requests in flight, default 4). Raises CifarkitError for a model, device or cluster that cannot
    be used, in one line."""
    if engine not in ENGINES:
        raise CifarkitError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "http":  # the model is the server's: `url`, or `model` given as the URL
        from cifarkit.infer.http import HttpEngine

        target = url or (model if isinstance(model, str) and "://" in model else None)
        if target is None:
            raise CifarkitError("--engine http needs --url, the running cifar-serve (e.g. http://127.0.0.1:8000)")
        return HttpEngine.connect(target, threads=threads)
    clf = model if isinstance(model, Classifier) else Classifier.from_file(model, device=device)
    if engine == "local":
        return LocalEngine(clf, threads=threads)
    from cifarkit.infer.ray import RayEngine

    return RayEngine.connect(clf, address=ray_address, actors=ray_actors, quiet=quiet)
