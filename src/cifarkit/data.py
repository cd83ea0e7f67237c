"""CIFAR-10 sources -> uint8 arrays, decoded once and cached; batches served from memory on the device.

Three sources, chosen by `load_data(source)`:
  "torchvision"        torchvision's CIFAR-10, downloaded on first use into `data_dir`
  PATH/                an extracted `cifar-10-batches-py` folder (or a folder holding one)
  PATH/                an ImageFolder root with train/<class>/* and test/<class>/* (any >= 2 classes)

    data = load_data("/data/cifar10-jpeg")          # CifarData, uint8 [N, 32, 32, 3] arrays
    batches = DeviceBatches(data.train_x, data.train_y, batch_size=32, device=torch.device("cpu"))
    for x, y in batches.epoch(0): ...              # x: [B, 3, 32, 32] float32 normalized, y: [B] int64
"""

from __future__ import annotations

import hashlib
import os
import pickle
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cifarkit.atomic import atomic_path
from cifarkit.errors import CifarkitError, first_line
from cifarkit.preprocess import IMAGE_EXTENSIONS, ImageError, load_image
from cifarkit.spec import CIFAR10_CLASSES, IMAGE_SIZE, MEAN, RESIZE_FILTER, RESIZE_MODE, STD

CACHE_VERSION = 1  # bump when the cached array layout or the preprocessing rule changes
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
    else:
        root = Path(source).expanduser()
        if not root.exists():
            raise CifarkitError(
                f"--data: {root} does not exist (expected an ImageFolder root with train/ and "
                "test/, or an extracted cifar-10-batches-py folder)"
            )
        if not root.is_dir():
            raise CifarkitError(f"--data: {root} is not a folder")
        batches = _find_batches_py(root)
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


def _load_torchvision(cache_dir: Path) -> CifarData:
    root = cache_dir / "torchvision"
    existing = _find_batches_py(root) if root.is_dir() else None
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
        existing = _find_batches_py(root)
        if existing is None:
            raise CifarkitError(f"--data torchvision: download finished but no data found under {root}")
    data = _load_batches_py(existing)
    data.kind = "torchvision"
    return data


def _find_batches_py(root: Path) -> Path | None:
    for candidate in (root, root / "cifar-10-batches-py"):
        if (candidate / "data_batch_1").is_file():
            return candidate
    return None


def _load_batches_py(folder: Path) -> CifarData:
    """The python pickles torchvision downloads: data_batch_1..5, test_batch, batches.meta."""

    def read(name: str) -> dict:
        path = folder / name
        if not path.is_file():
            raise CifarkitError(
                f"--data: {path} is missing (a cifar-10-batches-py folder has data_batch_1..5, "
                "test_batch and batches.meta)"
            )
        try:
            with open(path, "rb") as f:
                return pickle.load(f, encoding="bytes")
        except Exception as exc:
            raise CifarkitError(f"--data: {path} is not a CIFAR-10 python batch ({first_line(exc)})") from None

    def arrays(parts: list[dict], where: str) -> tuple[np.ndarray, np.ndarray]:
        try:
            x = np.concatenate([np.asarray(p[b"data"], dtype=np.uint8) for p in parts])
            y = np.concatenate([np.asarray(p.get(b"labels", p.get(b"fine_labels")), dtype=np.int64) for p in parts])
            x = x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # [N, 32, 32, 3]
        except Exception as exc:
            raise CifarkitError(f"--data: {where} has an unexpected layout ({first_line(exc)})") from None
        return np.ascontiguousarray(x), y

    train_x, train_y = arrays([read(f"data_batch_{i}") for i in range(1, 6)], str(folder))
    test_x, test_y = arrays([read("test_batch")], str(folder / "test_batch"))
    classes = CIFAR10_CLASSES
    meta_path = folder / "batches.meta"
    if meta_path.is_file():
        names = read("batches.meta").get(b"label_names")
        if names:
            classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    return CifarData(train_x, train_y, test_x, test_y, classes, source=str(folder), kind="batches-py")


