"""Inference stage: an exported model.onnx -> predictions, with onnxruntime, numpy and Pillow only.

torch is never imported here, directly or through another cifarkit module (a test checks it): an app that
embeds the classifier needs neither torch nor the training code. Labels, image size and the resize rule come
from the model's own metadata (cifarkit.spec.ArtifactMeta), so one file is all an app ships.

    from cifarkit.infer import Classifier
    clf = Classifier.from_file("model.onnx")            # load once (~10 ms), reuse
    [pred] = clf.predict(["cat.jpg"])                   # paths, PIL images or uint8 arrays
    print(pred.label, pred.probability, pred.top_k)
    probs = clf.run(batch)[1]                           # uint8 [N, 32, 32, 3] -> float32 [N, 10]
    for r in clf.predict_paths(iter_image_files(["photos/"])):   # streams, flat memory
        print(r.source, r.label if isinstance(r, Prediction) else r.message)

The streaming path decodes in a thread pool (Pillow releases the GIL while it decodes) with a bounded window
of batches in flight, overlapping decoding with onnxruntime; results come back in input order.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from cifarkit.errors import CifarkitError, first_line
from cifarkit.preprocess import IMAGE_EXTENSIONS, ImageError, load_image, preprocess
from cifarkit.spec import INPUT_NAME, OUTPUT_NAMES, ArtifactMeta

# Images per onnxruntime call and per decoding task. Measured on the 2 shared cores of the development machine
# (5,000 real test JPEGs, 3 decoding threads): 310-330 us of CPU per image at batch 16-32, 175-235 us at 64-512,
# where the differences were within the noise. 128 rather than 512: a short run still splits into enough
# batches to keep every decoding thread busy, and the first rows come out sooner.
DEFAULT_BATCH_SIZE = 128
MODEL_ENV = "CIFARKIT_MODEL"  # where the CLI looks for a model when --model is not given
DEFAULT_MODEL_NAME = "model.onnx"


def default_threads() -> int:
    """Decoding threads: one per core plus one, so that a thread blocked on file I/O leaves no core idle.
    Pillow's JPEG header parsing holds the GIL, so more threads than that gain nothing (decoding alone, 32x32
    JPEGs on 2 cores: 1 thread 6,700, 2 threads 8,500, 3 threads 9,300, 4 threads 9,100 images/s)."""
    return min(8, (os.cpu_count() or 1) + 1)


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


@dataclass(frozen=True, slots=True)
class Failure:
    """An input that could not be classified (unreadable file, missing path, symlink loop, ...)."""

    source: str
    message: str  # one line that names the file and the reason


Result = Prediction | Failure


# ---------------------------------------------------------------------------------------------------------
# Finding images
# ---------------------------------------------------------------------------------------------------------


def iter_image_files(
    paths: Iterable[str | os.PathLike[str]], extensions: frozenset[str] = IMAGE_EXTENSIONS
) -> Iterator[str | Failure]:
    """Files and folders -> image file paths, lazily, in a stable order; problems come out as Failures in place.

    A file named explicitly is yielded whatever its extension (the decoder will say if it is not an image).
    A folder is walked recursively with os.scandir: its image files by sorted name (extension matched
    case-insensitively), then its sub-folders by sorted name. Hidden entries (".name") are skipped, symlinks
    are followed, and a symlink back to a folder being walked is reported once instead of recursed into.
    Only one folder's names are held at a time per level, so a tree of a million images streams."""
    for raw in paths:
        path = os.fspath(raw)
        try:
            st = os.stat(path)
        except OSError as exc:
            yield Failure(path, f"{path}: {_stat_reason(path, exc)}")
            continue
        if not stat.S_ISDIR(st.st_mode):
            yield path
            continue
        found = 0
        for item in _walk_folder(path, st, extensions):
            found += isinstance(item, str)
            yield item
        if not found:
            yield Failure(path, f"{path}: no image files found (looked for {', '.join(sorted(extensions))})")


