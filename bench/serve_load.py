"""Serving load: cifar-serve under 1, 16 and 64 concurrent clients, single-image and batch requests, against
cifar-infer on the same images, in one run.

Every service runs in a subprocess on 127.0.0.1, started by this script and stopped by its pid at the end:

- serve (direct):  `cifar-serve MODEL` (its default: each replica answers HTTP itself; Ray Serve places, restarts
                   and batches with @serve.batch);
- serve (proxy):   `cifar-serve MODEL --ingress proxy` (Ray Serve's HTTP proxy in front of the replica), with
                   --ingress direct,proxy;
- plain:           with --plain, one Python process without Ray: the same handler (cifarkit.serve.handler), the same
                   aiohttp server (cifarkit.serve.direct) and the same batching rule (max batch, wait), with a plain
                   asyncio batcher in place of @serve.batch: what Ray Serve costs on top.

The load generator (aiohttp, this process) keeps C clients busy, each sending its next request when the last is
answered, until --requests requests or --seconds have passed (whichever first; a short warm-up before each). Every
answer is checked against cifar-infer's label for its image (`wrong` counts the others; `errors` the non-200s and
failed connections). The server side's CPU time per request is read from /proc (the service's processes) and so
is the load generator's: they share the machine's cores. cifar-infer's images/s (a subprocess on a folder of the
same images, process start included, median of --runs) is the reference. Never fails on timing.

    python bench/serve_load.py --model runs/blog/model.onnx --data $CIFARKIT_DATA --plain
    python bench/serve_load.py --model runs/blog/model.onnx --seconds 3 --requests 2000   # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
CLIENTS = (1, 16, 64)


# ---------------------------------------------------------------------------------------------------------
# The plain reference server (run in a child process: --child-plain)
# ---------------------------------------------------------------------------------------------------------


class Batcher:
    """@serve.batch's rule without Ray: the first waiting image opens a batch, which runs when it holds max_batch
    images or wait_s has passed; one batch runs at a time (in a thread), the next gathers meanwhile."""

    def __init__(self, clf, max_batch: int, wait_s: float) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.clf, self.max_batch, self.wait_s = clf, max_batch, wait_s
        self.queue: asyncio.Queue = asyncio.Queue()
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.worker = asyncio.get_running_loop().create_task(self._run())

    async def classify(self, pixels, top_k: int):
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((pixels, top_k, future))
        return await future

    async def _run(self) -> None:
        from cifarkit.serve.handler import run_batch

        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            deadline = loop.time() + self.wait_s
            while len(items) < self.max_batch:
                if self.queue.empty():
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    with contextlib.suppress(asyncio.TimeoutError):
                        items.append(await asyncio.wait_for(self.queue.get(), remaining))
                    continue
                items.append(self.queue.get_nowait())
            try:
                results = await loop.run_in_executor(self.pool, run_batch, self.clf, [(p, k) for p, k, _ in items])
            except Exception as exc:  # the model failed: every request of the batch gets the error
                results = [exc] * len(items)
            for (_, _, future), result in zip(items, results, strict=True):
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)


def child_plain(model: str, port: int, max_batch: int, wait_ms: float) -> None:
    from cifarkit.infer.classifier import Classifier
    from cifarkit.serve.config import ServeConfig
    from cifarkit.serve.direct import DirectServer
    from cifarkit.serve.handler import Handler

    async def main() -> None:
        clf = Classifier.from_file(model, intra_op_threads=1, device="cpu")  # a replica's default: 1 CPU
        cfg = ServeConfig(model=model, port=port, max_batch=max_batch, batch_wait_ms=wait_ms)
        batcher = Batcher(clf, max_batch, wait_ms / 1000)
        info = {**clf.meta.to_dict(), "model_file": os.path.basename(model), "replica": {"pid": os.getpid()}}
        await DirectServer.start(Handler(clf, cfg, batcher.classify, info), "127.0.0.1", port)
        print(f"ready: http://127.0.0.1:{port}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------------------
# Services and processes
# ---------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(cmd: list[str], timeout: float = 300) -> subprocess.Popen:
    """`cmd` in a session of its own, once it printed its `ready:` line."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + timeout
    for line in proc.stdout:  # type: ignore[union-attr]
        if line.startswith("ready: "):
            return proc
        if time.monotonic() > deadline:
            break
    stop_service(proc)
    sys.exit(f"failed to start: {' '.join(cmd)}\n{proc.stderr.read()[-2000:]}")  # type: ignore[union-attr]


def stop_service(proc: subprocess.Popen) -> None:
    """SIGTERM to the service's pid (cifar-serve then stops its Ray); its session is killed if it does not end."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


def tree_cpu_s(root: int) -> float:
    """CPU seconds (user + system) of `root` and its live descendants, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()
                stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    total, todo, seen = 0.0, [root], set()
    while todo:
        pid = todo.pop()
        if pid in seen or pid not in stats:
            continue
        seen.add(pid)
        total += stats[pid][1]
        todo.extend(p for p, (ppid, _) in stats.items() if ppid == pid)
    return total


