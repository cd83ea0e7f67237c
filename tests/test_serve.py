"""cifar-serve (cifarkit.serve) and the HTTP engine (cifarkit.infer.http): the real console script in a subprocess,
on a local Ray, shared by the tests of this module (it starts in ~10 s on 2 busy cores). Answers agree with the
local engine image for image; every bad request is a 4xx with one line of JSON and the replica keeps serving; a
replica killed with SIGKILL is replaced and no answer is ever wrong; SIGTERM ends the service with exit 143 and no
Ray process left. No assertion depends on the machine's speed: waits are bounded by generous timeouts only."""

from __future__ import annotations

import contextlib
import io
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cifarkit.cli import serve as serve_cli
from cifarkit.errors import CifarkitError
from cifarkit.files import Failure
from cifarkit.infer import Classifier, InferConfig, Prediction, open_engine
from cifarkit.infer.inputs import InputPlan
from cifarkit.infer.sinks import Writer
from conftest import run_cli, synthetic_images

pytest.importorskip("ray.serve")
requests = pytest.importorskip("requests")

BIN = Path(sys.executable).parent
START_TIMEOUT_S = 240  # a cold start of Ray and the replicas on 2 busy cores takes ~10 s; this only bounds a hang
MAX_BYTES = 2 << 20  # the shared service's --max-bytes


# ---------------------------------------------------------------------------------------------------------
# The service: `cifar-serve` in a subprocess of its own session, stopped by its pid
# ---------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_tree(root: int) -> set[int]:
    """The live descendants of `root` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()
                if fields[0] != "Z":
                    children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Server:
    """`cifar-serve MODEL --port P ...` started in a session of its own; `url` once it printed its ready line."""

    def __init__(self, model: Path, *args: str) -> None:
        self.port = free_port()
        cmd = [str(BIN / "cifar-serve"), str(model), "--port", str(self.port), *args]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.url = ""
        self.ray_pids: set[int] = set()

    def ready(self) -> Server:
        """Wait for the ready line (the URL), then note Ray's processes, started by this service."""
        if not self.url:
            self.url = self._wait_ready()
            self.ray_pids = process_tree(self.proc.pid)
        return self

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.lines.put(line)
        self.lines.put(None)

    def _wait_ready(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                break
            if line.startswith("ready: "):
                return line.split()[1]
        self.stop(signal.SIGKILL)
        pytest.fail(f"cifar-serve did not get ready: {self.proc.stderr.read()[-3000:]}")  # type: ignore[union-attr]
        return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 90) -> int:
        """Send `sig` to the service's pid and wait; one that does not end in time is killed with its session."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the session this test started, by its id
                self.proc.wait(30)
        return self.proc.returncode


@pytest.fixture(scope="module")
def model_path(exported) -> Path:
    return Path(exported.paths["onnx"])


@pytest.fixture(scope="module")
def servers(model_path):
    """The module's two services, started side by side (Ray's start-up is mostly waiting): the default direct
    ingress with two replicas (SO_REUSEPORT on one port) and a small --max-bytes, shared by most tests; and one
    behind Ray Serve's HTTP proxy, which the SIGTERM test ends."""
    started = []
    try:
        started.append(Server(model_path, "--replicas", "2", "--max-bytes", f"{MAX_BYTES}"))
        started.append(Server(model_path, "--ingress", "proxy", "--max-batch", "16"))
        yield started
    finally:
        for server in started:
            server.stop()


@pytest.fixture(scope="module")
def service(servers) -> Server:
    return servers[0].ready()


@pytest.fixture(scope="module")
def proxy_service(servers) -> Server:
    return servers[1].ready()


@pytest.fixture(scope="module")
def images(tmp_path_factory, model_path) -> tuple[list[Path], list[Prediction]]:
    """200 JPEGs and what Classifier.predict (cifar-infer's engine) answers for each, top 3."""
    folder = tmp_path_factory.mktemp("serve-images")
    x, _ = synthetic_images(200, seed=21, size=40)  # 40x40: the resize rule applies, as for any photo
    paths = []
    for i, img in enumerate(x):
        paths.append(folder / f"{i:03d}.jpg")
        Image.fromarray(img).save(paths[-1], quality=90)
    return paths, Classifier.from_file(model_path).predict(paths, top_k=3)


