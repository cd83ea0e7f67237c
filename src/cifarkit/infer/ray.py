"""Batch inference on Ray Data: cifarkit's own decoding and onnxruntime session, in actors, one per CPU.

Imported only when asked for (`cifar-infer --engine ray`, or by a Ray user); Ray and pyarrow come with
`pip install 'cifarkit[ray]'`. For Ray users, to compose with their own pipelines:

    import ray
    from cifarkit.infer.ray import Predictor, classify_dataset
    ds = ray.data.read_parquet("s3://bucket/shards/")           # path, bytes: what cifar-pack writes
    preds = classify_dataset(ds, "model.onnx", top_k=3)         # path, label, index, probability, top_k, error
    preds.write_parquet("s3://bucket/predictions/")

`Predictor` is the callable class behind it, for `Dataset.map_batches` directly. A dataset of paths alone
(a `path` column, no `bytes`) is read inside the actors, so its files must be readable on every node.

The pitfalls measured with Ray Data (docs/scale.md) and what this module does about them:
- onnxruntime ignores OMP_NUM_THREADS: N actors each start a pool of one thread per core, N x cores threads
  on N cores (ray-project/ray#28044). Each actor's session has as many threads as the actor has CPUs (1 by
  default, the most images/s per core here), and sleeps rather than spins between calls.
- A dataset hangs when actors hold every CPU and read tasks get none (#44687). The command line creates no
  read or write tasks: its inputs are work units (paths, shard row groups, URIs) made in the driver, read and
  decoded inside the actors, and results come back to the driver, which writes them.
- `read_images` fails on mixed sizes or modes (#38050): images are decoded by cifarkit.preprocess, the
  rule the local engine uses, inside the actors.
- Listing 100M small files is itself the bottleneck (#40686): pack them with cifar-pack; a shard's row
  group is one unit of work.
- `concurrency=` is deprecated: pools are sized with `compute=ActorPoolStrategy(size=N)`.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
from collections.abc import Iterator
from typing import Any

from cifarkit.atomic import committed_member
from cifarkit.errors import CifarkitError, first_line
from cifarkit.escape import escape_name
from cifarkit.files import Blob, Failure
from cifarkit.infer.classifier import DEFAULT_BATCH_SIZE, Classifier, Prediction, Result
from cifarkit.infer.inputs import InputPlan, unit_items
from cifarkit.infer.protocol import Engine, as_plan
from cifarkit.infer.session import read_model_bytes
from cifarkit.infer.sinks import prediction_table
from cifarkit.shards import decode_names, pyarrow_modules

INSTALL_HINT = "pip install 'cifarkit[ray]'"
UNIT_IMAGES = 2048  # images per work unit of paths or URIs: one Ray task, retried as a whole if its actor dies
CONNECT_TIMEOUT_S = 5.0  # an unreachable --ray-address is reported after this long, not Ray's minute of retries


def import_ray() -> Any:
    """The ray module, or a CifarkitError saying what to install."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise CifarkitError(f"--engine ray needs Ray: {INSTALL_HINT}") from None
    pyarrow_modules()
    return ray


# ---------------------------------------------------------------------------------------------------------
# In the actors
# ---------------------------------------------------------------------------------------------------------


def actor_cpus() -> int:
    """The CPUs Ray gave this actor (1 outside an actor)."""
    import ray

    if not ray.is_initialized():
        return 1
    return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))


def load_model(model: Any, threads: int) -> Classifier:
    """A Classifier for a model given as a path, as bytes, or as a one-element list holding an ObjectRef to
    its bytes (how the command line ships it: a nested reference keeps the actor's own constructor
    arguments small, so Ray can restart a dead actor, ray-project/ray#53727)."""
    if isinstance(model, list):
        import ray

        model = ray.get(model[0])
    if isinstance(model, (str, os.PathLike)):
        return Classifier.from_file(model, intra_op_threads=threads, device="cpu")
    with tempfile.TemporaryDirectory(prefix="cifarkit-model-") as tmp:  # the session reads the file once
        path = os.path.join(tmp, "model.onnx")
        with open(path, "wb") as f:
            f.write(model)
        clf = Classifier.from_file(path, intra_op_threads=threads, device="cpu")
    clf.source = "model.onnx"
    return clf


