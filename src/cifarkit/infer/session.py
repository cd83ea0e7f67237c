"""Loading a model for inference: the file read once as a regular file of a sane size, an onnxruntime session on
the providers `device` asks for, and cifarkit's contract checked (one uint8 [N, H, W, 3] input, the outputs,
the metadata). Reading changes no file: a model whose export was interrupted after its commit is read from the
staged file the export left (cifarkit.atomic.committed_member); the next export finishes the set.

    session, meta, path = open_session("runs/blog/model.onnx", device="cpu")
"""

from __future__ import annotations

import os
from typing import Any

from cifarkit.atomic import committed_member
from cifarkit.errors import CifarkitError, first_line
from cifarkit.files import NotRegularFile, read_regular, stat_reason
from cifarkit.infer.providers import start_session
from cifarkit.spec import INPUT_NAME, OUTPUT_NAMES, ArtifactMeta

DEFAULT_MODEL_NAME = "model.onnx"  # what open_session looks for in a folder


def open_session(
    path: str | os.PathLike[str], *, intra_op_threads: int | None = None, device: str = "auto"
) -> tuple[Any, ArtifactMeta, str]:
    """(onnxruntime session, its ArtifactMeta, the file's path) for model.onnx or a folder holding one, on
    the execution providers `device` names (cifarkit.infer.providers.start_session). Raises CifarkitError if the
    file is missing, unreadable, not ONNX, or carries no cifarkit metadata, or if `device` is not available."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, DEFAULT_MODEL_NAME)
    payload = read_model_bytes(os.fspath(committed_member(path)))  # an export killed mid-way: all new, never a mix
    if payload.startswith(b"PK"):
        raise CifarkitError(
            f"model {path} is a zip archive (a TorchScript model.pt?); cifar-infer runs the ONNX export, model.onnx"
        )
    try:
        # From bytes: the file is read once, as a regular file; external data files (which a cifarkit export
        # never has) cannot be resolved, so a model cannot make onnxruntime read other files.
        session = start_session(payload, _session_options(intra_op_threads), device)
    except CifarkitError:
        raise  # the device's provider is missing or did not start: start_session said what to install
    except Exception as exc:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...) for bad files
        raise CifarkitError(f"model {path} is not a valid ONNX model ({first_line(exc)})") from None
    props = dict(session.get_modelmeta().custom_metadata_map)
    if "schema" not in props or "class_names" not in props:
        raise CifarkitError(
            f"model {path} has no cifarkit metadata (class names, image size, resize rule); export it with cifar-export"
        )
    try:
        meta = ArtifactMeta.from_props(props)
    except (ValueError, TypeError) as exc:
        raise CifarkitError(f"model {path} has bad cifarkit metadata: {exc}") from None
    return session, meta, path


MAX_MODEL_BYTES = 1 << 30  # 1 GiB: a cifarkit export is under 10 MB; protobuf itself stops at 2 GiB


def read_model_bytes(path: str) -> bytes:
    """The model file's bytes, if it is a regular file of a sane size (CifarkitError naming it otherwise)."""
    try:
        payload = read_regular(path, MAX_MODEL_BYTES)
    except NotRegularFile as exc:
        raise CifarkitError(f"model {path} {exc.strerror}") from None
    except FileNotFoundError:
        raise CifarkitError(f"model {path} does not exist") from None
    except OSError as exc:
        raise CifarkitError(f"model {path}: cannot read ({stat_reason(path, exc)})") from None
    if payload is None:
        size = os.stat(path).st_size
        raise CifarkitError(f"model {path} is {size:,} bytes, over the {MAX_MODEL_BYTES:,}-byte limit")
    return payload


def check_contract(session: Any, meta: ArtifactMeta, source: str) -> None:
    """The session's input and outputs are what cifarkit exports and agree with the metadata."""
    h, w = meta.image_size
    want = f"one input '{INPUT_NAME}' uint8 [N, {h}, {w}, 3]"
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise CifarkitError(f"model {source} has {len(inputs)} inputs, expected {want}")
    arg = inputs[0]
    shape = list(arg.shape)
    fixed = [d for d in shape[1:] if isinstance(d, int)]
    if (
        arg.name != INPUT_NAME
        or arg.type != "tensor(uint8)"
        or len(shape) != 4
        or (len(fixed) == 3 and fixed != [h, w, 3])
    ):
        raise CifarkitError(
            f"model {source} takes input {arg.name!r} {arg.type} {shape}, expected {want} (is it a cifarkit export?)"
        )
    dims = {o.name: o.shape for o in session.get_outputs()}
    if OUTPUT_NAMES[0] not in dims:
        raise CifarkitError(f"model {source} has no {OUTPUT_NAMES[0]!r} output (outputs: {list(dims)})")
    classes = dims[OUTPUT_NAMES[0]][-1] if dims[OUTPUT_NAMES[0]] else None
    if isinstance(classes, int) and classes != len(meta.class_names):
        raise CifarkitError(f"model {source} outputs {classes} classes but its metadata names {len(meta.class_names)}")


def _session_options(intra_op_threads: int | None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: onnxruntime's warnings are not the user's business
    # onnxruntime's default is one spinning thread per core. Here at most 2, and sleeping rather than spinning
    # between calls: the model costs ~70 us of CPU per image (5.7 MFLOP), about as much as decoding it, and
    # spinning threads would take the cores the decoding threads need (measured end to end on 5,000 JPEGs:
    # 215 us of CPU per image without spinning, 270 us with it, and 10-30 % fewer images/s).
    opts.intra_op_num_threads = intra_op_threads if intra_op_threads is not None else min(2, os.cpu_count() or 1)
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts
