"""Export stage: checkpoint -> verified, self-describing ONNX and TorchScript artifacts.

Both artifacts are the same wrapped module (`DeployedModel`): input `images` uint8 [N, H, W, 3] RGB, outputs
`logits` and `probabilities` float32 [N, C]; cast, scale, normalization (and test-time augmentation, where
the recipe uses it) happen inside the graph. Nothing is written until the artifact has been run and compared
with the eager model; then it is written to a temporary file and renamed.

    from cifarkit.export import export
    result = export("runs/blog/checkpoint.pt", "artifacts/", formats=("onnx", "torchscript"))
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cifarkit import __version__
from cifarkit.atomic import output_folder, write_set
from cifarkit.checkpoint import checkpoint_meta, deployed_from_checkpoint, file_sha256, load_checkpoint
from cifarkit.errors import CifarkitError, first_line
from cifarkit.files import regular_file_problem
from cifarkit.models import DeployedModel
from cifarkit.spec import ARTIFACT_JSON_NAME, INPUT_NAME, OUTPUT_NAMES, ArtifactMeta, versions

DEFAULT_OPSET = 18
FORMATS = ("onnx", "torchscript")
VERIFY_BATCH_SIZES = (1, 2, 7, 64)
MAX_ABS_LOGIT_DIFF = 1e-4
ONNX_NAME = "model.onnx"
TORCHSCRIPT_NAME = "model.pt"


@dataclass
class Verification:
    fmt: str
    batch_sizes: tuple[int, ...]
    images: int  # images compared (the largest verification batch)
    max_abs_diff: float  # worst |logit difference| against the eager model
    same_classes: bool

    @property
    def ok(self) -> bool:
        return self.same_classes and self.max_abs_diff <= MAX_ABS_LOGIT_DIFF


@dataclass
class ExportResult:
    paths: dict[str, Path]  # format -> written file, plus "json" for the sidecar
    meta: ArtifactMeta
    checks: list[Verification] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. "dynamo exporter failed, used the legacy exporter"


# ---------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------


def artifact_meta(state: dict[str, Any], checkpoint_path: str | os.PathLike[str] | None) -> ArtifactMeta:
    """The checkpoint's contract, copied, with the provenance of this export added."""
    import onnx  # noqa: F401 (imported so that versions() reports the running onnx)

    return replace(
        checkpoint_meta(state),
        checkpoint_sha256=file_sha256(checkpoint_path) if checkpoint_path else "",
        versions=versions("torch", "onnx"),
    )


def reference_inputs(
    meta: ArtifactMeta, images: np.ndarray | None = None, count: int = 64, seed: int = 0
) -> np.ndarray:
    """uint8 [count, H, W, 3]: the first `count` real images when given, otherwise a fixed seeded batch."""
    if images is not None and len(images):
        return np.ascontiguousarray(images[:count])
    h, w = meta.image_size
    return np.random.default_rng(seed).integers(0, 256, size=(count, h, w, 3), dtype=np.uint8)


