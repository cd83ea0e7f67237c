"""What the HTTP service answers, independent of the server that carries it: the routes, the request checks, decoding,
the JSON replies. A Ray Serve replica (cifarkit.serve.app) and the plain reference server of bench/serve_load.py
both drive it, so they answer byte for byte the same. numpy, onnxruntime and Pillow only (no Ray).

    handler = Handler(clf, cfg, classify, info)       # classify(pixels, top_k) -> awaitable Result
    reply = await handler.handle("POST", "/v1/classify", "top_k=3", headers, body_chunks)
    reply.status, reply.body                           # 200, b'{"label":"cat",...}'

Routes:
    POST /v1/classify        an image as the body (image/*, application/octet-stream, or multipart with one file)
    POST /v1/classify-batch  multipart/form-data, one file part per image: {"results": [one per part, in order]}
    GET  /v1/model           the model's metadata (ArtifactMeta) and how it is served
    GET  /healthz            {"status": "ok"}
Every answer is one line of JSON; a refused request is a 4xx with {"error": "..."}, one line naming the cause.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import parse_qs

import numpy as np

from cifarkit.errors import first_line
from cifarkit.files import Failure
from cifarkit.infer.classifier import Classifier, Prediction, Result
from cifarkit.multipart import MultipartError, content_type_params, parse
from cifarkit.preprocess import ImageError
from cifarkit.serve.config import ServeConfig

# Bodies up to this size are decoded on the event loop (a CIFAR-sized JPEG takes ~0.05-0.1 ms on the JPEG fast
# path: a thread hand-off would cost as much); larger ones in a thread, so that a 12-megapixel photo (~30 ms even
# at libjpeg's 1/8 scale) does not hold up every other request of the replica.
DECODE_INLINE_BYTES = 64 << 10
MAX_IN_FLIGHT = 1024  # requests a replica holds at once; beyond, 503 with Retry-After (memory stays bounded)
RAW_TYPES = frozenset({"", "application/octet-stream"})  # besides image/*: a body that is the image file itself
JSON_TYPE = "application/json"
BODY_NAME = "request body"  # how a single image sent as the body is named in error messages
MAX_MESSAGE = 2000  # characters of an error message at most (it may quote a file name a client chose)


@dataclasses.dataclass(frozen=True)
class Reply:
    status: int
    body: bytes  # one line of JSON
    headers: tuple[tuple[str, str], ...] = ()
    close: bool = False  # close the connection after this answer (a body left unread)


class HttpError(Exception):
    """A request refused: `status` and a one-line message for {"error": ...}."""

    def __init__(self, status: int, message: str, *, headers: tuple[tuple[str, str], ...] = (), close: bool = False):
        super().__init__(message)
        self.status, self.headers, self.close = status, headers, close


def json_bytes(obj: Any) -> bytes:
    """Compact JSON, one line (json escapes every control character; ensure_ascii also U+2028 and U+2029)."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("ascii")


def error_reply(status: int, message: str, headers: tuple[tuple[str, str], ...] = (), close: bool = False) -> Reply:
    text = message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 3] + "..."  # a client's file name
    return Reply(status, json_bytes({"error": text}), headers, close)


def prediction_json(r: Result) -> dict[str, Any]:
    """A Prediction as cifar-infer's json rows have it, without the path; a Failure as {"error": message}."""
    if isinstance(r, Prediction):
        d = r.to_dict()
        del d["path"]
        return d
    return {"error": r.message}


def renamed(r: Result, name: str) -> Result:
    """A Failure from the batched model call (named "<array 3>" there) named after its image instead."""
    if isinstance(r, Failure) and r.source != name:
        return Failure(name, r.message.replace(r.source, name, 1))
    return r


# ---------------------------------------------------------------------------------------------------------
# The model side: one call for a batch gathered across requests
# ---------------------------------------------------------------------------------------------------------


def run_batch(clf: Classifier, items: list[tuple[np.ndarray, int]]) -> list[Result]:
    """(pixels uint8 [H, W, 3], top_k) of several requests -> their Results, in order, from one model call
    (Classifier.predict_paths: the local engine's ranking and its rule for outputs that are not finite)."""
    k = max(top_k for _, top_k in items)
    pixels = [p for p, _ in items]
    results = list(clf.predict_paths(pixels, top_k=k, batch_size=len(pixels), threads=0))  # type: ignore[arg-type]
    return [
        dataclasses.replace(r, top_k=r.top_k[:top_k]) if isinstance(r, Prediction) and top_k < k else r
        for r, (_, top_k) in zip(results, items, strict=True)
    ]