# ---- ImageFolder ----------------------------------------------------------------------------------------


def list_imagefolder(split_dir: Path) -> tuple[tuple[str, ...], list[tuple[Path, int]]]:
    """Classes (sorted sub-folder names) and (file, label) pairs, sorted. Hidden entries are skipped."""
    classes = tuple(sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith(".")))
    samples: list[tuple[Path, int]] = []
    for label, name in enumerate(classes):
        files = sorted(
            e.name
            for e in os.scandir(split_dir / name)
            if e.is_file() and not e.name.startswith(".") and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS
        )
        if not files:
            raise CifarkitError(
                f"--data: class folder {split_dir / name} has no images "
                f"(looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        samples.extend((split_dir / name / f, label) for f in files)
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
    cache_file = cache_dir / "decoded" / f"imagefolder-{key}.npz"
    if cache_file.is_file():
        try:
            with np.load(cache_file) as z:
                arrays = {k: z[k] for k in ("train_x", "train_y", "test_x", "test_y")}
            return CifarData(**arrays, classes=classes, source=str(root), kind="imagefolder", from_cache=True)
        except Exception:
            pass  # a damaged cache is rebuilt below

    total = len(splits["train"][1]) + len(splits["test"][1])
    done_before = 0
    arrays = {}
    for split in ("train", "test"):
        samples = splits[split][1]
        x = decode_files([p for p, _ in samples], threads=threads, progress=progress, offset=done_before, total=total)
        arrays[f"{split}_x"] = x
        arrays[f"{split}_y"] = np.fromiter((label for _, label in samples), dtype=np.int64, count=len(samples))
        done_before += len(samples)
    _atomic_savez(cache_file, arrays)
    return CifarData(**arrays, classes=classes, source=str(root), kind="imagefolder")


def decode_files(
    paths: list[Path],
    *,
    threads: int | None = None,
    progress: Progress | None = None,
    offset: int = 0,
    total: int | None = None,
) -> np.ndarray:
    """Decode and preprocess files into one uint8 [N, H, W, 3] array, in a thread pool (Pillow releases the
    GIL while decoding). An unreadable file is a CifarkitError that names it."""
    out = np.empty((len(paths), *IMAGE_SIZE, 3), dtype=np.uint8)
    total = total if total is not None else len(paths)
    workers = threads or min(8, (os.cpu_count() or 1) + 1)

    def work(i: int) -> None:
        out[i] = load_image(paths[i], IMAGE_SIZE, RESIZE_MODE, RESIZE_FILTER)

    chunk = 2048
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(paths), chunk):
            idx = range(start, min(start + chunk, len(paths)))
            try:
                list(pool.map(work, idx))
            except ImageError as exc:
                raise CifarkitError(f"--data: unreadable image {exc}") from None
            if progress is not None:
                progress(offset + idx.stop, total)
    return out