# ---------------------------------------------------------------------------------------------------------
# The load generator
# ---------------------------------------------------------------------------------------------------------


async def drive(
    url: str, images: list[bytes], labels: list[str], clients: int, batch: int, requests: int, seconds: float
) -> dict:
    """Keep `clients` requests in flight (single images, or `batch` images per multipart request) until `requests`
    have been sent or `seconds` have passed: latencies, errors and wrong answers."""
    import aiohttp

    from cifarkit.multipart import encode

    latencies: list[float] = []
    tally = {"errors": 0, "wrong": 0, "images": 0, "sent": 0}
    stop = time.perf_counter() + seconds

    async def one(session: aiohttp.ClientSession, start: int) -> None:
        idx = [(start + j) % len(images) for j in range(batch or 1)]
        if batch:
            body, ctype = encode([(f"{i}.jpg", images[i]) for i in idx])
            path = "/v1/classify-batch"
        else:
            body, ctype, path = images[idx[0]], "image/jpeg", "/v1/classify"
        t0 = time.perf_counter()
        try:
            async with session.post(url + path, data=body, headers={"Content-Type": ctype}) as r:
                answer = await r.json() if r.status == 200 else None
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            answer = None
        latencies.append(time.perf_counter() - t0)
        if answer is None:
            tally["errors"] += 1
            return
        got = [a.get("label") for a in answer["results"]] if batch else [answer.get("label")]
        tally["wrong"] += sum(g != labels[i] for g, i in zip(got, idx, strict=False)) + abs(len(got) - len(idx))
        tally["images"] += len(idx)

    async def client(session: aiohttp.ClientSession, c: int) -> None:
        k = c * 7919  # each client walks the images from its own place
        while time.perf_counter() < stop and tally["sent"] < requests:
            tally["sent"] += 1
            await one(session, k)
            k += batch or 1

    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(session, c) for c in range(clients)))
        wall = time.perf_counter() - t0
    return {"wall": wall, "latencies": latencies, **tally}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------


def prepare_images(args: argparse.Namespace, folder: Path) -> list[Path]:
    """--images JPEGs in `folder`: the first of the real test set (--data), else synthetic CIFAR-sized ones."""
    folder.mkdir(parents=True)
    test = Path(args.data or "") / "test"
    if args.data and test.is_dir():
        files = sorted(p for p in test.rglob("*.jpg"))[: args.images]
        for i, f in enumerate(files):
            try:
                os.link(f, folder / f"{i:06d}.jpg")
            except OSError:  # another filesystem
                (folder / f"{i:06d}.jpg").write_bytes(f.read_bytes())
        return sorted(folder.glob("*.jpg"))
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    print("no --data: synthetic 32x32 JPEGs (quality 75)", file=sys.stderr)
    for i in range(args.images):
        img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(img).save(folder / f"{i:06d}.jpg", quality=75)
    return sorted(folder.glob("*.jpg"))


def reference(args: argparse.Namespace, folder: Path, work: Path) -> tuple[float, list[str]]:
    """cifar-infer on the folder: (median images/s, process start included; the label of each image)."""
    rates, labels = [], []
    n = len(list(folder.glob("*.jpg")))
    for r in range(args.runs):
        out = work / f"infer-{r}.csv"
        cmd = [str(BIN / "cifar-infer"), str(folder), "--model", args.model, "--format", "csv", "--output", str(out)]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        rates.append(n / (time.perf_counter() - t0))
        with open(out, newline="") as f:
            labels = [row["label"] for row in csv.DictReader(f)]
    return statistics.median(rates), labels


def measure(name: str, proc: subprocess.Popen, url: str, images: list[bytes], labels: list[str], args) -> list[dict]:
    rows = []
    for endpoint, batch in (("single", 0), ("batch", args.batch_images)):
        for clients in CLIENTS:
            asyncio.run(drive(url, images, labels, clients, batch, max(clients, 50), min(1.0, args.seconds)))  # warm
            server0, me0 = tree_cpu_s(proc.pid), time.process_time()  # the load generator: this process alone
            res = asyncio.run(drive(url, images, labels, clients, batch, args.requests, args.seconds))
            sent = max(res["sent"], 1)
            server_ms = 1e3 * (tree_cpu_s(proc.pid) - server0) / sent
            client_ms = 1e3 * (time.process_time() - me0) / sent
            res.update(name=name, endpoint=endpoint, clients=clients, server_ms=server_ms, client_ms=client_ms)
            rows.append(res)
            lat = res["latencies"]
            print(f"{name:<16}{endpoint:<7}{clients:>3} clients: {res['sent'] / res['wall']:8,.0f} req/s  "
                  f"p99 {1e3 * percentile(lat, 0.99):7.1f} ms  errors {res['errors']}  wrong {res['wrong']}",
                  file=sys.stderr)  # fmt: skip
    return rows


