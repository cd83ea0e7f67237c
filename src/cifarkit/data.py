"""CIFAR-10 sources -> uint8 arrays, decoded once and cached. numpy and Pillow only: torch is imported
only to download through torchvision (cifarkit.train.batches serves the arrays to the training device).

Four sources, chosen by `load_data(source)`:
  "torchvision"        torchvision's CIFAR-10, downloaded on first use into `data_dir`
  "sample"             the small real CIFAR-10 sample bundled with cifarkit (offline demos; see sample_root)
  PATH/                an extracted `cifar-10-batches-py` folder (or a folder holding one)
  PATH/                an ImageFolder root with train/<class>/* and test/<class>/* (any >= 2 classes)

    data = load_data("/data/cifar10-jpeg")          # CifarData, uint8 [N, 32, 32, 3] arrays
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cifarkit import batches_py
from cifarkit.atomic import staged_folder
from cifarkit.errors import CifarkitError, first_line
from cifarkit.files import (
    IMAGE_EXTENSIONS,
    chunked,
    default_threads,
    list_folder,
    ordered_map,
)
from cifarkit.preprocess import ImageError, load_image
from cifarkit.spec import CIFAR10_CLASSES, IMAGE_SIZE, RESIZE_FILTER, RESIZE_MODE

CACHE_VERSION = 2  # bump when the cached array layout or the preprocessing rule changes (2: .npy files, mapped)
CACHE_ARRAYS = ("train_x", "train_y", "test_x", "test_y")
DEFAULT_SOURCE = "torchvision"
Progress = Callable[[int, int], None]  # (done, total)


def default_data_dir() -> Path:
    """Where downloads and decoded caches live: $CIFARKIT_CACHE, else ~/.cache/cifarkit."""
    env = os.environ.get("CIFARKIT_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "cifarkit"


@dataclass
class CifarData:
    train_x: np.ndarray  # uint8 [N, H, W, 3] RGB
    train_y: np.ndarray  # int64 [N]
    test_x: np.ndarray  # uint8 [M, H, W, 3] RGB
    test_y: np.ndarray  # int64 [M]
    classes: tuple[str, ...]
    source: str  # human-readable description of where the data came from
    kind: str  # "torchvision" | "batches-py" | "imagefolder"
    load_seconds: float = 0.0
    from_cache: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# ---------------------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------------------


def load_data(
    source: str = DEFAULT_SOURCE,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    threads: int | None = None,
    progress: Progress | None = None,
) -> CifarData:
    """Load a data set from `source` (see module docstring). Raises CifarkitError on bad input."""
    t0 = time.perf_counter()
    cache_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    if source in ("torchvision", "download"):
        data = _load_torchvision(cache_dir)
    elif source == SAMPLE_SOURCE:
        data = _load_imagefolder(sample_root(cache_dir), cache_dir, threads=threads, progress=progress)
    else:
        root = Path(source).expanduser()
        if not root.exists():
            raise CifarkitError(
                f"--data: {root} does not exist (expected an ImageFolder root with train/ and "
                "test/, or an extracted cifar-10-batches-py folder)"
            )
        if not root.is_dir():
            raise CifarkitError(f"--data: {root} is not a folder")
        batches = batches_py.find_folder(root)
        if batches is not None:
            data = _load_batches_py(batches)
        elif (root / "train").is_dir() and (root / "test").is_dir():
            data = _load_imagefolder(root, cache_dir, threads=threads, progress=progress)
        elif not any(root.iterdir()):
            raise CifarkitError(
                f"--data: {root} is empty (expected train/ and test/ class folders, or cifar-10-batches-py)"
            )
        else:
            raise CifarkitError(
                f"--data: {root} has no train/ and test/ folders and no cifar-10-batches-py "
                "data (expected an ImageFolder root or an extracted CIFAR-10 python folder)"
            )
    data.load_seconds = time.perf_counter() - t0
    return data


# ---- the bundled sample ----------------------------------------------------------------------------------

SAMPLE_SOURCE = "sample"
SAMPLE_ARCHIVE = "cifar10-sample.tar.gz"  # in cifarkit/sample/, with a README that says what it holds


def sample_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The real CIFAR-10 sample shipped in the package (800 train and 200 test JPEGs a class, see
    cifarkit/sample/README.md), extracted once into `cache_dir` (default: default_data_dir()) under a name
    keyed by the archive's SHA256: an ImageFolder root with train/ and test/. Extraction goes to a
    temporary folder that is renamed into place, so an interrupted one is never mistaken for the sample."""
    import shutil
    import tarfile
    import tempfile
    from importlib.resources import as_file, files

    with as_file(files("cifarkit") / "sample" / SAMPLE_ARCHIVE) as archive:
        if not archive.is_file():
            raise CifarkitError(f"--data sample: {archive} is missing from this installation of cifarkit")
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()[:16]
        dest = Path(cache_dir if cache_dir is not None else default_data_dir()) / f"sample-{digest}"
        if (dest / "train").is_dir() and (dest / "test").is_dir():
            return dest
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.")
            try:
                with tarfile.open(archive, "r:gz") as tar:
                    tar.extractall(tmp, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
                os.replace(tmp, dest)  # fails if another process got there first: theirs is as good
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        except (OSError, tarfile.TarError) as exc:
            if not (dest / "test").is_dir():
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)
                raise CifarkitError(
                    f"--data sample: cannot extract {archive.name} into {dest.parent} ({why}); "
                    "set CIFARKIT_CACHE to a writable folder"
                ) from None
    return dest


