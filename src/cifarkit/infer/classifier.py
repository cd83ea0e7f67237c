"""The classifier: an exported model.onnx -> predictions, with onnxruntime, numpy and Pillow only.

torch is never imported here, directly or through another cifarkit module (a test checks it): an app that
embeds the classifier needs neither torch nor the training code. Labels, image size and the resize rule come
from the model's own metadata (cifarkit.spec.ArtifactMeta), so one file is all an app ships.

    from cifarkit.infer import Classifier
    clf = Classifier.from_file("model.onnx")            # load once (~10 ms), reuse
    [pred] = clf.predict("cat.jpg")                     # paths, PIL images or uint8 arrays, one or many
    print(pred.label, pred.probability, pred.top_k)
    probs = clf.run(batch)[1]                           # uint8 [N, 32, 32, 3] -> float32 [N, 10]
    for r in clf.predict_paths(cifarkit.files.iter_image_files(["photos/"])):   # streams, flat memory
        print(r.source, r.label if isinstance(r, Prediction) else r.message)

The streaming path decodes in a thread pool (Pillow releases the GIL while it decodes) with a bounded window
of batches in flight, overlapping decoding with onnxruntime; results come back in input order.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cifarkit.errors import CifarkitError, first_line
from cifarkit.files import MAX_THREADS, Blob, Failure, chunked, default_threads, ordered_map
from cifarkit.infer.config import DEFAULT_BATCH_SIZE, DEFAULT_LOAD_TIMEOUT_S, MAX_BATCH_SIZE
from cifarkit.infer.providers import CPU
from cifarkit.infer.session import check_contract, open_session
from cifarkit.preprocess import ImageError, is_pil_image, to_pixels
from cifarkit.spec import INPUT_NAME, OUTPUT_NAMES, ArtifactMeta

MAX_WINDOW_BYTES = 1 << 30  # decoded pixels in flight at most: (threads + 1) batches of H x W x 3 bytes


# ---------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Prediction:
    """The model's answer for one image."""

    source: str  # the path, or "<image 3>" / "<array 3>" for in-memory items (their position in the input)
    label: str  # the most likely class name
    index: int  # its index in the model's class_names
    probability: float  # softmax probability of `label`, in [0, 1]
    top_k: tuple[tuple[str, float], ...] = field(default=())  # (label, probability), most likely first

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.source,
            "label": self.label,
            "index": self.index,
            "probability": round(self.probability, 6),
            "top_k": [{"label": label, "probability": round(p, 6)} for label, p in self.top_k],
        }


Result = Prediction | Failure


# ---------------------------------------------------------------------------------------------------------
# The classifier
# ---------------------------------------------------------------------------------------------------------