def report(rows: list[dict], infer_rate: float, n: int, args: argparse.Namespace) -> None:
    limits = f"--seconds {args.seconds:g} and --requests {args.requests:,} per setting"
    print(f"\n{n:,} images, {os.cpu_count()} CPU cores; {limits}; batch requests of {args.batch_images} images")
    print(f"cifar-infer on the same images (process start included): {infer_rate:,.0f} images/s")
    head = f"{'service':<16}{'endpoint':<9}{'clients':>7}{'req/s':>9}{'images/s':>10}{'vs infer':>9}"
    print(
        head
        + f"{'p50 ms':>8}{'p95 ms':>8}{'p99 ms':>8}{'errors':>7}{'wrong':>6}{'server ms/req':>14}{'client ms/req':>14}"
    )
    for r in rows:
        lat, wall = r["latencies"], r["wall"]
        ips = r["images"] / wall
        print(f"{r['name']:<16}{r['endpoint']:<9}{r['clients']:>7}{r['sent'] / wall:9,.0f}{ips:10,.0f}"
              f"{ips / infer_rate:8.2f}x{1e3 * percentile(lat, 0.5):8.1f}{1e3 * percentile(lat, 0.95):8.1f}"
              f"{1e3 * percentile(lat, 0.99):8.1f}{r['errors']:>7}{r['wrong']:>6}{r['server_ms']:14.2f}"
              f"{r['client_ms']:14.2f}")  # fmt: skip
    base = {(r["endpoint"], r["clients"]): r for r in rows if r["name"] == rows[0]["name"]}
    others = [r for r in rows if r["name"] != rows[0]["name"]]
    if others:
        print(f"\nrequests/s against {rows[0]['name']}:")
        for r in others:
            b = base[(r["endpoint"], r["clients"])]
            print(f"  {r['name']:<16}{r['endpoint']:<7}{r['clients']:>3} clients: "
                  f"{(r['sent'] / r['wall']) / max(b['sent'] / b['wall'], 1e-9):.2f}x")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="runs/demo/model.onnx", help="exported model.onnx")
    p.add_argument("--data", default=os.environ.get("CIFARKIT_DATA"), help="ImageFolder root with test/ (real JPEGs)")
    p.add_argument("--images", type=int, default=2000, help="distinct images sent (cycled)")
    p.add_argument("--seconds", type=float, default=10.0, help="time limit per setting")
    p.add_argument("--requests", type=int, default=20_000, help="request limit per setting")
    p.add_argument("--batch-images", type=int, default=32, help="images per batch request")
    p.add_argument("--ingress", default="direct", help="cifar-serve ingress modes to measure: direct, proxy or both")
    p.add_argument("--plain", action="store_true", help="also the plain one-process server (no Ray)")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--batch-wait-ms", type=float, default=5.0)
    p.add_argument("--runs", type=int, default=3, help="cifar-infer runs (median)")
    p.add_argument("--child-plain", type=int, help=argparse.SUPPRESS)  # the plain server's port
    args = p.parse_args()
    if args.child_plain:
        child_plain(args.model, args.child_plain, args.max_batch, args.batch_wait_ms)
        return
    if not Path(args.model).is_file():
        print(f"bench/serve_load.py: skipped, no model at {args.model} (pass --model)", file=sys.stderr)
        return
    try:
        import aiohttp  # noqa: F401
        import ray.serve  # noqa: F401
    except ImportError:
        print("bench/serve_load.py: skipped, it needs Ray Serve: pip install 'cifarkit[serve]'", file=sys.stderr)
        return
    with tempfile.TemporaryDirectory(prefix="cifarkit-bench-serve-") as tmp:
        run(args, Path(tmp))


def run(args: argparse.Namespace, work: Path) -> None:
    folder = work / "images"
    paths = prepare_images(args, folder)
    images = [p.read_bytes() for p in paths]
    infer_rate, labels = reference(args, folder, work)
    knobs = ["--max-batch", str(args.max_batch), "--batch-wait-ms", str(args.batch_wait_ms)]
    services: dict[str, list[str]] = {}
    for ingress in [m.strip() for m in args.ingress.split(",") if m.strip()]:
        services[f"serve ({ingress})"] = [str(BIN / "cifar-serve"), args.model, "--ingress", ingress, *knobs]
    if args.plain:
        services["plain"] = [sys.executable, __file__, "--model", args.model, *knobs, "--child-plain"]
    rows: list[dict] = []
    for name, cmd in services.items():
        port = free_port()
        cmd = cmd + [str(port)] if name == "plain" else cmd + ["--port", str(port)]
        proc = start_service(cmd)
        try:
            rows += measure(name, proc, f"http://127.0.0.1:{port}", images, labels, args)
        finally:
            stop_service(proc)
    report(rows, infer_rate, len(images), args)


if __name__ == "__main__":
    main()