def compare(
    fmt: str,
    run: Callable[[np.ndarray], np.ndarray],
    model: DeployedModel,
    images: np.ndarray,
    batch_sizes: Sequence[int] = VERIFY_BATCH_SIZES,
) -> Verification:
    """Run the artifact (`run`: uint8 batch -> logits) and the eager model on the same images, batch by
    batch at each size in `batch_sizes`; report the worst logit difference and whether classes agree."""
    ref, _ = model.run_numpy(images)
    worst, same = 0.0, True
    for bs in batch_sizes:
        n = (len(images) // bs) * bs or len(images)  # whole batches of bs; one short batch if bs > N
        for start in range(0, n, bs):
            got = run(images[start : start + bs])
            want = ref[start : start + bs]
            if got.shape != want.shape:
                raise CifarkitError(
                    f"{fmt} artifact returned logits of shape {got.shape} for a batch of "
                    f"{len(want)}, expected {want.shape}"
                )
            if not (np.isfinite(got).all() and np.isfinite(want).all()):
                side = "the eager model" if not np.isfinite(want).all() else f"the {fmt} artifact"
                raise CifarkitError(f"{side} gives NaN or Inf logits on the verification images; nothing written")
            worst = max(worst, float(np.max(np.abs(got - want))) if got.size else 0.0)
            same = same and bool(np.array_equal(got.argmax(1), want.argmax(1)))
    return Verification(fmt, tuple(batch_sizes), len(images), worst, same)


@contextlib.contextmanager
def _quiet_exporters():
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

    h, w = meta.image_size
    example = torch.from_numpy(reference_inputs(meta, count=2))  # batch >= 2: a batch of 1 gets specialized
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="cifarkit-onnx-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        try:
            with _quiet_exporters():
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
            with _quiet_exporters():
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
    return proto.SerializeToString(), notes


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
    with _quiet_exporters(), torch.no_grad():
        traced = torch.jit.trace(model, (example,), check_trace=False)
        buf = io.BytesIO()
        torch.jit.save(traced, buf, _extra_files={ARTIFACT_JSON_NAME: meta.to_json()})
    return buf.getvalue()


def torchscript_runner(payload: bytes) -> Callable[[np.ndarray], np.ndarray]:
    with _quiet_exporters():
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
        with _quiet_exporters():
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        meta = ArtifactMeta.from_json(extra[ARTIFACT_JSON_NAME])
    except (RuntimeError, ValueError, OSError) as exc:
        raise CifarkitError(f"model {path} is not a cifarkit TorchScript export ({first_line(exc, 160)})") from None
    return module.eval(), meta


# ---------------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------------


def export(
    checkpoint: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    formats: Sequence[str] = FORMATS,
    opset: int = DEFAULT_OPSET,
    images: np.ndarray | None = None,
    verify_count: int = 256,
) -> ExportResult:
    """Export `checkpoint` to `out_dir` in each of `formats`, verifying each artifact against the eager model
    on `images` (uint8 [N, H, W, 3]; a seeded random batch when None) at batch sizes 1, 2, 7 and 64.

    A failed check raises CifarkitError with the worst difference and writes nothing for any format."""
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise CifarkitError(f"--format: unknown format {', '.join(bad) or '(none)'}, expected onnx, torchscript or all")
    if not 7 <= opset <= 23:
        raise CifarkitError(f"--opset must be between 7 and 23, got {opset}")
    with output_folder(out_dir) as out:  # a failed export leaves no empty folder behind
        return _export(checkpoint, out, formats, opset, images, verify_count)


def _export(
    checkpoint: str | os.PathLike[str],
    out: Path,
    formats: Sequence[str],
    opset: int,
    images: np.ndarray | None,
    verify_count: int,
) -> ExportResult:
    state = load_checkpoint(checkpoint)
    model = deployed_from_checkpoint(state)
    meta = artifact_meta(state, checkpoint)
    if images is not None and tuple(images.shape[1:]) != (*meta.image_size, 3):
        raise CifarkitError(f"--data: images are {images.shape[1:]}, the model expects {(*meta.image_size, 3)}")
    sample = reference_inputs(meta, images, count=verify_count)

    payloads: dict[str, bytes] = {}
    checks: list[Verification] = []
    notes: list[str] = []
    for fmt in formats:
        if fmt == "onnx":
            payload, fmt_notes = onnx_bytes(model, meta, opset)
            notes.extend(fmt_notes)
            check = compare(fmt, onnx_runner(payload), model, sample)
        else:
            payload = torchscript_bytes(model, meta)
            check = compare(fmt, torchscript_runner(payload), model, sample)
        if not check.ok:
            raise CifarkitError(
                f"{fmt} artifact does not match the eager model: max |logit difference| {check.max_abs_diff:.3g} "
                f"(limit {MAX_ABS_LOGIT_DIFF:g}), same predicted classes: {check.same_classes}; nothing written"
            )
        payloads[fmt] = payload
        checks.append(check)

    # Everything verified: now write the set (model files and sidecar) so that a reader sees all new or all old.
    names = {"onnx": ONNX_NAME, "torchscript": TORCHSCRIPT_NAME}
    sidecar = json.loads(meta.to_json())
    sidecar["files"] = {fmt: names[fmt] for fmt in payloads}
    sidecar["verification"] = [
        {
            "format": c.fmt,
            "batch_sizes": list(c.batch_sizes),
            "images": c.images,
            "max_abs_logit_diff": c.max_abs_diff,
            "same_classes": c.same_classes,
        }
        for c in checks
    ]
    files = {names[fmt]: payload for fmt, payload in payloads.items()}
    files[ARTIFACT_JSON_NAME] = (json.dumps(sidecar, indent=2, sort_keys=True) + "\n").encode()
    stale = [name for fmt, name in names.items() if fmt not in payloads and (out / name).exists()]
    write_set(out, files, remove=stale)
    notes.extend(f"removed the older {name}: it is not part of this export" for name in stale)
    paths = {fmt: out / names[fmt] for fmt in payloads}
    paths["json"] = out / ARTIFACT_JSON_NAME
    return ExportResult(paths=paths, meta=meta, checks=checks, notes=notes)