class Predictor:
    """The callable class for `Dataset.map_batches(Predictor, batch_format="pyarrow", ...)`: one onnxruntime
    session per actor, created once, with one thread per CPU of the actor (or `threads`).

    A batch has a `path` column (string or binary) and optionally `bytes` (the encoded files); without
    `bytes`, each path is read here. Returns `path` as given, then label, index, probability, top_k
    (list of {label, probability}, most likely first) and error (null for a classified image; for an input
    that failed, the reason, and the other columns null). One output row per input row, in order."""

    def __init__(self, model: Any, top_k: int = 1, batch_size: int = DEFAULT_BATCH_SIZE, threads: int = 0) -> None:
        self.clf = load_model(model, threads or actor_cpus())
        self.top_k, self.batch_size = top_k, batch_size

    def __call__(self, batch: Any) -> Any:
        pa, _ = pyarrow_modules()
        names = decode_names(batch.column("path"))
        if "bytes" in batch.column_names:
            data = batch.column("bytes").to_pylist()
            items: list[Any] = [
                Blob(n, d) if d is not None else Failure(n, f"{n}: no bytes (null)")
                for n, d in zip(names, data, strict=True)
            ]
        else:
            items = names
        results = list(self.clf.predict_paths(items, top_k=self.top_k, batch_size=self.batch_size, threads=0))
        return prediction_columns(pa, results, batch.column("path"))


def prediction_columns(pa: Any, results: list[Result], path: Any) -> Any:
    """Results -> a pyarrow Table: `path` (the input column as given), label, index, probability, top_k, error."""
    top = pa.list_(pa.struct([("label", pa.string()), ("probability", pa.float32())]))
    ok = [isinstance(r, Prediction) for r in results]
    cols = {
        "path": path,
        "label": pa.array([r.label if k else None for r, k in zip(results, ok, strict=True)], pa.string()),
        "index": pa.array([r.index if k else None for r, k in zip(results, ok, strict=True)], pa.int32()),
        "probability": pa.array([r.probability if k else None for r, k in zip(results, ok, strict=True)], pa.float32()),
        "top_k": pa.array(
            [
                [{"label": lb, "probability": p} for lb, p in r.top_k] if k else None
                for r, k in zip(results, ok, strict=True)
            ],
            top,
        ),
        "error": pa.array(
            [None if k else escape_name(r.message) for r, k in zip(results, ok, strict=True)], pa.string()
        ),
    }
    return pa.table(cols)


class UnitPredictor(Predictor):
    """The command line's actor: each batch holds one work unit (cifarkit.infer.inputs.InputPlan.units), read and
    classified here. The results go back in order, either pickled (exact, file names that are not UTF-8
    included; the driver formats each row) or, for --format parquet, as the output table itself
    (cifarkit.infer.sinks.prediction_table: the per-row work is done here, in parallel, not in the driver)."""

    def __init__(self, model: Any, top_k: int = 1, batch_size: int = DEFAULT_BATCH_SIZE, tables: bool = False) -> None:
        super().__init__(model, top_k, batch_size)
        self.tables = tables

    def __call__(self, batch: Any) -> Any:
        pa, _ = pyarrow_modules()
        out = []
        for blob in batch.column("unit").to_pylist():
            items = unit_items(pickle.loads(blob))
            out.extend(self.clf.predict_paths(items, top_k=self.top_k, batch_size=self.batch_size, threads=0))
        if self.tables:
            return prediction_table(out)
        return pa.table({"results": pa.array([pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL)], pa.binary())})