def _load_torchvision(cache_dir: Path) -> CifarData:
    data = _load_batches_py(torchvision_folder(cache_dir))
    data.kind = "torchvision"
    return data


def torchvision_folder(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cifar-10-batches-py folder of torchvision's CIFAR-10 in `cache_dir` (default: default_data_dir()),
    downloaded first if it is not there."""
    root = Path(cache_dir if cache_dir is not None else default_data_dir()) / "torchvision"
    existing = batches_py.find_folder(root) if root.is_dir() else None
    if existing is None:
        try:
            from torchvision.datasets import CIFAR10

            CIFAR10(str(root), train=True, download=True)
        except Exception as exc:  # network errors come as URLError, OSError, RuntimeError, ...
            raise CifarkitError(
                f"--data torchvision: could not download CIFAR-10 into {root} ({first_line(exc)}); "
                "offline, pass a local copy: --data PATH, where PATH is an extracted cifar-10-batches-py "
                "folder or an ImageFolder root with train/ and test/"
            ) from None
        existing = batches_py.find_folder(root)
        if existing is None:
            raise CifarkitError(f"--data torchvision: download finished but no data found under {root}")
    return existing


def _load_batches_py(folder: Path) -> CifarData:
    """The python pickles torchvision downloads (cifarkit.batches_py: read as data only, within the format's
    bounds): data_batch_1..5, test_batch, batches.meta."""
    train_x, train_y = batches_py.read_split(folder, "train")
    test_x, test_y = batches_py.read_split(folder, "test")
    classes = batches_py.read_classes(folder, CIFAR10_CLASSES)
    check_labels(folder, classes, train_y, test_y)
    return CifarData(train_x, train_y, test_x, test_y, classes, source=str(folder), kind="batches-py")


def check_labels(folder: Path, classes: tuple[str, ...], *labels: np.ndarray) -> None:
    """Every label indexes a class (a CifarkitError naming the folder otherwise)."""
    low = min((int(y.min(initial=0)) for y in labels), default=0)
    top = max((int(y.max(initial=0)) for y in labels), default=0)
    if low < 0 or top >= len(classes):
        raise CifarkitError(f"--data: {folder} has labels outside 0..{len(classes) - 1}")


# ---- ImageFolder ----------------------------------------------------------------------------------------


def list_imagefolder(split_dir: Path) -> tuple[tuple[str, ...], list[tuple[str, int]]]:
    """Classes (sorted sub-folder names) and (file path, label) pairs, sorted. Hidden entries are skipped. Paths
    are strings: 60,000 pathlib objects cost ~0.7 s here, the whole listing of a warm run's data."""
    _, folders, problems = list_folder(split_dir)
    if problems:
        raise CifarkitError(f"--data: {problems[0].message}")
    classes = tuple(folders)
    samples: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        folder = os.path.join(split_dir, name)
        files, _, problems = list_folder(folder)
        if problems:
            raise CifarkitError(f"--data: {problems[0].message}")
        if not files:
            raise CifarkitError(
                f"--data: class folder {folder} has no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        samples.extend((os.path.join(folder, f), label) for f in files)
    return classes, samples


def _load_imagefolder(root: Path, cache_dir: Path, *, threads: int | None, progress: Progress | None) -> CifarData:
    splits = {}
    for split in ("train", "test"):
        classes, samples = list_imagefolder(root / split)
        if len(classes) < 2:
            raise CifarkitError(f"--data: {root / split} must hold at least 2 class folders, found {len(classes)}")
        splits[split] = (classes, samples)
    if splits["train"][0] != splits["test"][0]:
        raise CifarkitError(
            f"--data: the class folders of {root / 'train'} and {root / 'test'} differ: "
            f"{list(splits['train'][0])} vs {list(splits['test'][0])}"
        )
    classes = splits["train"][0]

    key = _fingerprint(root, splits["train"][1] + splits["test"][1])
    cache = cache_dir / "decoded" / f"imagefolder-{key}"
    arrays = _read_cache(cache)
    if arrays is not None:
        return CifarData(**arrays, classes=classes, source=str(root), kind="imagefolder", from_cache=True)

    total = len(splits["train"][1]) + len(splits["test"][1])
    done_before = 0
    arrays = {}
    for split in ("train", "test"):
        samples = splits[split][1]
        x = decode_files([p for p, _ in samples], threads=threads, progress=progress, offset=done_before, total=total)
        arrays[f"{split}_x"] = x
        arrays[f"{split}_y"] = np.fromiter((label for _, label in samples), dtype=np.int64, count=len(samples))
        done_before += len(samples)
    _write_cache(cache, arrays)
    return CifarData(**arrays, classes=classes, source=str(root), kind="imagefolder")


def decode_files(
    paths: list[Path],
    *,
    threads: int | None = None,
    progress: Progress | None = None,
    offset: int = 0,
    total: int | None = None,
) -> np.ndarray:
    """Decode and preprocess files into one uint8 [N, H, W, 3] array, in chunks through the ordered thread
    window that inference uses (Pillow releases the GIL while decoding). An unreadable file is a
    CifarkitError that names it."""
    out = np.empty((len(paths), *IMAGE_SIZE, 3), dtype=np.uint8)
    total = total if total is not None else len(paths)

    def decode(chunk: tuple[int, list[Path]]) -> int:
        start, files = chunk
        for i, path in enumerate(files, start):
            out[i] = load_image(path, IMAGE_SIZE, RESIZE_MODE, RESIZE_FILTER)
        return start + len(files)

    try:
        for done in ordered_map(decode, chunked(paths, 256), threads or default_threads()):
            if progress is not None:
                progress(offset + done, total)
    except ImageError as exc:
        raise CifarkitError(f"--data: unreadable image {exc}") from None
    return out


def _fingerprint(root: Path, samples: list[tuple[str, int]]) -> str:
    """Changes when any file is added, removed, renamed, resized or touched, or the preprocessing changes."""
    h = hashlib.sha256()
    h.update(f"v{CACHE_VERSION}|{IMAGE_SIZE}|{RESIZE_MODE}|{RESIZE_FILTER}|{root.resolve()}\n".encode())
    prefix = len(os.path.join(root, ""))  # the paths were joined onto `root`: what follows is the relative path
    for path, label in samples:
        st = os.stat(path)
        h.update(f"{path[prefix:]}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def _read_cache(folder: Path) -> dict[str, np.ndarray] | None:
    """The decoded arrays of a cache folder, mapped from the page cache rather than read (copy-on-write: writable
    in this process, the file never written); None when it is missing or damaged (it is rebuilt)."""
    try:
        arrays = {k: np.load(folder / f"{k}.npy", mmap_mode="c", allow_pickle=False) for k in CACHE_ARRAYS}
    except (OSError, ValueError):
        return None
    n_train, n_test = len(arrays["train_y"]), len(arrays["test_y"])
    if arrays["train_x"].shape != (n_train, *IMAGE_SIZE, 3) or arrays["test_x"].shape != (n_test, *IMAGE_SIZE, 3):
        return None
    if arrays["train_x"].dtype != np.uint8 or arrays["test_x"].dtype != np.uint8:
        return None
    return arrays


def _write_cache(folder: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write the arrays as .npy files into a folder that appears complete or not at all."""
    try:
        with staged_folder(folder, "--data-dir") as tmp:
            for name in CACHE_ARRAYS:
                np.save(tmp / f"{name}.npy", arrays[name], allow_pickle=False)
    except (CifarkitError, OSError):
        pass  # a read-only cache folder, or another process's cache already there: only speed next time
