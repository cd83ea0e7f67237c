"""The CIFAR-10 python format (`cifar-10-batches-py`, what torchvision downloads), read as data only and within
the format's bounds. numpy only.

A folder holds data_batch_1..5 (the training split), test_batch and batches.meta. Each batch is a pickled dict
whose `data` is a uint8 [10000, 3072] array (three 32x32 planes a row) and whose `labels` are 10,000 integers.
A pickle can run code and numpy's array reconstruction can build any shape and strides, so a batch is read by a
restricted unpickler that admits only what these files hold (dicts, lists, bytes, str, ints, numpy's array
reconstruction) and never lets a pickle call numpy.ndarray itself (a zero-stride view of one byte can claim a
terabyte); every array is then checked against the format (at most 10,000 rows of 3,072 bytes, contiguous)
before anything is allocated from it. A file over MAX_FILE_BYTES is refused before it is read.

    x, y = read_arrays(folder / "test_batch")     # uint8 [N, 32, 32, 3], int64 [N]
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from cifarkit.errors import CifarkitError, first_line
from cifarkit.files import NotRegularFile, open_regular
from cifarkit.spec import MAX_CLASSES

ROW_BYTES = 3 * 32 * 32  # one image: the R, G and B planes of a 32x32 picture
MAX_ROWS = 10_000  # images per batch file (CIFAR-10's are exactly this; a subset may hold fewer)
MAX_FILE_BYTES = 40 << 20  # a CIFAR-10 batch is 31 MB (the pixels, the labels, the file names)
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
META_FILE = "batches.meta"


def find_folder(root: Path) -> Path | None:
    """The cifar-10-batches-py folder at `root` or just inside it (one with a training or a test batch)."""
    for candidate in (root, root / "cifar-10-batches-py"):
        if (candidate / TRAIN_FILES[0]).is_file() or (candidate / TEST_FILE).is_file():
            return candidate
    return None


def read_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """One split of a batches-py folder: "train" (data_batch_1..5) or "test" (test_batch), as
    (uint8 [N, 32, 32, 3], int64 [N]). Only that split's files are read."""
    names = TRAIN_FILES if split == "train" else (TEST_FILE,)
    parts = [read_arrays(folder / name) for name in names]
    if len(parts) == 1:
        return parts[0]
    return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])


def read_classes(folder: Path, default: tuple[str, ...]) -> tuple[str, ...]:
    """The class names of batches.meta (`label_names`), or `default` when the folder has no batches.meta."""
    path = folder / META_FILE
    if not path.exists():
        return default
    meta = read_batch(path)
    names = meta.get(b"label_names") or meta.get("label_names")
    if not names:
        return default
    ok = isinstance(names, (list, tuple)) and 2 <= len(names) <= MAX_CLASSES
    decoded = [n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names] if ok else []
    if not ok or not all(isinstance(n, str) and 0 < len(n) <= 200 for n in decoded):
        raise CifarkitError(f"--data: {path}'s label_names must be 2 to {MAX_CLASSES} names")
    return tuple(decoded)