class Classifier:
    """An exported cifarkit model in an onnxruntime session, with its labels and preprocessing rule.

    Thread-safe for concurrent calls (onnxruntime sessions are); build it once and reuse it. `providers` says
    where it runs (e.g. ('CUDAExecutionProvider', 'CPUExecutionProvider')); on a GPU provider batches go
    through IO binding (`io_binding`, which None turns on exactly there)."""

    def __init__(
        self,
        session: Any,
        meta: ArtifactMeta,
        *,
        source: str = "<model>",
        io_binding: bool | None = None,
        load_timeout: float = DEFAULT_LOAD_TIMEOUT_S,
    ) -> None:
        check_contract(session, meta, source)
        self.session = session
        self.meta = meta
        self.source = source
        self.labels: tuple[str, ...] = tuple(meta.class_names)
        self.image_size: tuple[int, int] = (int(meta.image_size[0]), int(meta.image_size[1]))  # (H, W)
        self._outputs = [o.name for o in session.get_outputs()]
        self.providers: tuple[str, ...] = tuple(session.get_providers())
        self._io_binding = self.providers[0] != CPU if io_binding is None else io_binding
        self._runner = ThreadPoolExecutor(max_workers=4, thread_name_prefix="cifarkit-onnx")  # see _session_run
        # A probe: the outputs' real shapes (a dynamic class dimension says nothing until run) are checked
        # against the metadata before any image is read, not after a run has half-written its results; a model
        # that does not answer one image within `load_timeout` seconds (0: no limit) is refused here.
        try:
            self._run(np.zeros((1, *self.image_size, 3), np.uint8), timeout=load_timeout or None)
        except CifarkitError:
            raise
        except TimeoutError:
            raise CifarkitError(
                f"model {source} did not answer one image within {load_timeout:g} s when it was loaded; it is not "
                "usable here (--load-timeout sets the limit, 0 none)"
            ) from None
        except Exception as exc:  # onnxruntime's own error types
            raise CifarkitError(f"model {source} cannot run ({first_line(exc)})") from None

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike[str],
        *,
        intra_op_threads: int | None = None,
        device: str = "auto",
        load_timeout: float = DEFAULT_LOAD_TIMEOUT_S,
    ) -> Classifier:
        """Load model.onnx (or a folder holding one) on `device`: "auto" (TensorRT, then CUDA, then the CPU, as
        the installed onnxruntime offers; the CPU with the standard onnxruntime package), "cpu", "cuda" or
        "tensorrt" (cifarkit.infer.providers). Raises CifarkitError if the model is missing, not ONNX, or not a
        cifarkit export (input `images` uint8 [N, H, W, 3] and cifarkit metadata), or if `device` is not
        available (the message says what to install), or if it does not answer one image within `load_timeout`
        seconds (0: no limit)."""
        session, meta, path = open_session(path, intra_op_threads=intra_op_threads, device=device)
        return cls(session, meta, source=path, load_timeout=load_timeout)

    def __repr__(self) -> str:
        h, w = self.image_size
        return (
            f"Classifier({self.source!r}, model={self.meta.model_name!r}, classes={len(self.labels)}, "
            f"input={h}x{w}, resize={self.meta.resize_mode}/{self.meta.resize_filter})"
        )

    # ---- arrays in, arrays out -------------------------------------------------------------------------

    def run(self, batch: np.ndarray, *, batch_size: int = DEFAULT_BATCH_SIZE) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [N, H, W, 3] RGB at the model's size -> (logits, probabilities), float32 [N, C] each.
        Split into calls of `batch_size` images, so that a huge N does not allocate huge activations."""
        batch = self._check_batch(batch)
        n, c = len(batch), len(self.labels)
        if n == 0:
            return np.zeros((0, c), np.float32), np.zeros((0, c), np.float32)
        if n <= batch_size:
            return self._run(batch)
        logits = np.empty((n, c), np.float32)
        probs = np.empty((n, c), np.float32)
        for start in range(0, n, batch_size):
            logits[start : start + batch_size], probs[start : start + batch_size] = self._run(
                batch[start : start + batch_size]
            )
        return logits, probs

    def _check_batch(self, batch: np.ndarray) -> np.ndarray:
        """The batch as a C-contiguous uint8 [N, H, W, 3] array, or a CifarkitError saying what is wrong."""
        h, w = self.image_size
        if not isinstance(batch, np.ndarray) or batch.dtype != np.uint8 or batch.shape[1:] != (h, w, 3):
            got = f"{batch.dtype} {list(batch.shape)}" if isinstance(batch, np.ndarray) else type(batch).__name__
            raise CifarkitError(
                f"expected a uint8 [N, {h}, {w}, 3] RGB batch, got {got}; "
                "use predict() for images of other sizes or types"
            )
        return np.ascontiguousarray(batch)

    def _run(self, batch: np.ndarray, timeout: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        if OUTPUT_NAMES[1] in self._outputs:
            logits, probs = self._session_run(list(OUTPUT_NAMES), {INPUT_NAME: batch}, timeout)
        else:  # a model with logits only: the softmax here is the graph's
            (logits,) = self._session_run([OUTPUT_NAMES[0]], {INPUT_NAME: batch}, timeout)
            e = np.exp(logits - logits.max(axis=1, keepdims=True))
            probs = e / e.sum(axis=1, keepdims=True)
        if logits.shape != (len(batch), len(self.labels)) or probs.shape != logits.shape:
            raise CifarkitError(
                f"model {self.source} returned outputs of shape {list(logits.shape)} for {len(batch)} images, "
                f"expected [{len(batch)}, {len(self.labels)}] (its metadata names {len(self.labels)} classes)"
            )
        return logits, probs

    def _session_run(
        self, names: list[str], feeds: dict[str, np.ndarray], timeout: float | None = None
    ) -> list[np.ndarray]:
        """session.run in a worker thread: the calling thread waits interruptibly, so Ctrl-C and SIGTERM reach
        it at once even while onnxruntime runs a long graph (a crafted Loop), and the abandoned run (or one
        over `timeout` seconds: TimeoutError) is told to stop (RunOptions.terminate). Costs a thread hand-off,
        ~30 us, per batch."""
        import onnxruntime as ort

        options = ort.RunOptions()
        # A failed run raises (and becomes a Failure or a one-line error); onnxruntime would also log it to
        # stderr in colour, and a terminated run logs "Exiting due to terminate flag" after the user's Ctrl-C.
        options.log_severity_level = 4
        future = self._runner.submit(self._call, names, feeds, options)
        try:
            return future.result(timeout=timeout)
        except BaseException:
            options.terminate = True
            raise

    def _call(self, names: list[str], feeds: dict[str, np.ndarray], options: Any) -> list[np.ndarray]:
        """One session run. On a GPU provider through IO binding: the uint8 batch goes to the device as it is
        (a quarter of the bytes of float32; the graph casts there) and the outputs come back to host memory."""
        if not self._io_binding:
            return self.session.run(names, feeds, options)
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        for name in names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding, options)
        return binding.copy_outputs_to_cpu()

    def _predictions(self, logits: np.ndarray, probs: np.ndarray, sources: list[str], top_k: int) -> list[Result]:
        """A Prediction for each row, or a Failure where the model's output is not finite (NaN or Inf: a
        broken model must not label an image with probability NaN)."""
        k = max(1, min(int(top_k), len(self.labels)))
        # Rank by logits rather than probabilities: softmax can round two close logits to one probability.
        # A stable sort on -logits breaks ties by the lower index, as argmax does.
        order = np.argsort(-logits, axis=1, kind="stable")[:, :k]  # [N, k] class indices
        top_p = np.take_along_axis(probs, order, axis=1).tolist()  # [N, k] probabilities
        finite = (np.isfinite(logits).all(axis=1) & np.isfinite(probs).all(axis=1)).tolist()
        labels = self.labels
        out: list[Result] = []
        for src, idx, ps, ok in zip(sources, order.tolist(), top_p, finite, strict=True):
            if not ok:
                out.append(Failure(src, f"{src}: the model's output is not finite (NaN or Inf); the model is broken"))
                continue
            ranked = tuple((labels[i], p) for i, p in zip(idx, ps, strict=True))
            out.append(Prediction(src, labels[idx[0]], idx[0], ps[0], ranked))
        return out

    # ---- images in, predictions out --------------------------------------------------------------------

    def pixels(self, item: Any, source: str | None = None) -> np.ndarray:
        """A path, PIL image or uint8 array -> uint8 [H, W, 3] by this model's resize rule (what predict feeds
        the model). Raises ImageError naming `source` for an unreadable image."""
        return to_pixels(item, self.image_size, self.meta.resize_mode, self.meta.resize_filter, source)

    def predict(
        self,
        items: Iterable[Any] | Any,
        *,
        top_k: int = 1,
        batch_size: int = DEFAULT_BATCH_SIZE,
        threads: int | None = None,
    ) -> list[Prediction]:
        """Classify paths, PIL images and uint8 arrays (any size: the model's resize rule applies), in order.
        One item (a path, an image, an [H, W, 3] array) is also accepted; a uint8 [N, H, W, 3] array at the
        model's size is a batch, classified as is. Raises ImageError for the first item that cannot be read;
        use predict_paths() to carry on past them."""
        if isinstance(items, np.ndarray) and items.ndim == 4:
            logits, probs = self.run(items, batch_size=batch_size)
            results = self._predictions(logits, probs, [f"<array {i}>" for i in range(len(probs))], top_k)
        else:
            items = [items] if _is_single(items) else items
            results = self._stream(items, top_k=top_k, batch_size=batch_size, threads=threads)
        out: list[Prediction] = []
        for r in results:
            if isinstance(r, Failure):
                raise ImageError(r.message)
            out.append(r)
        return out

    def predict_paths(
        self,
        paths: Iterable[str | os.PathLike[str] | Failure],
        *,
        top_k: int = 1,
        batch_size: int = DEFAULT_BATCH_SIZE,
        threads: int | None = None,
    ) -> Iterator[Result]:
        """Stream Predictions for image files, in input order; an unreadable file yields a Failure in its place
        (and a Failure in the input, as iter_image_files() yields, is passed through). Lazy on both ends:
        at most threads + 1 batches are being decoded at any time, whatever the number of paths."""
        return self._stream(paths, top_k=top_k, batch_size=batch_size, threads=threads)

    # ---- the pipeline: decode batches in the ordered thread window, run each as it comes -----------------

    def _stream(self, items: Iterable[Any], *, top_k: int, batch_size: int, threads: int | None) -> Iterator[Result]:
        if not 1 <= batch_size <= MAX_BATCH_SIZE:
            raise CifarkitError(f"batch size must be 1 to {MAX_BATCH_SIZE}, got {batch_size}")
        threads = default_threads() if threads is None else threads
        if not 0 <= threads <= MAX_THREADS:
            raise CifarkitError(f"threads must be 0 (decode in the calling thread) to {MAX_THREADS}, got {threads}")
        h, w = self.image_size
        window = (threads + 1) * batch_size * h * w * 3
        if window > MAX_WINDOW_BYTES:
            raise CifarkitError(
                f"batch size {batch_size} x {threads + 1} batches in flight x {h}x{w} pixels would hold "
                f"{window / 2**20:,.0f} MiB of decoded images (limit {MAX_WINDOW_BYTES / 2**20:,.0f}); lower the "
                "batch size or the threads"
            )
        for sources, pixels, failed in ordered_map(self._decode, chunked(items, batch_size), threads):
            yield from self._finish(sources, pixels, failed, top_k)

    def _decode(self, chunk: tuple[int, list[Any]]) -> tuple[list[str], np.ndarray, dict[int, Failure]]:
        start, items = chunk
        pixels = np.empty((len(items), *self.image_size, 3), np.uint8)  # [B, H, W, 3]
        sources: list[str] = []
        failed: dict[int, Failure] = {}
        for j, item in enumerate(items):
            if isinstance(item, Failure):
                sources.append(item.source)
                failed[j] = item
                continue
            if isinstance(item, Blob):
                src = item.source
            else:
                src = os.fspath(item) if isinstance(item, (str, os.PathLike)) else _item_name(start + j, item)
            sources.append(src)
            try:
                pixels[j] = self.pixels(item, src)
            except ImageError as exc:
                failed[j] = Failure(src, str(exc))
        return sources, pixels, failed

    def _finish(
        self, sources: list[str], pixels: np.ndarray, failed: dict[int, Failure], top_k: int
    ) -> Iterator[Result]:
        if not failed:
            yield from self._predictions(*self._run(pixels), sources, top_k)
            return
        ok = [j for j in range(len(sources)) if j not in failed]
        preds = iter(self._predictions(*self._run(pixels[ok]), [sources[j] for j in ok], top_k) if ok else [])
        for j in range(len(sources)):
            yield failed[j] if j in failed else next(preds)


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------


def _is_single(items: Any) -> bool:
    if isinstance(items, (str, bytes, os.PathLike)):
        return True
    if isinstance(items, np.ndarray):
        return items.ndim != 4
    return is_pil_image(items)


def _item_name(i: int, item: Any) -> str:
    name = getattr(item, "filename", "")
    if isinstance(name, str) and name:
        return name
    return f"<array {i}>" if isinstance(item, np.ndarray) else f"<image {i}>"
