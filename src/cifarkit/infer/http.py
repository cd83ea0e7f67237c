"""The HTTP engine: the inputs of an InputPlan classified by a running cifar-serve, with the results, their order and
the failure rule of the local engine. Standard library only (http.client): no Ray, no aiohttp in the client.

    from cifarkit.infer import open_engine
    with open_engine("http://127.0.0.1:8000", engine="http") as engine:      # labels and source from GET /v1/model
        for r in engine.predict(["photos/"], top_k=3):
            ...

Image files are read here (cifarkit.files.read_regular) and sent as they are, shard rows (Blobs) too, in batches of
`batch_size` images per POST /v1/classify-batch, `threads` requests in flight (cifarkit.files.ordered_map: results in
input order, memory bounded by the window). An input that cannot be read, or that the server refuses, is a Failure
naming the input, worded as the local engine words it: every file part is named by its position and extension, and
the server's message is given back the input's own name. A request that fails (refused connection, a replica
restarting, 5xx) is retried RETRIES times; after that, its images are Failures saying so.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

from cifarkit.errors import CifarkitError, first_line
from cifarkit.files import Blob, Failure, chunked, ordered_map, read_regular
from cifarkit.infer.classifier import Prediction, Result
from cifarkit.infer.config import DEFAULT_BATCH_SIZE, check_url
from cifarkit.infer.protocol import Engine, as_plan
from cifarkit.multipart import encode

DEFAULT_REQUESTS = 4  # requests in flight: enough for the server to gather batches across them
RETRIES = 3  # attempts after the first, for a refused connection or a 5xx (a replica being replaced: ~5 s)
BACKOFF_S = (0.5, 1.0, 2.0)
TIMEOUT_S = 300.0  # per request: a batch of big photos on a busy server
PART_OVERHEAD = 256  # multipart bytes per file besides its data (boundary, headers), to stay under --max-bytes
_EXTENSION = re.compile(r"\.[A-Za-z0-9]{1,10}$")


class HttpEngine(Engine):
    """A cifar-serve at `url`: its model's labels and file name come from GET /v1/model."""

    def __init__(self, url: str, info: dict[str, Any], *, threads: int | None = None) -> None:
        self.url = url.rstrip("/")
        self.scheme, self.host, self.port = check_url(self.url)
        self.labels = tuple(str(c) for c in info.get("class_names", ()))
        self.source = str(info.get("model_file") or self.url)
        self.max_bytes = int(info.get("serving", {}).get("max_bytes") or 10 << 20)
        self.threads = DEFAULT_REQUESTS if threads is None else max(1, threads)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[http.client.HTTPConnection] = []  # every thread's, closed by close()

    @classmethod
    def connect(cls, url: str, *, threads: int | None = None) -> HttpEngine:
        """Raises CifarkitError (one line naming the URL) if nothing answers there or it is not a cifar-serve."""
        check_url(url)
        try:
            status, body = cls._get(url.rstrip("/") + "/v1/model")
            info = json.loads(body) if status == 200 else None
        except (OSError, http.client.HTTPException, ValueError) as exc:
            reason = getattr(exc, "reason", None)  # urllib's URLError wraps the socket's error
            why = getattr(reason, "strerror", None) or first_line(exc, 160)
            raise CifarkitError(f"--url {url}: no cifar-serve answers there ({why})") from None
        if not isinstance(info, dict) or not isinstance(info.get("class_names"), list) or not info["class_names"]:
            raise CifarkitError(f"--url {url}: GET /v1/model answered {status}, not a cifar-serve model description")
        return cls(url, info, threads=threads)

    @staticmethod
    def _get(url: str) -> tuple[int, bytes]:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(url, timeout=10) as answer:
                return answer.status, answer.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def predict(self, inputs: Any, *, top_k: int = 1, batch_size: int = DEFAULT_BATCH_SIZE) -> Iterator[Result]:
        if not 1 <= top_k <= len(self.labels):
            raise CifarkitError(f"--top-k must be 1 to the model's {len(self.labels)} classes, got {top_k}")
        items = as_plan(inputs).items()
        for results in ordered_map(
            lambda chunk: self._batch(chunk[1], top_k), chunked(items, batch_size), self.threads
        ):
            yield from results

    # ---- one batch: read, send (in requests under the server's --max-bytes), name the answers ------------

    def _batch(self, items: list[Any], top_k: int) -> list[Result]:
        out: list[Result | None] = [None] * len(items)
        request: list[tuple[int, str, bytes]] = []  # (position, source, data)
        size = 0
        for i, item in enumerate(items):
            read = self._read(item)
            if isinstance(read, Failure):
                out[i] = read
                continue
            source, data = read
            if size + len(data) + PART_OVERHEAD > self.max_bytes and request:
                self._send(request, top_k, out)
                request, size = [], 0
            request.append((i, source, data))
            size += len(data) + PART_OVERHEAD
        if request:
            self._send(request, top_k, out)
        return out  # type: ignore[return-value]

    def _read(self, item: Any) -> Failure | tuple[str, bytes]:
        if isinstance(item, Failure):
            return item
        if isinstance(item, Blob):
            source, data = item.source, item.data
        else:
            source = os.fspath(item)
            try:
                data = read_regular(source, self.max_bytes - PART_OVERHEAD)  # type: ignore[assignment]
            except OSError as exc:
                from cifarkit.preprocess import _image_error  # the local engine's words for a file it cannot read

                return Failure(source, str(_image_error(source, exc)))
            if data is None:
                return Failure(source, f"{source}: over the server's {self.max_bytes:,}-byte limit (--max-bytes)")
        if len(data) + PART_OVERHEAD > self.max_bytes:
            return Failure(source, f"{source}: over the server's {self.max_bytes:,}-byte limit (--max-bytes)")
        return source, data

    def _send(self, request: list[tuple[int, str, bytes]], top_k: int, out: list[Result | None]) -> None:
        names = [f"{n}{_extension(source)}" for n, (_, source, _) in enumerate(request)]
        body, content_type = encode([(name, data) for name, (_, _, data) in zip(names, request, strict=True)])
        answer = self._post(f"/v1/classify-batch?top_k={top_k}", body, content_type)
        results = answer.get("results") if isinstance(answer, dict) else None
        if not isinstance(results, list) or len(results) != len(request):
            why = answer.get("error", "no results") if isinstance(answer, dict) else str(answer)
            for i, source, _ in request:
                out[i] = Failure(source, f"{source}: {self.url} did not classify it ({why})")
            return
        for (i, source, _), name, r in zip(request, names, results, strict=True):
            out[i] = self._result(source, name, r)

    def _result(self, source: str, name: str, r: dict[str, Any]) -> Result:
        if "error" in r:
            message = str(r["error"])
            return Failure(source, source + message[len(name) :] if message.startswith(name + ":") else message)
        ranked = tuple((str(t["label"]), float(t["probability"])) for t in r["top_k"])
        return Prediction(source, str(r["label"]), int(r["index"]), float(r["probability"]), ranked)

    def _post(self, path: str, body: bytes, content_type: str) -> Any:
        """The JSON answer, after up to RETRIES retries of a connection that failed or a 5xx; the last error as
        {"error": ...} when every attempt failed."""
        why = ""
        for attempt in range(RETRIES + 1):
            if attempt:
                time.sleep(BACKOFF_S[min(attempt - 1, len(BACKOFF_S) - 1)])
            try:
                conn = self._connection()
                conn.request("POST", path, body, {"Content-Type": content_type})
                response = conn.getresponse()
                payload = response.read()
                if response.status < 500:
                    return json.loads(payload)
                why = f"HTTP {response.status}: {first_line(Exception(payload.decode('utf-8', 'replace')), 200)}"
            except (OSError, http.client.HTTPException, ValueError) as exc:
                why = first_line(exc, 200)
            self._drop_connection()
        return {"error": f"{RETRIES + 1} attempts failed, the last with {why}"}

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:  # one keep-alive connection per thread of the window
            kind = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
            conn = self._local.conn = kind(self.host, self.port, timeout=TIMEOUT_S)
            with self._lock:
                self._connections.append(conn)
        return conn

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def close(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()


def _extension(source: str) -> str:
    """The input's extension, if it is plain ASCII: the server's messages depend on it (HEIC, say)."""
    m = _EXTENSION.search(source)
    return m.group(0) if m else ""