def same(answer: dict, want: Prediction) -> bool:
    """An HTTP answer is the local engine's: label, index, top-k labels, probabilities within 1e-6."""
    return (
        answer.get("label") == want.label
        and answer.get("index") == want.index
        and abs(answer["probability"] - want.probability) <= 1e-6
        and [t["label"] for t in answer["top_k"]] == [label for label, _ in want.top_k]
        and all(abs(t["probability"] - p) <= 1e-6 for t, (_, p) in zip(answer["top_k"], want.top_k, strict=True))
    )


def classify(url: str, data: bytes, top_k: int = 3) -> requests.Response:
    return requests.post(f"{url}/v1/classify?top_k={top_k}", data=data, headers={"Content-Type": "image/jpeg"},
                         timeout=60)  # fmt: skip


def one_line_error(response: requests.Response) -> str:
    text = response.content.decode()
    assert "\n" not in text.strip(), text
    body = json.loads(text)
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], body
    return body["error"]


# ---------------------------------------------------------------------------------------------------------
# Options and installation, before anything starts
# ---------------------------------------------------------------------------------------------------------


def cli(*args: object) -> tuple[int, str, str]:
    return run_cli(serve_cli.main, *args)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("--port", "0"), "--port"),
        (("--port", "70000"), "--port"),
        (("--replicas", "0"), "--replicas"),
        (("--max-batch", "0"), "--max-batch"),
        (("--batch-wait-ms", "nan"), "--batch-wait-ms"),
        (("--max-bytes", "12XB"), "--max-bytes"),
        (("--max-bytes", "2G"), "--max-bytes"),
        (("--ingress", "haproxy"), "--ingress"),
        (("--name", "a b"), "--name"),
        (("--replica-cpus", "0"), "--replica-cpus"),
    ],
)
def test_a_bad_option_is_one_line_and_exit_2(model_path, args, named):
    code, out, err = cli(model_path, *args)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and named in err, err


def test_a_missing_model_is_one_line_and_exit_2(tmp_path):
    code, _, err = cli(tmp_path / "missing.onnx")
    assert code == 2 and err.count("\n") == 1 and "missing.onnx" in err


def test_without_ray_serve_it_names_the_pip_command(model_path, monkeypatch):
    import ray

    monkeypatch.setitem(sys.modules, "ray.serve", None)  # importing ray.serve raises ImportError
    monkeypatch.delattr(ray, "serve", raising=False)
    monkeypatch.setattr("cifarkit.serve.processes.become_subreaper", lambda: False)  # not for the test process
    code, _, err = cli(model_path)
    assert code == 2 and err == "error: cifar-serve needs Ray Serve: pip install 'cifarkit[serve]'\n"


def test_the_command_module_stays_light():
    """Options are checked before Ray, numpy or the web stack are imported."""
    code = "import json, sys, cifarkit.cli.serve; print(json.dumps(sorted(sys.modules)))"
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    heavy = ("ray", "numpy", "onnxruntime", "starlette", "aiohttp", "PIL", "torch")
    assert not [m for m in loaded if m.split(".")[0] in heavy]


def test_url_option_goes_with_engine_http():
    base = {"inputs": ("x",), "model": "m.onnx"}
    InferConfig(**base, engine="http", url="http://127.0.0.1:8000").validate()
    InferConfig(inputs=("x",), engine="http", url="http://127.0.0.1:8000").validate()  # no model needed
    for bad, words in [
        ({"engine": "http"}, "--engine http needs --url"),
        ({"url": "http://127.0.0.1:8000"}, "--url goes with --engine http"),
        ({"engine": "http", "url": "ftp://x"}, "--url must look like"),
        ({"engine": "http", "url": "http://h:8000/v1/classify"}, "without a path"),
        ({"engine": "http", "url": "http://h:99999"}, "--url"),
    ]:
        with pytest.raises(CifarkitError, match=words):
            InferConfig(**base, **bad).validate()


