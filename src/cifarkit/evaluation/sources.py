"""What an evaluation reads: a model of any of three kinds behind one interface (torch imported only for the
two that need it), and labelled images from any source, listed, never decoded up front."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cifarkit import batches_py
from cifarkit.data import SAMPLE_SOURCE, check_labels, sample_root, torchvision_folder
from cifarkit.errors import CifarkitError, first_line
from cifarkit.evaluation.config import SPLITS
from cifarkit.files import IMAGE_EXTENSIONS, Failure, list_folder
from cifarkit.infer.classifier import Classifier
from cifarkit.infer.config import DEFAULT_LOAD_TIMEOUT_S
from cifarkit.spec import CIFAR10_CLASSES, ArtifactMeta

# ---------------------------------------------------------------------------------------------------------
# Models: three kinds behind one interface; torch is imported only for the two that need it
# ---------------------------------------------------------------------------------------------------------

Runner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # uint8 [N, H, W, 3] -> logits, probs [N, C]


@dataclass(frozen=True)
class LoadedModel:
    path: str
    kind: str  # "onnx" | "torchscript" | "checkpoint"
    meta: ArtifactMeta
    run: Runner = field(repr=False)

    @property
    def rule(self) -> tuple[tuple[int, int], str, str]:
        """How an image reaches this model: (size (H, W), resize mode, resize filter)."""
        h, w = self.meta.image_size
        return (int(h), int(w)), self.meta.resize_mode, self.meta.resize_filter


def model_kind(path: str | os.PathLike[str]) -> str:
    """The kind of model file, "onnx", "torchscript" or "checkpoint", from its content (never its name). A
    folder or anything that is not a zip archive is taken as ONNX, whose loader names what is wrong with it."""
    path = os.fspath(path)
    if not os.path.isfile(path) or not zipfile.is_zipfile(path):
        return "onnx"
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (OSError, zipfile.BadZipFile) as exc:
        raise CifarkitError(f"model {path} is a damaged zip archive ({first_line(exc)})") from None
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        return "torchscript"  # torch.jit.save's layout: code/, constants.pkl, extra/model.json
    if any(n.endswith("/data.pkl") for n in names):
        return "checkpoint"  # torch.save's layout: data.pkl and data/<storage>
    raise CifarkitError(f"model {path} is a zip archive, but not a TorchScript model.pt or a checkpoint.pt")


def open_model(
    path: str | os.PathLike[str], *, intra_op_threads: int | None = None, load_timeout: float = DEFAULT_LOAD_TIMEOUT_S
) -> LoadedModel:
    """A cifarkit model.onnx (or a folder holding one), model.pt or checkpoint.pt, ready to run on uint8
    batches. Raises CifarkitError naming the file when it is missing or not a cifarkit artifact."""
    kind = model_kind(path)
    if kind == "onnx":
        clf = Classifier.from_file(path, intra_op_threads=intra_op_threads, load_timeout=load_timeout)
        return LoadedModel(clf.source, "onnx", clf.meta, clf.run)
    return _open_torchscript(os.fspath(path)) if kind == "torchscript" else _open_checkpoint(os.fspath(path))


def _open_torchscript(path: str) -> LoadedModel:
    import torch

    from cifarkit.export import load_torchscript

    try:
        module, meta = load_torchscript(path)
    except Exception as exc:  # torch.jit and json raise their own types for foreign archives
        raise CifarkitError(f"model {path} is not a cifarkit TorchScript export ({first_line(exc)})") from None

    def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            logits, probs = module(torch.from_numpy(np.ascontiguousarray(batch)))
        return logits.numpy(), probs.numpy()

    return LoadedModel(path, "torchscript", meta, run)


def _open_checkpoint(path: str) -> LoadedModel:
    from cifarkit.model.checkpoint import Checkpoint

    ckpt = Checkpoint.load(path)
    model = ckpt.deployed()  # eager, fp32, CPU: the module every artifact contains
    return LoadedModel(path, "checkpoint", ckpt.artifact, lambda b: model.run_numpy(b, batch_size=len(b)))


def column_order(a: LoadedModel, b: LoadedModel) -> np.ndarray | None:
    """Indices that put b's output columns in a's class order (None when already equal); a CifarkitError
    when the two models do not name the same classes."""
    na, nb = tuple(a.meta.class_names), tuple(b.meta.class_names)
    if na == nb:
        return None
    if sorted(na) != sorted(nb) or len(set(na)) != len(na):
        raise CifarkitError(
            f"MODEL_B {b.path} has classes {', '.join(nb)}; MODEL {a.path} has {', '.join(na)}: "
            "two models are compared only on the same classes"
        )
    return np.array([nb.index(name) for name in na])


# ---------------------------------------------------------------------------------------------------------
# Labelled images: a source and split -> (name, path or pixels, class index), listed, never decoded up front
# ---------------------------------------------------------------------------------------------------------


@dataclass
class LabelledImages:
    source: str  # as given: a folder, "torchvision" or "sample"
    location: str  # the folder actually read
    kind: str  # "imagefolder" | "class-folders" | "batches-py" | "torchvision" | "sample"
    split: str | None  # the split read; None for a folder of class sub-folders
    classes: tuple[str, ...]  # the model's classes that have images here, in the model's order
    count: int  # images listed (those that will fail to decode included)
    notes: tuple[str, ...] = ()  # what was left out, and why
    paths: list[str | Failure] | None = field(default=None, repr=False)  # folder sources
    pixels: np.ndarray | None = field(default=None, repr=False)  # array sources: uint8 [N, H, W, 3]
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)  # int64 [N], model index

    def items(self) -> Iterator[tuple[str, Any, int]]:
        """(name, path | uint8 pixels | Failure, class index), in a stable order."""
        labels = self.labels.tolist()
        if self.pixels is not None:
            for i, label in enumerate(labels):
                yield f"{self.split}[{i}]", self.pixels[i], label
            return
        for item, label in zip(self.paths or [], labels, strict=True):
            yield (item.source if isinstance(item, Failure) else item), item, label

    def to_dict(self) -> dict[str, Any]:
        keys = ("source", "location", "kind", "split", "classes", "count", "notes")
        return {k: list(v) if isinstance(v, tuple) else v for k, v in ((k, getattr(self, k)) for k in keys)}


def open_labelled(
    source: str,
    class_names: tuple[str, ...],
    *,
    split: str = "test",
    skip_unknown: bool = False,
    data_dir: str | os.PathLike[str] | None = None,
) -> LabelledImages:
    """List the labelled images of `source` (what cifar-train accepts, its `split`; or a folder of class
    sub-folders), matching class names to the model's. Raises CifarkitError for a source that is missing,
    empty or holds a class the model does not know (unless skip_unknown)."""
    if split not in SPLITS:
        raise CifarkitError(f"--split must be test or train, got {split!r}")
    if source in ("torchvision", "download"):
        return _from_batches(source, torchvision_folder(data_dir), split, class_names, skip_unknown, "torchvision")
    if source == SAMPLE_SOURCE:
        root = sample_root(data_dir)
        return _from_folders(source, root / split, "sample", split, class_names, skip_unknown)
    root = Path(source).expanduser()
    if not root.exists():
        raise CifarkitError(
            f"--data: {root} does not exist (expected an ImageFolder root with train/ and test/, a folder of "
            "class sub-folders, or an extracted cifar-10-batches-py folder)"
        )
    if not root.is_dir():
        raise CifarkitError(f"--data: {root} is not a folder")
    folder = batches_py.find_folder(root)
    if folder is not None:
        return _from_batches(source, folder, split, class_names, skip_unknown, "batches-py")
    if _is_imagefolder_root(root, split):
        return _from_folders(source, root / split, "imagefolder", split, class_names, skip_unknown)
    return _from_folders(source, root, "class-folders", None, class_names, skip_unknown)


def _is_imagefolder_root(root: Path, split: str) -> bool:
    """An ImageFolder root: train/ and test/, or one of them alone with nothing beside it (a copy of the test
    split only), when that one is `split`."""
    _, folders, _ = list_folder(root)
    return set(folders) == set(SPLITS) or (folders == [split] and split in SPLITS)


def _unknown(where: str, class_names: tuple[str, ...]) -> CifarkitError:
    return CifarkitError(
        f"--data: {where} is not one of the model's classes ({', '.join(class_names)}); "
        "rename it, or pass --skip-unknown to leave it out"
    )


def _from_batches(
    source: str, folder: Path, split: str, class_names: tuple[str, ...], skip_unknown: bool, kind: str
) -> LabelledImages:
    """The split of a cifar-10-batches-py folder: only its own batch files are read."""
    x, y = batches_py.read_split(folder, split)
    classes = batches_py.read_classes(folder, CIFAR10_CLASSES)
    check_labels(folder, classes, y)
    index = {name: i for i, name in enumerate(class_names)}
    mapping = np.full(len(classes), -1, np.int64)
    notes = []
    for i, name in enumerate(classes):
        if name in index:
            mapping[i] = index[name]
        elif skip_unknown:
            notes.append(f"class {name!r} ({int((y == i).sum()):,} images) is not one of the model's: left out")
        else:
            raise _unknown(f"class {name!r} of {folder}", class_names)
    labels = mapping[y]
    keep = labels >= 0
    if not keep.all():
        x, labels = x[keep], labels[keep]
    if not len(labels):
        raise CifarkitError(f"--data: {folder} has no {split} images of the model's classes")
    present = tuple(c for i, c in enumerate(class_names) if (labels == i).any())
    return LabelledImages(source, str(folder), kind, split, present, len(labels), tuple(notes), pixels=x, labels=labels)


def _from_folders(
    source: str, folder: Path, kind: str, split: str | None, class_names: tuple[str, ...], skip_unknown: bool
) -> LabelledImages:
    loose, subdirs, problems = list_folder(folder)
    if problems and not subdirs:
        raise CifarkitError(f"--data: {problems[0].message}")
    if not subdirs:
        what = "is empty" if not loose else f"holds {len(loose):,} images but no class sub-folders"
        raise CifarkitError(
            f"--data: {folder} {what} (expected one sub-folder per class, named after the model's classes)"
        )
    index = {name: i for i, name in enumerate(class_names)}
    notes = [f"{len(loose):,} image(s) directly in {folder} have no class folder: left out"] if loose else []
    paths: list[str | Failure] = []
    labels: list[int] = []
    for name in subdirs:
        if name not in index:
            if not skip_unknown:
                raise _unknown(f"class folder {folder / name}", class_names)
            notes.append(f"class folder {folder / name} is not one of the model's classes: left out")
            continue
        files, nested, unreadable = list_folder(folder / name)
        if not files and not unreadable:
            notes.append(f"class folder {folder / name} has no images")
        if nested:  # the training data loader's rule too: a class folder's own files, not its sub-folders'
            notes.append(f"{len(nested):,} sub-folder(s) of class folder {folder / name} are not read")
        paths.extend(unreadable)  # counted and named as failed inputs, like unreadable images
        paths.extend(str(folder / name / f) for f in files)
        labels.extend([index[name]] * (len(unreadable) + len(files)))
    if not paths:
        raise CifarkitError(
            f"--data: no images in the class folders of {folder} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    y = np.array(labels, np.int64)
    present = tuple(c for i, c in enumerate(class_names) if (y == i).any())
    return LabelledImages(source, str(folder), kind, split, present, len(paths), tuple(notes), paths=paths, labels=y)
