"""Writing files so that nothing is lost or half-written, and nothing that is not ours is written over.

Pure Python: used by every stage, the torch-free inference path included.

- `atomic_path(target)`: a temporary file beside the target, renamed over it on success. A crash, a full disk
  or an exception leaves the old file (or none), never half of one. The target must be a regular file or
  not exist: a FIFO, a device or a folder at that path is refused, and a symlink is written through (its
  target file is replaced; the link stays). Temporary names carry the writer's process id, so a temporary
  file left by a killed process (kill -9) is removed by the next write to the same target.
- `output_folder(path)`: create a run or export folder (and its missing parents), lock it against a second
  cifarkit process, and on failure remove what this call created if it is still empty.
- `staged_folder(path)`: a folder filled under a temporary name and renamed into place when complete (a
  Parquet dataset, an evaluation report).
- `write_set(folder, files)`: files that belong together (an export set), all old or all new.

    with atomic_path("run/checkpoint.pt") as tmp:
        torch.save(state, tmp)
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

from cifarkit.errors import CifarkitError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_target(path: str | os.PathLike[str], option: str = "output") -> Path:
    """The file that writing `path` will replace: `path` itself, or the file a symlink at `path` points to.
    A CifarkitError naming `option` if that is anything but a regular file or nothing."""
    target = Path(os.path.realpath(path)) if os.path.islink(path) else Path(path)
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        return target
    except OSError as exc:
        raise CifarkitError(f"{option} {path}: cannot use it ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        from cifarkit.files import file_kind

        raise CifarkitError(f"{option} {path} is {file_kind(mode)}; refusing to write over it (expected a file name)")
    return target


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], option: str = "output") -> Iterator[str]:
    """Yield a temporary path beside `path`'s target; on success it is renamed over the target (mode
    0666 & ~umask). An OSError while writing (a full disk, a vanished folder) is a CifarkitError naming the
    file; the temporary file is removed on every way out but kill -9 (and then by the next writer)."""
    import tempfile  # here, not at the top: readers of this module (committed_member) never pay for it

    target = write_target(path, option)
    remove_stale_temps(target)
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.{os.getpid()}-", suffix=".tmp")
    except OSError as exc:
        raise CifarkitError(f"{option}: cannot write to {target.parent} ({exc.strerror or exc})") from None
    os.close(fd)
    try:
        with _disk_errors(f"{option}: cannot write {path}"):
            yield tmp
        try:
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, target)
        except OSError as exc:
            raise CifarkitError(f"{option}: cannot write {path} ({exc.strerror or exc})") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


# What a full or failing disk says while the body writes; other OSErrors in the body are not about our file.
_WRITE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG})


@contextlib.contextmanager
def _disk_errors(what: str) -> Iterator[None]:
    """A full or failing disk while the body writes -> CifarkitError(f"{what} ({reason})")."""
    try:
        yield
    except OSError as exc:
        if exc.errno in _WRITE_ERRORS:
            raise CifarkitError(f"{what} ({exc.strerror})") from None
        raise


_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-[^.]+\.tmp$")


def remove_stale_temps(target: Path) -> list[Path]:
    """Remove the temporary files of writes to `target` whose process is gone (kill -9, power loss).
    Returns what was removed."""
    removed = []
    try:
        entries = os.scandir(target.parent)
    except OSError:
        return removed
    with entries:
        for entry in entries:
            m = _TEMP.match(entry.name)
            if m is None or m["name"] != target.name or _alive(int(m["pid"])):
                continue
            with contextlib.suppress(OSError):
                if entry.is_dir(follow_symlinks=False):  # a staged folder (staged_folder below)
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@contextlib.contextmanager
def output_folder(path: str | os.PathLike[str], option: str = "--out") -> Iterator[Path]:
    """Create `path` (and missing parents) if needed, check that files can be written there, and hold an
    exclusive lock on it (flock on the folder itself: no lock file) so that a second cifarkit process
    writing the same folder is refused instead of mixing results. If the body fails, the folders this call
    created are removed again while empty: a failed run or export leaves nothing behind."""
    folder = Path(path)
    created = _missing_parents(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not folder.is_dir():
            raise CifarkitError(f"{option} {folder} is not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise CifarkitError(f"{option}: cannot write to {folder} (permission denied)")
        lock = _lock(folder, option)
    except OSError as exc:
        _remove_empty(created)
        raise CifarkitError(f"{option}: cannot write to {folder} ({exc.strerror or exc})") from None
    except BaseException:
        _remove_empty(created)
        raise
    try:
        yield folder
    except BaseException:
        _remove_empty(created)
        raise
    finally:
        os.close(lock)  # releases the flock


@contextlib.contextmanager
def staged_folder(
    path: str | os.PathLike[str], option: str = "--out", *, replace: Sequence[str] | None = None
) -> Iterator[Path]:
    """Yield a temporary folder beside `path` (missing parents are created) for the body to fill; when the
    body succeeds the folder appears at `path` complete, in one rename. A failure or an interrupt removes the
    temporary folder and the parents this call created; kill -9 leaves it, and the next writer to `path`
    removes it (its name carries the process id, as atomic_path's temporary files do).

    If `path` exists: with `replace` (the names the body writes), each of those files is moved into it by an
    atomic rename, in order, and nothing else there is touched; without `replace`, a CifarkitError naming
    `option` (a dataset folder is never written into)."""
    import tempfile

    target = Path(path)
    if os.path.lexists(target) and (replace is None or not target.is_dir()):
        what = (
            "already exists; give a new folder name (it is never written into)"
            if replace is None
            else "is not a folder"
        )
        raise CifarkitError(f"{option} {path} {what}")
    parent = target.absolute().parent
    created = _missing_parents(parent)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(parent / target.name)
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{target.name}.{os.getpid()}-", suffix=".tmp"))
    except OSError as exc:
        _remove_empty(created)
        raise CifarkitError(f"{option}: cannot write to {parent} ({exc.strerror or exc})") from None
    try:
        with _disk_errors(f"{option}: cannot write into {path}"):
            yield tmp
        try:
            if os.path.lexists(target):
                for name in replace or ():
                    os.replace(tmp / name, target / name)
            else:
                os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp made it 0700
                os.rename(tmp, target)
        except OSError as exc:
            raise CifarkitError(f"{option}: cannot move the results into {path} ({exc.strerror or exc})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise
    shutil.rmtree(tmp, ignore_errors=True)  # what is left after moving files into an existing folder


def _lock(folder: Path, option: str) -> int:
    import fcntl

    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise CifarkitError(
                f"{option} {folder} is in use by another cifarkit process; wait for it or pick another folder"
            ) from None
        raise
    return fd


def _missing_parents(folder: Path) -> list[Path]:
    """The folders that creating `folder` would create, deepest first."""
    missing = []
    for p in [folder, *folder.absolute().parents]:
        if p.exists() or p.is_symlink():
            break
        missing.append(p)
    return missing


def _remove_empty(created: list[Path]) -> None:
    for p in created:  # deepest first
        try:
            p.rmdir()
        except OSError:
            break  # not empty (or not ours any more): leave it and everything above it


def write_bytes(path: str | os.PathLike[str], payload: bytes, option: str = "output") -> None:
    with atomic_path(path, option) as tmp, open(tmp, "wb") as f:
        f.write(payload)


def write_text(path: str | os.PathLike[str], text: str, option: str = "output") -> None:
    write_bytes(path, text.encode("utf-8"), option)


# ---------------------------------------------------------------------------------------------------------
# A set of files that belong together (model.onnx, model.pt, model.json): all new or all old
# ---------------------------------------------------------------------------------------------------------

SET_JOURNAL = ".cifarkit-set.journal"  # the commit record of a set being written into a folder


def write_set(
    folder: str | os.PathLike[str], files: dict[str, bytes], *, remove: Sequence[str] = (), option: str = "--out"
) -> dict[str, Path]:
    """Write `files` (name -> bytes) into `folder` as one set, removing the files named in `remove` (members of
    an older set that this one does not have) at the same commit. Each file is staged under a temporary name
    and flushed to disk; then a journal naming the staged files is written atomically (the commit point);
    then each is renamed into place and the journal removed. A crash before the journal leaves the old set
    (and temporary files the next write removes); a crash after it is finished by `finish_pending_set`,
    which every writer of the folder calls first, and read where it lies by readers (committed_member). So a
    reader sees all new or all old, and reading changes nothing.
    The files of a set are regular files: a symlink or anything else at a name is refused."""
    import json
    import tempfile

    folder = Path(folder)
    finish_pending_set(folder)
    for name in files:
        target = folder / name
        if os.path.islink(target):
            raise CifarkitError(f"{option}: {target} is a symlink; a model's files are written as regular files")
        write_target(target, option)  # refuses FIFOs, devices, folders
    staged: list[str] = []
    try:
        for name, payload in files.items():
            remove_stale_temps(folder / name)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.{os.getpid()}-", suffix=".tmp")
            staged.append(tmp)
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())
        gone = [name for name in remove if name not in files and os.path.lexists(folder / name)]
        journal = json.dumps({"staged": [os.path.basename(tmp) for tmp in staged], "remove": gone}).encode()
        write_bytes(folder / SET_JOURNAL, journal, option)  # committed from here on
    except BaseException as exc:
        for tmp in staged:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if isinstance(exc, OSError):
            raise CifarkitError(f"{option}: cannot write to {folder} ({exc.strerror or exc})") from None
        raise
    finish_pending_set(folder)
    return {name: folder / name for name in files}


def finish_pending_set(folder: str | os.PathLike[str]) -> bool:
    """Complete a set whose writer died after committing it (see write_set): rename what is still staged,
    then drop the journal. Returns True if there was one. Only writers call this: a reader reads a committed
    set where it lies (committed_member). A CifarkitError if it cannot be completed (a read-only folder, a
    damaged journal): the folder's files would be a mix of two sets."""
    folder = Path(folder)
    record = _pending_set(folder)
    if record is None:
        return False
    staged, gone = record
    try:
        for tmp, name in staged:
            if (folder / tmp).exists():
                os.replace(folder / tmp, folder / name)
        for name in gone:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(folder / name)
        (folder / SET_JOURNAL).unlink()
    except OSError as exc:
        raise CifarkitError(
            f"an export into {folder} was interrupted and cannot be finished here ({exc.strerror or exc}); "
            "run cifar-export again"
        ) from None
    return True


def committed_member(path: str | os.PathLike[str]) -> Path:
    """The file a reader opens for `path`, a member of a set (model.onnx): the staged file of a set that was
    committed but not yet renamed into place (its writer died), else `path` itself. Changes no file: the
    next writer finishes the set (finish_pending_set). A CifarkitError for a damaged journal."""
    path = Path(path)
    record = _pending_set(path.parent)
    if record is not None:
        for tmp, name in record[0]:
            if name == path.name and (path.parent / tmp).exists():
                return path.parent / tmp
    return path


def _pending_set(folder: Path) -> tuple[list[tuple[str, str]], list[str]] | None:
    """A committed set's journal: ([(staged file, final name)], [names to remove]), or None if there is none.
    Each staged name carries its target's name (".model.onnx.<pid>-<random>.tmp" -> "model.onnx"), so a
    journal can only name files of its own folder."""
    import json

    journal = folder / SET_JOURNAL
    try:
        record = json.loads(journal.read_bytes())
        matches = [_TEMP.match(name) if isinstance(name, str) else None for name in record["staged"]]
        gone = record.get("remove", [])
        plain = all(isinstance(n, str) and n and "/" not in n and n not in (".", "..") for n in gone)
        if not plain or not all(m is not None and "/" not in m.string for m in matches):
            raise ValueError("bad entry")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        raise CifarkitError(f"{journal} is damaged; remove it and export again") from None
    return [(m.string, m["name"]) for m in matches], gone
