"""The processes of a local Ray, found and ended on every way out (Linux; elsewhere these do nothing).

A SIGTERM sent to a whole process group (systemd's default KillMode, `timeout`, `kill -TERM -PGID`) reaches the
raylet, the GCS and the workers as well as cifar-serve: the raylet and GCS exit first, and the workers they
leave (Serve's controller, the replicas) are re-parented and linger for seconds. cifar-serve makes itself a child
subreaper (prctl(2) PR_SET_CHILD_SUBREAPER), so that such orphans come back to it rather than to init, and after
ray.shutdown() ends whatever of Ray's processes still runs.

    become_subreaper()                       # once, by the command line (a process-wide setting)
    pids = ray_processes()                   # the local Ray's processes, orphaned workers included
    end_processes(pids)                      # SIGKILL those still running, reap our own children
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time

PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
RAY_TITLE = b"ray::"  # how Ray names its worker processes (setproctitle): ray::ServeReplica:..., ray::IDLE


def become_subreaper() -> bool:
    """Orphaned descendants are re-parented to this process instead of init (Linux 3.4+). True if set."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _table() -> dict[int, tuple[int, str, bytes]]:
    """pid -> (parent pid, state letter, first bytes of the command line), from /proc."""
    out: dict[int, tuple[int, str, bytes]] = {}
    if not os.path.isdir("/proc"):
        return out
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmdline = f.read(64)
            out[int(entry.name)] = (int(fields[1]), fields[0].decode(), cmdline)
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
    return out


def ray_processes() -> set[int]:
    """The processes of the local Ray that ray.init started here (its own record: GCS, raylet, agents), every
    process below them (the workers), and this process's children that Ray named (workers re-parented here)."""
    roots: set[int] = set()
    with contextlib.suppress(Exception):  # Ray's record moved in another version: the named workers still count
        from ray._private.worker import _global_node

        if _global_node is not None:
            roots = {info.process.pid for infos in _global_node.all_processes.values() for info in infos}
    table = _table()
    me = os.getpid()
    found = {pid for pid, (ppid, _, cmd) in table.items() if ppid == me and cmd.startswith(RAY_TITLE)} | roots
    frontier = set(found)
    while frontier:
        frontier = {pid for pid, (ppid, _, _) in table.items() if ppid in frontier} - found
        found |= frontier
    return found


def end_processes(pids: set[int], wait_s: float = 2.0) -> list[int]:
    """SIGKILL those of `pids` still running (not zombies) and reap the ones that are this process's children;
    returns the pids that were killed."""
    table = _table()
    alive = [pid for pid in pids if pid in table and table[pid][1] != "Z"]
    for pid in alive:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    me = os.getpid()
    children = {pid for pid in pids if pid in table and table[pid][0] == me}
    deadline = time.monotonic() + wait_s
    while children and time.monotonic() < deadline:
        for pid in list(children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere (subprocess.Popen inside Ray)
                done = pid
            if done:
                children.discard(pid)
        if children:
            time.sleep(0.05)
    return alive