# ---------------------------------------------------------------------------------------------------------
# The HTTP side
# ---------------------------------------------------------------------------------------------------------

Classify = Callable[[np.ndarray, int], Awaitable[Result]]


class Handler:
    """Routes and checks. `classify(pixels, top_k)` is the batched model call (Ray Serve's @serve.batch in a
    replica); `info` is what GET /v1/model answers."""

    def __init__(self, clf: Classifier, cfg: ServeConfig, classify: Classify, info: dict[str, Any]) -> None:
        self.clf, self.cfg, self.classify = clf, cfg, classify
        self.info = json_bytes(info)
        self.classes = len(clf.labels)
        self.in_flight = 0
        self.routes: dict[str, tuple[tuple[str, ...], Callable[..., Awaitable[Reply]]]] = {
            "/v1/classify": (("POST",), self._classify_one),
            "/v1/classify-batch": (("POST",), self._classify_batch),
            "/v1/model": (("GET", "HEAD"), self._model),
            "/healthz": (("GET", "HEAD"), self._health),
        }

    async def handle(
        self, method: str, path: str, query: str, headers: Mapping[str, str], body: AsyncIterator[bytes]
    ) -> Reply:
        """The answer to one request. `headers` must look names up case-insensitively (aiohttp's and starlette's
        do); `body` yields the body's chunks as they arrive. Never raises for anything a client sends."""
        route = self.routes.get(path.rstrip("/") or "/")
        if route is None:
            return error_reply(404, f"no such endpoint {path!r}; see GET /v1/model, POST /v1/classify")
        methods, fn = route
        if method not in methods:
            allowed = ", ".join(methods)
            return error_reply(405, f"{path} takes {allowed}, got {method}", (("Allow", allowed),), close=True)
        if self.in_flight >= MAX_IN_FLIGHT:
            return error_reply(503, f"busy: {MAX_IN_FLIGHT} requests in progress; retry", (("Retry-After", "1"),))
        self.in_flight += 1
        try:
            return await fn(query, headers, body)
        except HttpError as exc:
            return error_reply(exc.status, str(exc), exc.headers, exc.close)
        except Exception as exc:  # a bug or a broken model: the replica keeps serving the others
            return error_reply(500, f"internal error: {type(exc).__name__}: {first_line(exc)}")
        finally:
            self.in_flight -= 1

    # ---- endpoints ----------------------------------------------------------------------------------------

    async def _health(self, query: str, headers: Mapping[str, str], body: AsyncIterator[bytes]) -> Reply:
        return Reply(200, b'{"status":"ok"}')

    async def _model(self, query: str, headers: Mapping[str, str], body: AsyncIterator[bytes]) -> Reply:
        return Reply(200, self.info)

    async def _classify_one(self, query: str, headers: Mapping[str, str], body: AsyncIterator[bytes]) -> Reply:
        top_k = self._top_k(query)
        content_type = headers.get("content-type", "")
        kind, _ = content_type_params(content_type)
        multipart = kind == "multipart/form-data"
        if not (multipart or kind in RAW_TYPES or kind.startswith("image/")):
            raise HttpError(
                415,
                f"Content-Type {kind} is not an image: send the file's bytes as image/* or application/octet-stream "
                "(curl: --data-binary @cat.jpg -H 'Content-Type: image/jpeg'), or multipart/form-data with one file",
            )
        data = await self._read(headers, body)
        name = BODY_NAME
        if multipart:
            files = [p for p in self._parts(data, content_type) if p.filename is not None]
            if len(files) != 1:
                raise HttpError(
                    400, f"multipart body with {len(files)} files: POST one here, several to /v1/classify-batch"
                )
            data, name = files[0].data, files[0].filename or BODY_NAME
        if not data:
            raise HttpError(400, "empty body: POST the image file's bytes")
        try:
            pixels = await self._decode_one(data, name)
        except ImageError as exc:
            raise HttpError(422, str(exc)) from None
        result = renamed(await self.classify(pixels, top_k), name)
        if isinstance(result, Failure):  # the model's output is not finite: the model is broken, not the image
            raise HttpError(500, result.message)
        return Reply(200, json_bytes(prediction_json(result)))

    async def _classify_batch(self, query: str, headers: Mapping[str, str], body: AsyncIterator[bytes]) -> Reply:
        top_k = self._top_k(query)
        content_type = headers.get("content-type", "")
        kind, _ = content_type_params(content_type)
        if kind != "multipart/form-data":
            raise HttpError(
                415,
                f"Content-Type {kind or '(none)'}: POST multipart/form-data with one file part per image "
                "(curl: -F image=@a.jpg -F image=@b.jpg)",
            )
        parts = self._parts(await self._read(headers, body), content_type)
        if not parts:
            raise HttpError(400, "multipart body without parts: send one file part per image")
        inputs: list[Any] = []
        for i, part in enumerate(parts):
            name = part.filename or f"<part {i + 1}>"
            if part.filename is None:
                inputs.append(Failure(name, f"part {i + 1} ({part.name!r}) is not a file: send each image as a file"))
            elif not part.data:
                inputs.append(Failure(name, f"{name}: empty file"))
            else:
                inputs.append((name, part.data))
        decoded = await self._decode_many(inputs)
        # Every good image joins the batches being gathered (with other requests' images), results in order.
        results = await asyncio.gather(*(self._result(item, top_k) for item in decoded))
        out = [{"name": name, **prediction_json(r)} for name, r in results]
        return Reply(200, json_bytes({"results": out}))

    async def _result(self, item: Any, top_k: int) -> tuple[str, Result]:
        if isinstance(item, Failure):
            return item.source, item
        name, pixels = item
        return name, renamed(await self.classify(pixels, top_k), name)

    # ---- pieces -------------------------------------------------------------------------------------------

    def _top_k(self, query: str) -> int:
        try:
            params = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query), max_num_fields=16)
        except ValueError as exc:
            raise HttpError(400, f"bad query string ({first_line(exc)})") from None
        unknown = sorted(set(params) - {"top_k"})
        if unknown:
            raise HttpError(400, f"unknown query parameter {unknown[0]!r} (known: top_k)")
        values = params.get("top_k", ["1"])
        text = values[-1].strip()
        if len(values) > 1 or not text.isdigit() or not 1 <= int(text) <= self.classes:
            raise HttpError(400, f"top_k must be 1 to {self.classes} (the model's classes), got {values[-1]!r}")
        return int(text)

    async def _read(self, headers: Mapping[str, str], body: AsyncIterator[bytes]) -> bytes:
        """The whole body, refused with 413 once it is over --max-bytes: by its Content-Length before reading, and
        by counting while reading (a chunked body has no length)."""
        limit = self.cfg.max_bytes
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                raise HttpError(400, f"bad Content-Length {declared!r}", close=True)
            if int(declared) > limit:
                raise HttpError(
                    413, f"body of {int(declared):,} bytes is over the {limit:,}-byte limit (--max-bytes)", close=True
                )
        chunks: list[bytes] = []
        size = 0
        async for chunk in body:
            size += len(chunk)
            if size > limit:
                raise HttpError(413, f"body is over the {limit:,}-byte limit (--max-bytes)", close=True)
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _parts(self, data: bytes, content_type: str) -> list[Any]:
        try:
            return parse(data, content_type)
        except MultipartError as exc:
            raise HttpError(400, str(exc)) from None

    def _pixels(self, data: bytes, name: str) -> np.ndarray:
        """Decode by the model's own resize rule (cifarkit.preprocess, the JPEG fast path first), as cifar-infer
        does. ImageError for anything that is not a readable image, a decompression bomb included."""
        try:
            return self.clf.pixels(data, name)
        except ImageError:
            raise
        except Exception as exc:  # a decoder's own bug on a crafted file: still this image's problem only
            raise ImageError(f"{name}: cannot decode image ({type(exc).__name__}: {first_line(exc, 160)})") from None

    async def _decode_one(self, data: bytes, name: str) -> np.ndarray:
        if len(data) <= DECODE_INLINE_BYTES:
            return self._pixels(data, name)
        return await asyncio.get_running_loop().run_in_executor(None, self._pixels, data, name)

    async def _decode_many(self, inputs: list[Any]) -> list[Any]:
        """(name, bytes) -> (name, pixels), or a Failure naming the image; Failures pass through, in order."""

        def decode_all() -> list[Any]:
            out: list[Any] = []
            for item in inputs:
                if isinstance(item, Failure):
                    out.append(item)
                    continue
                name, data = item
                try:
                    out.append((name, self._pixels(data, name)))
                except ImageError as exc:
                    out.append(Failure(name, str(exc)))
            return out

        total = sum(len(item[1]) for item in inputs if not isinstance(item, Failure))
        if total <= DECODE_INLINE_BYTES:
            return decode_all()
        return await asyncio.get_running_loop().run_in_executor(None, decode_all)