def _walk_folder(root: str, root_stat: os.stat_result, extensions: frozenset[str]) -> Iterator[str | Failure]:
    # Depth-first with an explicit stack (no recursion limit on deep trees). Each frame: the folder's
    # remaining sub-folders (sorted, consumed from the end) and the (device, inode) of its ancestors.
    stack: list[tuple[list[str], frozenset[tuple[int, int]]]] = []
    pending: list[tuple[str, os.stat_result, frozenset[tuple[int, int]]]] = [(root, root_stat, frozenset())]
    while pending or stack:
        if pending:
            folder, st, ancestors = pending.pop()
            key = (st.st_dev, st.st_ino)
            if key in ancestors:
                yield Failure(folder, f"{folder}: symlink loop (leads back to a folder above it), skipped")
                continue
            ancestors = ancestors | {key}
            files, subdirs, problems = _list_folder(folder, extensions)
            yield from problems
            for name in files:
                yield os.path.join(folder, name)
            subdirs.reverse()  # popped from the end: sorted order
            stack.append(([os.path.join(folder, d) for d in subdirs], ancestors))
            continue
        subdirs, ancestors = stack[-1]
        if not subdirs:
            stack.pop()
            continue
        sub = subdirs.pop()
        try:
            pending.append((sub, os.stat(sub), ancestors))
        except OSError as exc:
            yield Failure(sub, f"{sub}: {_stat_reason(sub, exc)}")


def _list_folder(folder: str, extensions: frozenset[str]) -> tuple[list[str], list[str], list[Failure]]:
    """(image file names, sub-folder names, problems) of one folder, names sorted."""
    files: list[str] = []
    subdirs: list[str] = []
    problems: list[Failure] = []
    try:
        with os.scandir(folder) as it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                try:
                    is_dir = entry.is_dir()  # follows symlinks; no extra system call for plain entries
                except OSError as exc:
                    if os.path.splitext(entry.name)[1].lower() in extensions or exc.errno == errno.ELOOP:
                        problems.append(Failure(entry.path, f"{entry.path}: {_stat_reason(entry.path, exc)}"))
                    continue
                if is_dir:
                    subdirs.append(entry.name)
                elif os.path.splitext(entry.name)[1].lower() in extensions:
                    files.append(entry.name)
    except OSError as exc:
        problems.append(Failure(folder, f"{folder}: cannot list folder ({exc.strerror or exc})"))
    files.sort()
    subdirs.sort()
    return files, subdirs, problems