# ---------------------------------------------------------------------------------------------------------
# For Ray users
# ---------------------------------------------------------------------------------------------------------


def classify_dataset(
    ds: Any,
    model: str | os.PathLike[str] | bytes,
    *,
    top_k: int = 1,
    batch_size: int = 1024,
    actors: int | None = None,
    cpus_per_actor: float = 1,
) -> Any:
    """A ray.data.Dataset of paths (a `path` column) or of encoded images (`path` and `bytes`) -> a Dataset of
    predictions (Predictor's columns), lazily. The model is read here and shipped to the actors: it need not
    exist on the other nodes.

    Without `actors`, the pool grows from 1 to the cluster's CPUs / `cpus_per_actor` within the CPUs Ray Data
    leaves it: a fixed pool on every CPU starves the read tasks upstream and the dataset hangs
    (ray-project/ray#44687; measured here with read_parquet on 2 CPUs). A fixed `actors` is taken as given."""
    ray = import_ray()
    if isinstance(model, (str, os.PathLike)):
        with open(model, "rb") as f:
            model = f.read()
    if actors is None:
        most = max(1, int(ray.cluster_resources().get("CPU", 1) // cpus_per_actor))
        compute = ray.data.ActorPoolStrategy(min_size=1, max_size=most)
    else:
        compute = ray.data.ActorPoolStrategy(size=actors)
    return ds.map_batches(
        Predictor,
        fn_constructor_kwargs={"model": [ray.put(model)], "top_k": top_k, "threads": max(1, int(cpus_per_actor))},
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=compute,
        num_cpus=cpus_per_actor,
    )


# ---------------------------------------------------------------------------------------------------------
# For the command line: cifar-infer PATH... --engine ray [--ray-address ADDR]
# ---------------------------------------------------------------------------------------------------------


class RayEngine(Engine):
    """Connects to a Ray cluster (or starts a local one) and classifies an InputPlan there: work units made
    in the driver, classified by a pool of UnitPredictor actors, results streamed back in input order."""

    def __init__(self, ray: Any, clf: Classifier, model: bytes, actors: int, *, started: bool) -> None:
        self.ray, self.clf, self.actors, self.started = ray, clf, actors, started
        self.labels, self.source = clf.labels, clf.source
        self.model_ref = ray.put(model)  # held here for the actors' lifetime: a restarted actor reads it again

    @classmethod
    def connect(
        cls, clf: Classifier, *, address: str | None = None, actors: int | None = None, quiet: bool = True
    ) -> RayEngine:
        """Raises CifarkitError (one line) if Ray is not installed or the address cannot be reached."""
        ray = import_ray()
        model = read_model_bytes(os.fspath(committed_member(clf.source)))  # the bytes the local session read
        started = connect(ray, address, quiet=quiet)
        cpus = int(ray.cluster_resources().get("CPU", 0))
        if cpus < 1:
            raise CifarkitError(f"the Ray cluster at {address or 'this machine'} has no CPUs for actors")
        return cls(ray, clf, model, actors or cpus, started=started)

    def predict(
        self, inputs: Any, *, top_k: int = 1, batch_size: int = DEFAULT_BATCH_SIZE, predictor: type | None = None
    ) -> Iterator[Result]:
        """The results for every input, in input order. Each work unit is one Ray task; an actor that dies is
        restarted and its task retried (Ray Data's defaults for actor pools: max_restarts=-1,
        max_task_retries=-1), and only finished tasks reach the driver, so every input comes out once."""
        for table in self._execute(as_plan(inputs), top_k, batch_size, predictor or UnitPredictor, tables=False):
            for blob in table.column("results").to_pylist():
                yield from pickle.loads(blob)

    def tables(
        self, inputs: Any, *, top_k: int = 1, batch_size: int = DEFAULT_BATCH_SIZE, predictor: type | None = None
    ) -> Iterator[Any]:
        """The same, as pyarrow Tables in cifarkit.infer.sinks.prediction_schema (a row for every input, failed
        ones with their error), built in the actors: no Python object per row in the driver."""
        yield from self._execute(as_plan(inputs), top_k, batch_size, predictor or UnitPredictor, tables=True)

    def _execute(self, plan: InputPlan, top_k: int, batch_size: int, predictor: type, *, tables: bool) -> Iterator[Any]:
        ray = self.ray
        units = [pickle.dumps(u, protocol=pickle.HIGHEST_PROTOCOL) for u in plan.units(UNIT_IMAGES)]
        if not units:
            return
        ctx = ray.data.DataContext.get_current()
        saved = ctx.execution_options.preserve_order, ctx.enable_progress_bars
        ctx.execution_options.preserve_order = True  # the local engine's order, row for row
        ctx.enable_progress_bars = False
        try:  # a Dataset copies the current context when it is made: restore the caller's right after
            # from_items builds the blocks here (from_arrow runs a remote task for their metadata: 1.4-2.5 s
            # more on 2 busy cores); one unit per block, so one unit per task.
            ds = ray.data.from_items([{"unit": u} for u in units], override_num_blocks=len(units))
            kwargs = {"model": [self.model_ref], "top_k": top_k, "batch_size": batch_size, "tables": tables}
            preds = ds.map_batches(
                predictor,
                fn_constructor_kwargs=kwargs,
                batch_size=1,
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=min(self.actors, len(units))),
                num_cpus=1,
            )
        finally:
            ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved
        yield from preds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1)

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()  # disconnects; stops the local Ray if this run started it


