"""Atomic file writes: write a temporary file in the target's folder, then rename it over the target.

A crash, a full disk or an exception leaves either the old file or nothing, never a half-written one.
Pure Python: used by every stage, the torch-free inference path included.

    with atomic_path("run/checkpoint.pt") as tmp:
        torch.save(state, tmp)
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[str]:
    """Yield a temporary path next to `path`; on success it is renamed to `path` (mode 0666 & ~umask)."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def output_folder(path: str | os.PathLike[str], option: str = "--out") -> Iterator[Path]:
    """Create `path` if needed and check that files can be written there (a CifarkitError naming `option`
    if not). If the body fails and the folder was created here and is still empty, it is removed: a failed
    run or export leaves nothing behind."""
    from cifarkit.errors import CifarkitError

    folder = Path(path)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CifarkitError(f"{option}: cannot write to {folder} ({exc.strerror or exc})") from None
    try:
        yield folder
    except BaseException:
        if created and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        raise


def write_bytes(path: str | os.PathLike[str], payload: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(payload)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    write_bytes(path, text.encode("utf-8"))