def read_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [N, 32, 32, 3], int64 [N]) of one batch file, checked: N <= 10,000 rows of 3,072 pixels, one
    integer label a row. A CifarkitError naming the file otherwise."""
    part = read_batch(path)
    x, y = part.get(b"data"), part.get(b"labels", part.get(b"fine_labels"))
    if x is None:
        raise CifarkitError(f"--data: {path} holds no 'data' (a CIFAR-10 batch maps b'data' to its pixels)")
    labels = np.asarray(y) if isinstance(y, (list, np.ndarray)) else None
    if labels is None or labels.shape != (len(x),) or labels.dtype.kind not in "iu":
        raise CifarkitError(f"--data: {path}'s 'labels' must be {len(x)} integers, one per image")
    x = x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # CIFAR's planes -> [N, 32, 32, 3] pixels: 30 MB at most
    return np.ascontiguousarray(x), labels.astype(np.int64)


def read_batch(path: Path) -> dict:
    """One CIFAR python batch file as a dict, read as data only, its `data` array (if any) within the format's
    bounds. A missing, irregular, oversized, crafted or out-of-bounds file is a CifarkitError naming it."""
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_FILE_BYTES:
                raise CifarkitError(
                    f"--data: {path} is {size:,} bytes, too large for a CIFAR-10 python batch "
                    f"(at most {MAX_FILE_BYTES >> 20} MiB)"
                )
            data = _Unpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise CifarkitError(
            f"--data: {path} is missing (a cifar-10-batches-py folder has data_batch_1..5, test_batch and batches.meta)"
        ) from None
    except NotRegularFile as exc:
        raise CifarkitError(f"--data: {path} {exc.strerror}") from None
    except pickle.UnpicklingError as exc:
        raise CifarkitError(f"--data: {path} is refused: {first_line(exc)}") from None
    except CifarkitError:
        raise
    except Exception as exc:  # truncated or foreign files: EOFError, ValueError (numpy's size checks), ...
        raise CifarkitError(f"--data: {path} is not a CIFAR-10 python batch ({first_line(exc)})") from None
    if not isinstance(data, dict):
        raise CifarkitError(f"--data: {path} is not a CIFAR-10 python batch (holds a {type(data).__name__})")
    if b"data" in data:
        _check_pixels(data[b"data"], path)
    return data


def _check_pixels(x: Any, path: Path) -> None:
    """A batch's `data`: a C-contiguous uint8 [N, 3072] array of at most MAX_ROWS rows, its bytes its own."""
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != ROW_BYTES:
        got = f"{x.dtype} {list(x.shape)}" if isinstance(x, np.ndarray) else type(x).__name__
        raise CifarkitError(f"--data: {path}'s 'data' is {got}, expected uint8 [N, 3072] (CIFAR's row layout)")
    if x.shape[0] > MAX_ROWS:
        raise CifarkitError(f"--data: {path}'s 'data' has {x.shape[0]:,} rows; a CIFAR-10 batch holds at most 10,000")
    if not x.flags.c_contiguous or x.strides != (ROW_BYTES, 1):
        raise CifarkitError(f"--data: {path}'s 'data' is a strided view, not the format's contiguous rows")


class _NdarrayToken:
    """What the unpickler hands out for numpy.ndarray: accepted as the array type numpy's reconstruction names,
    refused when a pickle calls it (numpy.ndarray(shape, dtype, buffer, offset, strides) can make a view of any
    shape and strides over a few bytes)."""

    def __call__(self, *args: object, **kwargs: object) -> None:
        raise pickle.UnpicklingError(
            "it calls numpy.ndarray directly (a view of any shape and strides), which a CIFAR batch never does"
        )


_NDARRAY = _NdarrayToken()


def _reconstruct(subtype: object, shape: object, dtype: object) -> np.ndarray:
    """numpy's array reconstruction, for plain arrays only: an empty array whose pickled state (shape, dtype,
    bytes) numpy then checks against the bytes that are really there."""
    from numpy._core import multiarray

    if subtype is not _NDARRAY:
        raise pickle.UnpicklingError("it reconstructs an array of another type than numpy.ndarray")
    return multiarray._reconstruct(np.ndarray, shape, dtype)


class _Unpickler(pickle.Unpickler):
    """Admits only what CIFAR's python batches hold: dicts, lists, bytes, str, ints and plain numpy arrays (whose
    pickles name numpy's array reconstructor, ndarray and dtype, and _codecs.encode for bytes pickled by Python 3
    at protocol 2). Any other global, which is how a pickle runs code, is refused."""

    @staticmethod
    def _allowed() -> dict[tuple[str, str], object]:
        import codecs

        from numpy._core import numeric

        return {
            ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
            ("numpy.core.numeric", "_frombuffer"): numeric._frombuffer,  # a view of bytes the pickle holds
            ("numpy._core.numeric", "_frombuffer"): numeric._frombuffer,
            ("numpy", "ndarray"): _NDARRAY,
            ("numpy", "dtype"): np.dtype,
            ("_codecs", "encode"): codecs.encode,
        }

    def find_class(self, module: str, name: str) -> object:
        allowed = self._allowed()
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(
                f"it asks for {module}.{name}, which a CIFAR batch never holds (a pickle that could run code)"
            )
        return allowed[(module, name)]
