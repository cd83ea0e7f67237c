"""multipart/form-data (RFC 7578) for the batch endpoint: parse a body already read into memory (its size is bounded
by --max-bytes before parsing starts), and build one (cifarkit.infer.http, the load bench). Pure Python.

    parts = parse(body, request_content_type)       # [Part(name, filename, content_type, data), ...] in order
    body, content_type = encode([("a.jpg", data), ...])

Written here rather than taken from python-multipart (what starlette's request.form() needs): it is not installed
with ray[serve], and a body already in memory needs only bytes.find. Malformed input raises MultipartError, one
line saying what is wrong.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

MAX_PARTS = 4096  # parts per request at most (cifarkit.serve.config.MAX_REPLICA_BATCH images)
MAX_HEADER_BYTES = 16 << 10  # a part's headers at most
_PARAM = re.compile(r';\s*([A-Za-z0-9_.*-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


class MultipartError(ValueError):
    """A body that is not the multipart/form-data its Content-Type says."""


@dataclass(frozen=True, slots=True)
class Part:
    name: str  # the form field's name ("" when absent)
    filename: str | None  # the file's name as the client sent it; None for a plain form field
    content_type: str  # the part's Content-Type ("" when absent)
    data: bytes


def content_type_params(value: str) -> tuple[str, dict[str, str]]:
    """'multipart/form-data; boundary="x"' -> ('multipart/form-data', {'boundary': 'x'}); the type lower-cased."""
    kind, _, rest = value.partition(";")
    params = {}
    for key, raw in _PARAM.findall(";" + rest):
        params[key.lower()] = _unquote(raw.strip())
    return kind.strip().lower(), params


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def boundary_of(content_type: str) -> bytes:
    """The boundary of a multipart Content-Type (RFC 2046: 1 to 70 characters), or MultipartError."""
    _, params = content_type_params(content_type)
    boundary = params.get("boundary", "")
    if not 1 <= len(boundary) <= 70 or not boundary.isascii():
        raise MultipartError("multipart body without a valid boundary parameter in its Content-Type")
    return boundary.encode("ascii")


def parse(body: bytes, content_type: str) -> list[Part]:
    """The parts of a multipart body, in order. The preamble and epilogue are ignored; a body that does not
    start with the boundary, a part without a blank line after its headers, or a missing closing boundary
    raises MultipartError."""
    delimiter = b"--" + boundary_of(content_type)
    if body.startswith(delimiter):
        pos = len(delimiter)
    else:  # a preamble first
        start = body.find(b"\r\n" + delimiter)
        if start < 0:
            raise MultipartError("multipart body does not contain its boundary")
        pos = start + 2 + len(delimiter)
    parts: list[Part] = []
    while True:
        if body.startswith(b"--", pos):  # the closing delimiter
            return parts
        eol = body.find(b"\r\n", pos)
        if eol < 0 or body[pos:eol].strip(b" \t"):  # transport padding only, then CRLF
            raise MultipartError("multipart body ends inside a part (no closing boundary)")
        head_end = body.find(b"\r\n\r\n", eol, eol + MAX_HEADER_BYTES)
        nxt = body.find(b"\r\n" + delimiter, eol)
        if nxt < 0:
            raise MultipartError("multipart body ends inside a part (no closing boundary)")
        if head_end < 0 or head_end > nxt:
            raise MultipartError(f"multipart part {len(parts) + 1} has no blank line after its headers")
        if len(parts) == MAX_PARTS:
            raise MultipartError(f"more than {MAX_PARTS:,} parts in one request")
        parts.append(_part(body[eol + 2 : head_end], body[head_end + 4 : nxt]))
        pos = nxt + 2 + len(delimiter)


def _part(head: bytes, data: bytes) -> Part:
    headers: dict[str, str] = {}
    for line in head.split(b"\r\n"):
        key, sep, value = line.partition(b":")
        if sep:  # header values are UTF-8 in practice (browsers send file names so, RFC 7578 4.2)
            headers[key.strip().lower().decode("latin-1")] = value.strip().decode("utf-8", "replace")
    _, params = content_type_params(headers.get("content-disposition", ""))
    filename = params.get("filename")
    if "filename*" in params:  # RFC 5987: UTF-8''percent-encoded
        from urllib.parse import unquote

        charset, _, encoded = params["filename*"].partition("''")
        filename = unquote(encoded, encoding=charset or "utf-8", errors="replace")
    return Part(params.get("name", ""), filename, headers.get("content-type", ""), data)


def encode(files: list[tuple[str, bytes]], field: str = "image") -> tuple[bytes, str]:
    """(body, Content-Type) of a multipart/form-data request with one file part per (filename, data). File names
    are sent as given when they are printable ASCII without quotes or backslashes, else as 'file' plus a filename*
    parameter (RFC 5987)."""
    boundary = "cifarkit-" + os.urandom(12).hex()
    chunks: list[bytes] = []
    for filename, data in files:
        chunks.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '.encode("ascii"))
        chunks.append(_filename_param(filename))
        chunks.append(b"\r\nContent-Type: application/octet-stream\r\n\r\n")
        chunks.append(data)
        chunks.append(b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode("ascii"))
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def _filename_param(filename: str) -> bytes:
    if filename.isascii() and filename.isprintable() and '"' not in filename and "\\" not in filename:
        return f'filename="{filename}"'.encode("ascii")
    from urllib.parse import quote

    encoded = quote(filename.encode("utf-8", "surrogateescape"), safe="")
    return f"filename=\"file\"; filename*=UTF-8''{encoded}".encode("ascii")