def _stat_reason(path: str, exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "symlink loop"
    if isinstance(exc, FileNotFoundError):
        return "broken symlink" if os.path.islink(path) else "no such file or folder"
    if isinstance(exc, PermissionError):
        return "permission denied"
    return exc.strerror or str(exc)


# ---------------------------------------------------------------------------------------------------------
# The classifier
# ---------------------------------------------------------------------------------------------------------


class Classifier:
    """An exported cifarkit model in an onnxruntime session, with its labels and preprocessing rule.

    Thread-safe for concurrent calls (onnxruntime sessions are); build it once and reuse it."""

    def __init__(self, session: Any, meta: ArtifactMeta, *, source: str = "<model>") -> None:
        self.session = session
        self.meta = meta
        self.source = source
        self.labels: tuple[str, ...] = tuple(meta.class_names)
        self.image_size: tuple[int, int] = (int(meta.image_size[0]), int(meta.image_size[1]))  # (H, W)
        self._outputs = [o.name for o in session.get_outputs()]
        self._check_contract()

    # ---- loading ---------------------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, intra_op_threads: int | None = None) -> Classifier:
        """Load model.onnx (or a folder holding one). Raises CifarkitError if it is missing, not ONNX, or
        not a cifarkit export (input `images` uint8 [N, H, W, 3] and cifarkit metadata)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, DEFAULT_MODEL_NAME)
        if not os.path.exists(path):
            raise CifarkitError(f"model {path} does not exist")
        try:
            with open(path, "rb") as f:
                head = f.read(4)
        except OSError as exc:
            raise CifarkitError(f"model {path}: cannot read ({exc.strerror or exc})") from None
        if head.startswith(b"PK"):
            raise CifarkitError(
                f"model {path} is a zip archive (a TorchScript model.pt?); cifar-infer runs the ONNX export, model.onnx"
            )
        import onnxruntime as ort

        try:
            session = ort.InferenceSession(path, sess_options=_session_options(intra_op_threads), providers=_PROVIDERS)
        except Exception as exc:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...) for bad files
            raise CifarkitError(f"model {path} is not a valid ONNX model ({first_line(exc)})") from None
        props = dict(session.get_modelmeta().custom_metadata_map)
        if "schema" not in props or "class_names" not in props:
            raise CifarkitError(
                f"model {path} has no cifarkit metadata (class names, image size, resize rule); "
                "export it with cifar-export"
            )
        try:
            meta = ArtifactMeta.from_props(props)
        except (ValueError, TypeError) as exc:
            raise CifarkitError(f"model {path} has bad cifarkit metadata: {exc}") from None
        return cls(session, meta, source=path)

    def _check_contract(self) -> None:
        h, w = self.image_size
        want = f"one input '{INPUT_NAME}' uint8 [N, {h}, {w}, 3]"
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise CifarkitError(f"model {self.source} has {len(inputs)} inputs, expected {want}")
        arg = inputs[0]
        shape = list(arg.shape)
        fixed = [d for d in shape[1:] if isinstance(d, int)]
        if (
            arg.name != INPUT_NAME
            or arg.type != "tensor(uint8)"
            or len(shape) != 4
            or (len(fixed) == 3 and fixed != [h, w, 3])
        ):
            raise CifarkitError(
                f"model {self.source} takes input {arg.name!r} {arg.type} {shape}, expected {want} "
                "(is it a cifarkit export?)"
            )
        if OUTPUT_NAMES[0] not in self._outputs:
            raise CifarkitError(f"model {self.source} has no {OUTPUT_NAMES[0]!r} output (outputs: {self._outputs})")
        dims = {o.name: o.shape for o in self.session.get_outputs()}
        classes = dims[OUTPUT_NAMES[0]][-1] if dims[OUTPUT_NAMES[0]] else None
        if isinstance(classes, int) and classes != len(self.labels):
            raise CifarkitError(
                f"model {self.source} outputs {classes} classes but its metadata names {len(self.labels)}"
            )

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
        batch = self.check_batch(batch)
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

    def check_batch(self, batch: np.ndarray) -> np.ndarray:
        """The batch as a C-contiguous uint8 [N, H, W, 3] array, or a CifarkitError saying what is wrong."""
        h, w = self.image_size
        if not isinstance(batch, np.ndarray) or batch.dtype != np.uint8 or batch.shape[1:] != (h, w, 3):
            got = f"{batch.dtype} {list(batch.shape)}" if isinstance(batch, np.ndarray) else type(batch).__name__
            raise CifarkitError(
                f"expected a uint8 [N, {h}, {w}, 3] RGB batch, got {got}; "
                "use predict() for images of other sizes or types"
            )
        return np.ascontiguousarray(batch)

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if OUTPUT_NAMES[1] in self._outputs:
            logits, probs = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: batch})
        else:  # a model with logits only: the softmax here is the graph's
            (logits,) = self.session.run([OUTPUT_NAMES[0]], {INPUT_NAME: batch})
            e = np.exp(logits - logits.max(axis=1, keepdims=True))
            probs = e / e.sum(axis=1, keepdims=True)
        return logits, probs

    def predict_batch(
        self, batch: np.ndarray, *, top_k: int = 1, sources: Iterable[str] | None = None
    ) -> list[Prediction]:
        """uint8 [N, H, W, 3] at the model's size -> N Predictions (sources default to "<array i>")."""
        logits, probs = self.run(batch)
        names = list(sources) if sources is not None else [f"<array {i}>" for i in range(len(probs))]
        if len(names) != len(probs):
            raise CifarkitError(f"got {len(names)} sources for a batch of {len(probs)} images")
        return self._predictions(logits, probs, names, top_k)

    def _predictions(self, logits: np.ndarray, probs: np.ndarray, sources: list[str], top_k: int) -> list[Prediction]:
        k = max(1, min(int(top_k), len(self.labels)))
        # Rank by logits rather than probabilities: softmax can round two close logits to one probability.
        # A stable sort on -logits breaks ties by the lower index, as argmax does.
        order = np.argsort(-logits, axis=1, kind="stable")[:, :k]  # [N, k] class indices
        top_p = np.take_along_axis(probs, order, axis=1).tolist()  # [N, k] probabilities
        labels = self.labels
        out = []
        for src, idx, ps in zip(sources, order.tolist(), top_p, strict=True):
            ranked = tuple((labels[i], p) for i, p in zip(idx, ps, strict=True))
            out.append(Prediction(src, labels[idx[0]], idx[0], ps[0], ranked))
        return out

    # ---- images in, predictions out --------------------------------------------------------------------

    def preprocess(self, item: Any, source: str | None = None) -> np.ndarray:
        """A path, PIL image or uint8 array -> uint8 [H, W, 3] at the model's size, by the model's resize rule.
        Raises ImageError (naming `source`) for an unreadable image."""
        size, mode, filt = self.image_size, self.meta.resize_mode, self.meta.resize_filter
        if isinstance(item, (str, os.PathLike)):
            return load_image(item, size, mode, filt)
        src = source or _item_name(0, item)
        if isinstance(item, np.ndarray):
            return self._array_pixels(item, src)
        if isinstance(item, Image.Image):
            try:
                return preprocess(item, size, mode, filt)
            except (OSError, ValueError, SyntaxError, EOFError) as exc:
                raise ImageError(f"{src}: cannot decode image ({first_line(exc)})") from None
        raise TypeError(f"expected a path, a PIL image or a uint8 array, got {type(item).__name__}")

    def _array_pixels(self, a: np.ndarray, src: str) -> np.ndarray:
        h, w = self.image_size
        if a.dtype != np.uint8:
            raise ImageError(f"{src}: array dtype is {a.dtype}, expected uint8 pixels (0..255)")
        if a.shape == (h, w, 3):
            return np.ascontiguousarray(a)  # already the model's size: passed through untouched
        if a.ndim == 3 and a.shape[2] == 1:
            a = a[:, :, 0]
        if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))) or 0 in a.shape:
            raise ImageError(f"{src}: array shape {list(a.shape)}, expected [H, W], [H, W, 3] or [H, W, 4]")
        im = Image.fromarray(np.ascontiguousarray(a))
        return preprocess(im, self.image_size, self.meta.resize_mode, self.meta.resize_filter)

    def predict(
        self,
        items: Iterable[Any] | Any,
        *,
        top_k: int = 1,
        batch_size: int = DEFAULT_BATCH_SIZE,
        threads: int | None = None,
    ) -> list[Prediction]:
        """Classify paths, PIL images and uint8 arrays (any size: the model's resize rule applies), in order.
        One item (a path, an image, an [H, W, 3] array) is also accepted; a uint8 [N, H, W, 3] array is a batch.
        Raises ImageError for the first item that cannot be read; use predict_paths() to carry on past them."""
        if isinstance(items, np.ndarray) and items.ndim == 4:
            return self.predict_batch(items, top_k=top_k)
        if _is_single(items):
            items = [items]
        out: list[Prediction] = []
        for r in self._stream(items, top_k=top_k, batch_size=batch_size, threads=threads):
            if isinstance(r, Failure):
                raise ImageError(r.message)
            out.append(r)
        return out

    def predict_one(self, item: Any, *, top_k: int = 1) -> Prediction:
        """Classify one path, PIL image or uint8 array."""
        return self.predict([item], top_k=top_k, threads=0)[0]

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

    # ---- the pipeline ----------------------------------------------------------------------------------

    def _stream(self, items: Iterable[Any], *, top_k: int, batch_size: int, threads: int | None) -> Iterator[Result]:
        if batch_size < 1:
            raise CifarkitError(f"batch size must be at least 1, got {batch_size}")
        threads = default_threads() if threads is None else threads
        if threads < 0:
            raise CifarkitError(f"threads must be 0 (decode in the calling thread) or more, got {threads}")
        h, w = self.image_size

        def decode(start: int, chunk: list[Any]) -> tuple[list[str], np.ndarray, dict[int, Failure]]:
            pixels = np.empty((len(chunk), h, w, 3), np.uint8)  # [B, H, W, 3]
            sources: list[str] = []
            failed: dict[int, Failure] = {}
            for j, item in enumerate(chunk):
                if isinstance(item, Failure):
                    sources.append(item.source)
                    failed[j] = item
                    continue
                src = os.fspath(item) if isinstance(item, (str, os.PathLike)) else _item_name(start + j, item)
                sources.append(src)
                try:
                    pixels[j] = self.preprocess(item, src)
                except ImageError as exc:
                    failed[j] = Failure(src, str(exc))
            return sources, pixels, failed

        chunks = _chunks(items, batch_size)
        if threads == 0:
            for start, chunk in chunks:
                yield from self._finish(*decode(start, chunk), top_k)
            return
        # threads + 1 batches in flight: every decoding thread has one, and the next is ready for onnxruntime
        # while this thread runs the current one. Bounds memory to (threads + 1) x batch_size decoded images.
        pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cifarkit-decode")
        window: deque = deque()
        try:
            for start, chunk in chunks:
                window.append(pool.submit(decode, start, chunk))
                if len(window) > threads:
                    yield from self._finish(*window.popleft().result(), top_k)
            while window:
                yield from self._finish(*window.popleft().result(), top_k)
        finally:  # also on an early break or an exception in the caller: stop decoding what nobody will read
            pool.shutdown(wait=True, cancel_futures=True)

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

