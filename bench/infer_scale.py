"""Inference at scale: the local engine against the Ray engine on N images (the CIFAR-10 test set replicated),
from a folder and from Parquet shards, in one run.

Every pipeline is `cifar-infer ... --format parquet --output FOLDER` in a subprocess, process start included,
runs interleaved (the median is reported):

- local:            this process's threads (cifarkit.infer);
- ray (cluster):    --engine ray --ray-address of a Ray head started by this script beforehand (`ray start
                    --head --num-cpus CORES`), as a cluster is when jobs arrive; one warm-up run first;
- ray (own):        --engine ray without an address: the command starts a local Ray and stops it after.

The folder is N hard links in a temporary folder (no copies); `cifar-pack` packs it into shards, timed, at two
shard sizes. Peak RSS per process is each process's VmHWM from /proc, read while it runs: the driver
(cifar-infer itself) and the largest Ray actor. Images/s are ratios against the local engine in the same run;
the script never fails on timing.

    python bench/infer_scale.py --data $CIFARKIT_DATA --model runs/demo/model.onnx --images 100000
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BIN = Path(sys.executable).parent


# ---------------------------------------------------------------------------------------------------------
# Measuring a command: wall time and peak RSS of its processes
# ---------------------------------------------------------------------------------------------------------


def _hwm_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _ray_actor_pids() -> set[int]:
    pids = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    if f.read(64).startswith(b"ray::MapWorker"):
                        pids.add(int(entry.name))
            except OSError:
                pass
    return pids


def measure(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int, int, str]:
    """Run `cmd`: (wall seconds, driver peak RSS KiB, largest Ray actor peak RSS KiB, stderr tail)."""
    before = _ray_actor_pids()  # actors of an earlier job still exiting are not this command's
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    peaks = {"driver": 0, "actor": 0}
    done = threading.Event()

    def sample() -> None:  # VmHWM is a high-water mark: sampling only has to catch each process alive
        while not done.wait(0.2):
            peaks["driver"] = max(peaks["driver"], _hwm_kib(proc.pid))
            for pid in _ray_actor_pids() - before:
                peaks["actor"] = max(peaks["actor"], _hwm_kib(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    err = proc.stderr.read() if proc.stderr else ""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    done.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode not in (0, 1):
        sys.exit(f"failed (exit {proc.returncode}): {' '.join(cmd)}\n{err[-2000:]}")
    # ru_maxrss counts reaped descendants too (a Ray the command started): only when no sample was taken
    return wall, peaks["driver"] or usage.ru_maxrss, peaks["actor"], err[-2000:]


# ---------------------------------------------------------------------------------------------------------
# The data: hard links, shards
# ---------------------------------------------------------------------------------------------------------


def replicate(test_dir: Path, folder: Path, n: int) -> int:
    """`n` images as hard links to the test set (copies where the filesystem has no hard links)."""
    files = sorted(p for p in test_dir.rglob("*") if p.is_file())
    made = 0
    rep = 0
    while made < n:
        for f in files:
            if made == n:
                break
            dest = folder / f"rep{rep:03d}" / f.relative_to(test_dir)
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(f, dest)
            except OSError:
                shutil.copyfile(f, dest)
            made += 1
        rep += 1
    return made


def count_rows(folder: Path) -> tuple[int, int]:
    import pyarrow.parquet as pq

    t = pq.read_table(folder, columns=["error"])
    return t.num_rows, t.num_rows - t["error"].null_count


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.environ.get("CIFARKIT_DATA"), help="ImageFolder root with test/")
    p.add_argument("--model", default="runs/demo/model.onnx", help="an exported model.onnx")
    p.add_argument("--images", type=int, default=100_000, help="images to classify (the test set replicated)")
    p.add_argument("--runs", type=int, default=3, help="runs of each pipeline, interleaved (median reported)")
    p.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the Ray head this script starts")
    p.add_argument("--shard-sizes", default="16M,256M", help="cifar-pack --shard-size values to compare")
    p.add_argument("--skip-own", action="store_true", help="skip the Ray engine that starts its own Ray")
    p.add_argument("--work", default=None, help="temporary folder (default: a new one under $TMPDIR)")
    args = p.parse_args()

    test_dir = Path(args.data or "") / "test"
    if not (args.data and test_dir.is_dir() and Path(args.model).is_file()):
        print("bench/infer_scale.py: skipped, it needs --data (CIFARKIT_DATA) with test/ and --model", file=sys.stderr)
        return
    try:
        import pyarrow  # noqa: F401
        import ray  # noqa: F401
    except ImportError:
        print("bench/infer_scale.py: skipped, it needs Ray and pyarrow: pip install 'cifarkit[ray]'", file=sys.stderr)
        return
    # Bytecode as an installed package has it (this sandbox sets PYTHONDONTWRITEBYTECODE): start-up is measured
    # as users see it, the same for every pipeline.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(Path(__file__).parents[1] / "src")], check=False)

    work = Path(tempfile.mkdtemp(prefix="cifarkit-bench-scale-", dir=args.work))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}  # a throwaway local head: no token to hand around
    heads: list[subprocess.Popen] = []
    try:
        run(args, test_dir, work, env, heads)
    finally:
        for head in heads:  # only the head this script started (`ray stop` would stop every Ray on the machine)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(head.pid, signal.SIGTERM)
            head.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)


def start_head(cpus: int, port: int, env: dict[str, str]) -> subprocess.Popen:
    """`ray start --head --block` in a process group of its own; stopping that group stops the head."""
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--port", str(port), "--num-cpus", str(cpus)]
    cmd += ["--include-dashboard=false", "--disable-usage-stats"]
    head = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            time.sleep(2)  # the GCS answers before the raylet has registered: give it a moment
            return head
        time.sleep(0.5)
    sys.exit("bench/infer_scale.py: the Ray head did not start within 60 s")


def run(args: argparse.Namespace, test_dir: Path, work: Path, env: dict[str, str], heads: list) -> None:
    folder = work / "images"
    t0 = time.perf_counter()
    n = replicate(test_dir, folder, args.images)
    print(f"{n:,} images as hard links in {folder} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)

    # cifar-pack at each shard size: time and the packer's peak RSS
    sizes = [s.strip() for s in args.shard_sizes.split(",") if s.strip()]
    packs = {}
    for size in sizes:
        out = work / f"shards-{size}"
        wall, rss, _, _ = measure([str(BIN / "cifar-pack"), str(folder), "--out", str(out), "--shard-size", size])
        parts = len(list(out.glob("*.parquet")))
        packs[size] = (out, wall, rss, parts)

    infer = [str(BIN / "cifar-infer"), "--model", args.model, "--format", "parquet", "--progress", "none"]
    big = packs[sizes[-1]][0]
    results: dict[str, list[tuple[float, int, int]]] = {}

    def rounds(pipelines: dict[str, list[str]]) -> None:
        for r in range(args.runs):
            for name, cmd in pipelines.items():
                out = work / f"out-{len(results)}-{r}"
                wall, driver, actor, _ = measure(cmd + ["--output", str(out)], env)
                rows, _ = count_rows(out)
                if rows != n:
                    sys.exit(f"{name}: {rows:,} rows for {n:,} images")
                shutil.rmtree(out)
                results.setdefault(name, []).append((wall, driver, actor))
                print(f"run {r + 1}/{args.runs} {name:<26} {wall:7.2f} s {n / wall:9,.0f} images/s", file=sys.stderr)

    # Phase 1, no cluster running: the Ray engine starts its own local Ray (and stops it).
    if not args.skip_own:
        rounds({"local, folder": infer + [str(folder)], "ray (own), folder": infer + ["--engine", "ray", str(folder)]})
    # Phase 2, a head started here first, as a cluster is when jobs arrive.
    address = "127.0.0.1:6390"
    heads.append(start_head(args.cpus, 6390, env))
    on_cluster = ["--engine", "ray", "--ray-address", address]
    # A warm-up: the first job on a cluster starts Ray Data's own actors, which later jobs find running.
    measure(infer + on_cluster + [str(folder / "rep000"), "--output", str(work / "warm")], env)
    phase2 = {
        "local, folder (2)": infer + [str(folder)],
        "ray (cluster), folder": infer + on_cluster + [str(folder)],
        "local, shards": infer + [str(big)],
        "ray (cluster), shards": infer + on_cluster + [str(big)],
    }
    for size in sizes[:-1]:
        phase2[f"local, shards {size}"] = infer + [str(packs[size][0])]
    rounds(phase2)

    cores = os.cpu_count()
    print(f"\n{n:,} images (the CIFAR-10 test set replicated), {cores} CPU cores, {args.runs} runs each (median)")
    print(f"{'pipeline':<28}{'wall s':>8}{'images/s':>11}{'vs local':>10}{'driver RSS':>13}{'actor RSS':>12}")
    for name, rows in results.items():
        base_name = "local, folder (2)" if name in phase2 else "local, folder"
        base = statistics.median(w for w, _, _ in results[base_name])
        wall = statistics.median(w for w, _, _ in rows)
        driver = max(d for _, d, _ in rows) / 1024
        actor = max(a for _, _, a in rows) / 1024
        actor_text = f"{actor:9,.0f} MiB" if actor else f"{'-':>12}"
        print(f"{name:<28}{wall:8.2f}{n / wall:11,.0f}{base / wall:9.2f}x{driver:9,.0f} MiB{actor_text}")
    print("(vs local: against the local engine on the folder in the same phase; (2): with the Ray head running)")
    print()
    for size, (out, wall, rss, parts) in packs.items():
        mib = sum(f.stat().st_size for f in out.glob("*.parquet")) / 2**20
        print(f"cifar-pack --shard-size {size:<5}: {wall:6.2f} s ({n / wall:8,.0f} files/s), {parts} shards "
              f"({mib:,.0f} MiB), peak RSS {rss / 1024:,.0f} MiB")  # fmt: skip


if __name__ == "__main__":
    main()