# ---------------------------------------------------------------------------------------------------------
# Answers
# ---------------------------------------------------------------------------------------------------------


def test_answers_agree_with_the_local_engine(service, images):
    paths, want = images
    blobs = [p.read_bytes() for p in paths]
    with ThreadPoolExecutor(8) as pool:  # concurrent clients: their images share model calls
        answers = list(pool.map(lambda b: classify(service.url, b), blobs))
    assert [a.status_code for a in answers] == [200] * len(paths)
    assert all(same(a.json(), w) for a, w in zip(answers, want, strict=True))
    files = [("image", (p.name, b, "image/jpeg")) for p, b in zip(paths, blobs, strict=True)]
    batch = requests.post(f"{service.url}/v1/classify-batch?top_k=3", files=files, timeout=60)
    results = batch.json()["results"]
    assert [r["name"] for r in results] == [p.name for p in paths]
    assert all(same(r, w) for r, w in zip(results, want, strict=True))
    single = requests.post(f"{service.url}/v1/classify", files={"image": ("x.jpg", blobs[0])}, timeout=60).json()
    assert single["label"] == want[0].label and len(single["top_k"]) == 1  # multipart with one file; top_k=1


def test_model_description_and_health(service, model_path):
    model = requests.get(f"{service.url}/v1/model", timeout=30).json()
    clf = Classifier.from_file(model_path)
    assert tuple(model["class_names"]) == clf.labels and model["model_name"] == clf.meta.model_name
    assert model["image_size"] == [32, 32] and model["input_dtype"] == "uint8" and model["model_file"] == "model.onnx"
    assert model["serving"]["max_bytes"] == MAX_BYTES and model["serving"]["replicas"] == 2
    assert isinstance(model["replica"]["pid"], int) and model["runtime"]["ray"]
    assert requests.get(f"{service.url}/healthz", timeout=30).json() == {"status": "ok"}