def connect(ray: Any, address: str | None, *, quiet: bool) -> bool:
    """ray.init for the command line; True if it connected here (then RayEngine.close disconnects, and stops
    the local Ray it may have started). Without an address: $RAY_ADDRESS, else a cluster started on this
    machine with `ray start` if it answers, else a new local Ray with every core. (Ray's own rule would
    also try a cluster that `ray stop` or a crash left recorded in /tmp/ray, and hang on it for minutes.)"""
    option = "--ray-address"
    if not address and os.environ.get("RAY_ADDRESS"):
        address, option = os.environ["RAY_ADDRESS"], "$RAY_ADDRESS"
    if address and address != "auto":
        probe(address, option)
    if ray.is_initialized():  # a caller's own Ray session (the library inside a Ray program, the tests)
        return False
    if not address:
        address = recorded_cluster() or "local"  # "local": start a new one, whatever /tmp/ray says
    import logging

    kwargs: dict[str, Any] = {"include_dashboard": False}
    if quiet:  # the command's stderr is one line per failed input; Ray's start-up notes are for --debug
        kwargs.update(logging_level=logging.ERROR, log_to_driver=False)
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
        where = "a local Ray" if address == "local" else f"{option} {address}"
        raise CifarkitError(f"{where}: cannot connect ({first_line(exc, 160)})") from None
    if quiet:
        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.ERROR)
    return True


def recorded_cluster() -> str | None:
    """The address of the cluster `ray start` recorded on this machine, if one answers there."""
    try:
        from ray._private.utils import get_ray_address_file

        with open(get_ray_address_file(None)) as f:
            address = f.read().strip()
    except (ImportError, OSError):
        return None
    try:
        probe(address, "the recorded Ray cluster", timeout=1.0)
    except CifarkitError:
        return None
    return address


def probe(address: str, option: str = "--ray-address", timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Check that host:port of a Ray address accepts connections, so that a wrong or unreachable address is
    one line after `timeout` seconds rather than minutes of Ray's retries."""
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise CifarkitError(
            f"{option} {address}: expected HOST:PORT (the head's GCS, 6379 by default) or ray://HOST:PORT"
        )
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        why = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise CifarkitError(
            f"{option} {address}: cannot reach {host}:{port} ({why}); is `ray start --head` running there?"
        ) from None