def _fingerprint(root: Path, samples: list[tuple[Path, int]]) -> str:
    """Changes when any file is added, removed, renamed, resized or touched, or the preprocessing changes."""
    h = hashlib.sha256()
    h.update(f"v{CACHE_VERSION}|{IMAGE_SIZE}|{RESIZE_MODE}|{RESIZE_FILTER}|{root.resolve()}\n".encode())
    for path, label in samples:
        st = path.stat()
        h.update(f"{path.relative_to(root)}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def _atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
    except OSError:
        pass  # a read-only cache folder only costs speed next time; the decoded data is still returned


# ---------------------------------------------------------------------------------------------------------
# Batching from memory on the device
# ---------------------------------------------------------------------------------------------------------


def normalize_uint8(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W], exactly torchvision's ToTensor() then Normalize(mean, std).

    `mean` and `std` are float32 [1, 3, 1, 1]. The result is a channels_last-strided view of NCHW
    (what permuting an NHWC tensor gives); call .contiguous() for the classic layout."""
    return x.permute(0, 3, 1, 2).to(torch.float32).div(255.0).sub(mean).div(std)


class DeviceBatches:
    """Holds a split as one uint8 tensor on `device` and serves normalized batches from it.

    Every epoch is a fresh permutation drawn from a generator seeded with (seed, epoch), so a resumed run
    sees exactly the order an uninterrupted run would have. With `world_size` > 1 each rank takes an equal,
    disjoint share of every epoch's permutation (DistributedSampler's rule: pad by wrapping).

    Augmentation, batched on the device (airbench's scheme): `translate` shifts every image by up to that
    many pixels in x and y (reflect padding); `flip` mirrors a fixed random half of the images and then
    flips all of them every other epoch, which sees both views more evenly than independent coin flips."""

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        *,
        batch_size: int,
        device: torch.device,
        shuffle: bool = True,
        seed: int = 0,
        mean: tuple[float, ...] = MEAN,
        std: tuple[float, ...] = STD,
        channels_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        translate: int = 0,
        flip: bool = False,
        drop_last: bool = False,
    ) -> None:
        self.x = torch.from_numpy(x).to(device)  # uint8 [N, H, W, 3]
        self.y = torch.from_numpy(y).to(device)  # int64 [N]
        self.batch_size = batch_size
        self.device = device
        self.shuffle = shuffle
        self.seed = seed
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.channels_last = channels_last
        self.rank = rank
        self.world_size = world_size
        self.translate = translate
        self.drop_last = drop_last
        self.flip_mask: torch.Tensor | None = None
        if flip:
            g = torch.Generator().manual_seed(seed * 1_000_003 + 7_777)
            self.flip_mask = (torch.rand(len(y), generator=g) < 0.5).to(device)  # [N] bool
        self.padded: torch.Tensor | None = None
        if translate:
            p = translate  # reflect-pad once: [N, H + 2p, W + 2p, 3] uint8
            self.padded = torch.from_numpy(np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)), mode="reflect")).to(device)

    def __len__(self) -> int:
        n = self.per_rank
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def per_rank(self) -> int:
        n = len(self.y)
        return -(-n // self.world_size) if self.world_size > 1 else n

    def _generator(self, epoch: int, salt: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + salt)

    def order(self, epoch: int) -> torch.Tensor:
        n = len(self.y)
        idx = torch.randperm(n, generator=self._generator(epoch)) if self.shuffle else torch.arange(n)
        if self.world_size > 1:
            total = self.per_rank * self.world_size
            if total > n:
                idx = torch.cat([idx, idx[: total - n]])
            idx = idx[self.rank : total : self.world_size]
        return idx.to(self.device)

    def images(self, epoch: int) -> torch.Tensor:
        """This epoch's augmented uint8 [N, H, W, 3] images (the stored ones when augmentation is off)."""
        x = self.x
        if self.padded is not None:
            r = self.translate
            h, w = x.shape[1], x.shape[2]
            shifts = torch.randint(-r, r + 1, (len(x), 2), generator=self._generator(epoch, 500_009)).to(self.device)
            out = torch.empty_like(x)
            for sy in range(-r, r + 1):  # (2r+1)^2 masked copies: fast for r <= 2 (airbench's batch_crop)
                for sx in range(-r, r + 1):
                    mask = (shifts[:, 0] == sy) & (shifts[:, 1] == sx)
                    out[mask] = self.padded[mask, r + sy : r + sy + h, r + sx : r + sx + w]
            x = out
        if self.flip_mask is not None:
            mask = self.flip_mask ^ bool(epoch % 2)
            x = torch.where(mask.view(-1, 1, 1, 1), x.flip(2), x)
        return x

    def epoch(self, epoch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self.order(epoch)
        x = self.images(epoch)
        stop = len(self) * self.batch_size if self.drop_last else len(idx)
        for start in range(0, stop, self.batch_size):
            b = idx[start : start + self.batch_size]
            xb = normalize_uint8(x.index_select(0, b), self.mean, self.std)
            if not self.channels_last:
                xb = xb.contiguous()
            yield xb, self.y.index_select(0, b)