def _bomb_png() -> bytes:
    """A valid PNG header claiming 30,000 x 30,000 pixels (900 megapixels, over Pillow's limit)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = (30_000).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")
    )


def _chunked(data: bytes, size: int = 64 << 10):
    for start in range(0, len(data), size):
        yield data[start : start + size]


JPEG, PNG, JSON = ({"Content-Type": t} for t in ("image/jpeg", "image/png", "application/json"))
MULTIPART = {"Content-Type": "multipart/form-data; boundary=x"}
BAD_REQUESTS = {
    # name: (method, path, keyword arguments for requests, expected status)
    "empty body": ("POST", "/v1/classify", {"data": b"", "headers": JPEG}, 400),
    "not an image": ("POST", "/v1/classify", {"data": b"hello " * 100, "headers": PNG}, 422),
    "truncated jpeg": ("POST", "/v1/classify", {"data": "TRUNCATED", "headers": JPEG}, 422),
    "decompression bomb": ("POST", "/v1/classify", {"data": "BOMB", "headers": PNG}, 422),
    "over max-bytes": ("POST", "/v1/classify", {"data": b"\xff" * (MAX_BYTES + 1)}, 413),
    "over max-bytes, chunked": ("POST", "/v1/classify", {"data": "CHUNKED"}, 413),
    "wrong content type": ("POST", "/v1/classify", {"data": b"{}", "headers": JSON}, 415),
    "form-encoded (curl -d)": ("POST", "/v1/classify", {"data": {"a": "b"}}, 415),
    "wrong method": ("GET", "/v1/classify", {}, 405),
    "batch without multipart": ("POST", "/v1/classify-batch", {"data": b"x", "headers": JPEG}, 415),
    "broken multipart": ("POST", "/v1/classify-batch", {"data": b"--x\r\nno end", "headers": MULTIPART}, 400),
    "bad top_k": ("POST", "/v1/classify?top_k=99", {"data": "GOOD", "headers": JPEG}, 400),
    "unknown query": ("POST", "/v1/classify?topk=3", {"data": "GOOD", "headers": JPEG}, 400),
    "unknown path": ("GET", "/v2/everything", {}, 404),
}  # fmt: skip


def _request_kwargs(kwargs: dict, good: bytes) -> dict:
    special = {
        "TRUNCATED": good[: len(good) // 2],
        "BOMB": _bomb_png(),
        "CHUNKED": _chunked(b"\xff" * (MAX_BYTES + (256 << 10))),
        "GOOD": good,
    }
    data = kwargs.get("data")
    return {**kwargs, "data": special[data]} if isinstance(data, str) else dict(kwargs)


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_a_bad_request_is_a_4xx_and_the_replica_keeps_serving(service, images, case):
    paths, want = images
    method, path, kwargs, status = BAD_REQUESTS[case]
    good = paths[7].read_bytes()
    response = requests.request(method, service.url + path, timeout=60, **_request_kwargs(kwargs, good))
    assert response.status_code == status, response.text
    message = one_line_error(response)
    if case == "decompression bomb":
        assert "pixel limit" in message or "decompression bomb" in message
    after = classify(service.url, good)
    assert after.status_code == 200 and same(after.json(), want[7])


def test_a_burst_of_good_and_bad_requests_answers_each_its_own(service, images):
    paths, want = images
    blobs = [p.read_bytes() for p in paths]
    bad = ["not an image", "truncated jpeg", "empty body", "wrong content type", "bad top_k", "decompression bomb"]

    def client(t: int) -> list[str]:
        problems = []
        for j in range(24):
            i = (t * 24 + j) % len(paths)
            if j % 3 == 2:  # a bad request between good ones
                method, path, kwargs, status = BAD_REQUESTS[bad[(t + j) % len(bad)]]
                r = requests.request(method, service.url + path, timeout=60, **_request_kwargs(kwargs, blobs[i]))
                if r.status_code != status:
                    problems.append(f"bad request answered {r.status_code}")
            else:
                r = classify(service.url, blobs[i])
                if r.status_code != 200 or not same(r.json(), want[i]):
                    problems.append(f"image {i}: {r.status_code} {r.text[:200]}")
        return problems

    with ThreadPoolExecutor(8) as pool:
        problems = [p for ps in pool.map(client, range(8)) for p in ps]
    assert problems == []


# ---------------------------------------------------------------------------------------------------------
# The HTTP engine
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def odd(tmp_path_factory) -> Path:
    """Images for every path of the decoder, and files that are not images."""
    root = tmp_path_factory.mktemp("odd")
    x, _ = synthetic_images(10, seed=9, size=48)
    for i, img in enumerate(x[:5]):
        Image.fromarray(img).save(root / f"plain{i}.jpg", quality=90)
    Image.fromarray(np.kron(x[5], np.ones((8, 10, 1), np.uint8))).save(root / "big.jpg", quality=90)
    Image.fromarray(x[6]).convert("L").save(root / "gray.jpg")
    Image.fromarray(np.dstack([x[7], np.full((48, 48), 128, np.uint8)])).save(root / "alpha.png")
    Image.fromarray(x[8]).save(root / "anim.gif")
    (root / "broken.jpg").write_text("not an image\n" * 10)
    (root / "empty.png").write_bytes(b"")
    data = (root / "plain0.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / os.fsdecode(b"na\xefve\nname.jpg")).write_bytes(data)  # not UTF-8, a newline
    (root / "photo.heic").write_bytes(b"\0\0\0\x18ftypheic" + b"\0" * 64)
    return root


def _csv(results: list, labels: tuple[str, ...]) -> str:
    f = io.StringIO()
    writer = Writer(f, "csv", labels, 3)
    writer.start()
    for r in results:
        if isinstance(r, Prediction):
            writer.row(r)
    return f.getvalue()


def test_http_engine_rows_equal_the_local_engine(service, model_path, odd, tmp_path):
    inputs = [odd, odd / "photo.heic", tmp_path / "missing.jpg"]  # a file named explicitly is tried whatever it is
    local = list(Classifier.from_file(model_path).predict_paths(InputPlan.resolve(inputs).items(), top_k=3))
    assert sum(isinstance(r, Failure) for r in local) == 5  # broken, empty, truncated, heic, missing
    with open_engine(service.url, engine="http", threads=3) as engine:
        assert engine.labels == Classifier.from_file(model_path).labels and engine.source == "model.onnx"
        got = list(engine.predict(inputs, top_k=3, batch_size=4))
    assert [r.source for r in got] == [r.source for r in local]
    for g, w in zip(got, local, strict=True):
        assert type(g) is type(w), (g, w)
        if isinstance(w, Failure):
            assert g.message == w.message
        else:
            assert (g.label, g.index) == (w.label, w.index) and abs(g.probability - w.probability) <= 1e-6
    assert _csv(got, engine.labels) == _csv(local, engine.labels)  # the rows cifar-infer writes, escaping included


def test_http_engine_with_nothing_at_the_url_is_one_line():
    with pytest.raises(CifarkitError, match=r"--url http://127\.0\.0\.1:\d+: no cifar-serve answers there"):
        open_engine(f"http://127.0.0.1:{free_port()}", engine="http")


# ---------------------------------------------------------------------------------------------------------
# Faults
# ---------------------------------------------------------------------------------------------------------


def test_a_killed_replica_is_replaced_and_no_answer_is_wrong(service, images):
    paths, want = images
    blobs = [p.read_bytes() for p in paths]
    victim = requests.get(f"{service.url}/v1/model", timeout=30).json()["replica"]["pid"]
    stop = threading.Event()
    tally = {"ok": 0, "errors": 0, "wrong": []}

    def load(t: int) -> None:
        i = t
        while not stop.is_set():
            try:
                r = classify(service.url, blobs[i % len(blobs)])
            except requests.RequestException:
                tally["errors"] += 1  # the killed replica's connections: refused or reset
                time.sleep(0.05)
                continue
            if r.status_code != 200:
                tally["errors"] += 1
            elif same(r.json(), want[i % len(blobs)]):
                tally["ok"] += 1
            else:
                tally["wrong"].append(i)
            i += 4

    workers = [threading.Thread(target=load, args=(t,)) for t in range(4)]
    for w in workers:
        w.start()
    try:
        time.sleep(0.5)
        os.kill(victim, signal.SIGKILL)  # a replica process of the service, by its pid
        deadline = time.monotonic() + START_TIMEOUT_S
        pids: set[int] = set()
        while time.monotonic() < deadline and not (len(pids) == 2 and victim not in pids):
            # Two live replicas again, the victim not one of them; a new connection each time (SO_REUSEPORT: either).
            with contextlib.suppress(requests.RequestException), requests.Session() as s:
                pids.add(s.get(f"{service.url}/v1/model", timeout=10).json()["replica"]["pid"])
            pids = {p for p in pids if running(p)}
            time.sleep(0.2)
    finally:
        stop.set()
        for w in workers:
            w.join(60)
    print(f"killed replica {victim}: {tally['ok']} correct answers, {tally['errors']} errors, replicas now {pids}")
    assert tally["wrong"] == [] and tally["ok"] > 0
    assert len(pids) == 2 and victim not in pids, "the killed replica was not replaced"


def test_sigterm_ends_cifar_serve_with_143_and_no_ray_process_left(proxy_service, images):
    """Behind Ray Serve's own HTTP proxy this time (--ingress proxy): it answers the same, then SIGTERM ends it."""
    paths, want = images
    server = proxy_service
    try:
        assert any("ServeReplica" in Path(f"/proc/{p}/cmdline").read_text(errors="replace") for p in server.ray_pids
                   if running(p))  # fmt: skip
        good = classify(server.url, paths[3].read_bytes())
        assert good.status_code == 200 and same(good.json(), want[3])
        bad = classify(server.url, b"not an image")
        assert bad.status_code == 422 and "request body" in one_line_error(bad)
        code = server.stop(signal.SIGTERM)
    finally:
        server.stop(signal.SIGKILL)
    assert code == 143 and server.proc.stderr.read().strip().splitlines()[-1] == "terminated"  # type: ignore[union-attr]
    left = [p for p in server.ray_pids if running(p)]
    assert left == [], f"Ray processes left running: {left}"
