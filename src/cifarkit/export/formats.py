"""The artifact formats: the deployed module as one self-contained ONNX model with cifarkit's metadata, and as
a TorchScript archive with the same metadata inside; each with a runner for verification.

    payload, notes = onnx_bytes(model, meta, opset=18)
    logits = onnx_runner(payload)(batch)            # uint8 [N, H, W, 3] -> float32 [N, C]
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Callable

import numpy as np
import torch

from cifarkit import __version__
from cifarkit.errors import CifarkitError, first_line
from cifarkit.export.config import DEFAULT_OPSET
from cifarkit.export.verify import reference_inputs
from cifarkit.files import regular_file_problem
from cifarkit.model.deployed import DeployedModel
from cifarkit.spec import ARTIFACT_JSON_NAME, INPUT_NAME, OUTPUT_NAMES, ArtifactMeta


@contextlib.contextmanager
def quiet_exporters():
    """torch.onnx and torch.jit talk a lot (progress lines, deprecation warnings); keep the CLI readable."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lvl in zip(loggers, levels, strict=True):
            lg.setLevel(lvl)


# ---------------------------------------------------------------------------------------------------------
# ONNX
# ---------------------------------------------------------------------------------------------------------


def onnx_bytes(model: DeployedModel, meta: ArtifactMeta, opset: int = DEFAULT_OPSET) -> tuple[bytes, list[str]]:
    """Export `model` to one self-contained ONNX model (bytes) with metadata; returns (bytes, notes).
    The dynamo exporter first; if it fails, the legacy TorchScript-based exporter, and a note saying so."""
    import onnx

    example = torch.from_numpy(reference_inputs(meta, count=2))  # batch >= 2: a batch of 1 gets specialized
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="cifarkit-onnx-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        try:
            with quiet_exporters():
                batch = torch.export.Dim("batch", min=1, max=1 << 20)
                torch.onnx.export(
                    model,
                    (example,),
                    path,
                    dynamo=True,
                    opset_version=opset,
                    input_names=[INPUT_NAME],
                    output_names=list(OUTPUT_NAMES),
                    dynamic_shapes={"images": {0: batch}},
                    external_data=False,
                    optimize=True,
                )
        except Exception as exc:
            notes.append(f"dynamo exporter failed ({first_line(exc)}); used the legacy exporter")
            with quiet_exporters():
                torch.onnx.export(
                    model,
                    (example,),
                    path,
                    dynamo=False,
                    opset_version=opset,
                    input_names=[INPUT_NAME],
                    output_names=list(OUTPUT_NAMES),
                    dynamic_axes={
                        INPUT_NAME: {0: "batch"},
                        OUTPUT_NAMES[0]: {0: "batch"},
                        OUTPUT_NAMES[1]: {0: "batch"},
                    },
                )
        if any(name != "model.onnx" for name in os.listdir(tmp)):
            raise CifarkitError("ONNX export wrote external data files; expected one self-contained file")
        proto = onnx.load(path)
    return with_metadata(proto.SerializeToString(), meta), notes


def with_metadata(payload: bytes, meta: ArtifactMeta) -> bytes:
    """The ONNX model `payload` carrying `meta` as its metadata_props (any earlier ones replaced), a doc string
    that states the contract, and cifarkit as its producer; checked by onnx.checker (full check)."""
    import onnx

    h, w = meta.image_size
    proto = onnx.load_from_string(payload)
    del proto.metadata_props[:]
    for key, value in meta.to_props().items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.doc_string = (
        f"cifarkit {meta.model_name}: input '{INPUT_NAME}' uint8 [N, {h}, {w}, 3] RGB; outputs "
        f"'{OUTPUT_NAMES[0]}' and '{OUTPUT_NAMES[1]}' float32 [N, {len(meta.class_names)}]. "
        "Class names and preprocessing are in metadata_props."
    )
    proto.producer_name = "cifarkit"
    proto.producer_version = __version__
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def onnx_runner(payload: bytes) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(payload, sess_options=opts, providers=["CPUExecutionProvider"])
    return lambda batch: session.run([OUTPUT_NAMES[0]], {INPUT_NAME: batch})[0]


# ---------------------------------------------------------------------------------------------------------
# TorchScript (deprecated upstream, still asked for; ONNX is the primary format)
# ---------------------------------------------------------------------------------------------------------


def torchscript_bytes(model: DeployedModel, meta: ArtifactMeta) -> bytes:
    example = torch.from_numpy(reference_inputs(meta, count=2))
    with quiet_exporters(), torch.no_grad():
        traced = torch.jit.trace(model, (example,), check_trace=False)
        buf = io.BytesIO()
        torch.jit.save(traced, buf, _extra_files={ARTIFACT_JSON_NAME: meta.to_json()})
    return buf.getvalue()


def torchscript_runner(payload: bytes) -> Callable[[np.ndarray], np.ndarray]:
    with quiet_exporters():
        module = torch.jit.load(io.BytesIO(payload), map_location="cpu")
    module.eval()

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(np.ascontiguousarray(batch)))[0].numpy()

    return run


def load_torchscript(path: str | os.PathLike[str]) -> tuple[torch.jit.ScriptModule, ArtifactMeta]:
    """Load model.pt and the ArtifactMeta stored inside it. A TorchScript archive holds a program that
    PyTorch runs: load only files you trust (ONNX is the format for untrusted models)."""
    problem = regular_file_problem(path)
    if problem is not None:
        raise CifarkitError(f"model {path}: {problem}")
    extra = {ARTIFACT_JSON_NAME: ""}
    try:
        with quiet_exporters():
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        meta = ArtifactMeta.from_json(extra[ARTIFACT_JSON_NAME])
    except (RuntimeError, ValueError, OSError) as exc:
        raise CifarkitError(f"model {path} is not a cifarkit TorchScript export ({first_line(exc, 160)})") from None
    return module.eval(), meta