_PROVIDERS = ["CPUExecutionProvider"]


def _session_options(intra_op_threads: int | None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: onnxruntime's warnings are not the user's business
    # onnxruntime's default is one spinning thread per core. Here at most 2, and sleeping rather than spinning
    # between calls: the model costs ~70 us of CPU per image (5.7 MFLOP), about as much as decoding it, and
    # spinning threads would take the cores the decoding threads need (measured end to end on 5,000 JPEGs:
    # 215 us of CPU per image without spinning, 270 us with it, and 10-30 % fewer images/s).
    opts.intra_op_num_threads = intra_op_threads if intra_op_threads is not None else min(2, os.cpu_count() or 1)
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def _chunks(items: Iterable[Any], size: int) -> Iterator[tuple[int, list[Any]]]:
    """(offset, list of up to `size` items), lazily."""
    chunk: list[Any] = []
    start = 0
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield start, chunk
            start += size
            chunk = []
    if chunk:
        yield start, chunk


def _is_single(items: Any) -> bool:
    if isinstance(items, (str, bytes, os.PathLike)):
        return True
    if isinstance(items, np.ndarray):
        return items.ndim != 4
    return isinstance(items, Image.Image)


def _item_name(i: int, item: Any) -> str:
    name = getattr(item, "filename", "")
    if isinstance(name, str) and name:
        return name
    return f"<array {i}>" if isinstance(item, np.ndarray) else f"<image {i}>"


def resolve_model_path(model: str | None) -> str:
    """The --model rule: the given path, else $CIFARKIT_MODEL, else model.onnx in the current folder."""
    if model:
        return model
    env = os.environ.get(MODEL_ENV)
    if env:
        return env
    if os.path.exists(DEFAULT_MODEL_NAME):
        return DEFAULT_MODEL_NAME
    raise CifarkitError(
        f"no model: pass --model MODEL.onnx, set ${MODEL_ENV}, or run in a folder holding {DEFAULT_MODEL_NAME} "
        "(make one with cifar-export CHECKPOINT --out FOLDER)"
    )


__all__ = [
    "DEFAULT_BATCH_SIZE",
    "Classifier",
    "Failure",
    "Prediction",
    "Result",
    "default_threads",
    "iter_image_files",
    "resolve_model_path",
]
