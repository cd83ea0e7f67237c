"""Export stage: ExportConfig -> export() -> ExportResult: verified, self-describing ONNX and TorchScript files, their
compact variants (fp16 weights, int8 quantization, another test-time augmentation) and a Triton repository.

Every artifact is the same wrapped module (`DeployedModel`): input `images` uint8 [N, H, W, 3] RGB, outputs
`logits` and `probabilities` float32 [N, C]; cast, scale, normalization and test-time augmentation happen inside
the graph. Nothing is written until every artifact has been checked: an fp32 artifact against the eager model,
logit for logit; a variant that cannot match it exactly against the fp32 model on labelled test images, written
only when it loses at most --max-drop accuracy points. Then the set is written so that a reader sees all new files
or all old ones, and the export ends with a table: each artifact's size, accuracy and speed on this machine.

    from cifarkit.export import ExportConfig, export
    result = export(ExportConfig(checkpoint="runs/blog/checkpoint.pt", out="artifacts/", format="all"))
    result = export(ExportConfig(checkpoint="runs/air/checkpoint.pt", quantize="int8", data="/data/cifar10"))
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from cifarkit.atomic import output_folder, write_set
from cifarkit.errors import CifarkitError, GateError
from cifarkit.export.config import EXACT_VERIFY_IMAGES, ExportConfig
from cifarkit.export.formats import onnx_bytes, onnx_runner, torchscript_bytes, torchscript_runner, with_metadata
from cifarkit.export.verify import (
    MAX_ABS_LOGIT_DIFF,
    Accuracy,
    Verification,
    classes_of,
    compare,
    images_per_second,
    labelled_check,
    reference_inputs,
)
from cifarkit.model.checkpoint import Checkpoint, file_sha256
from cifarkit.model.deployed import DeployedModel
from cifarkit.spec import ARTIFACT_JSON_NAME, ArtifactMeta, versions
from cifarkit.stage import Reporter, Silent

FILE_NAMES = {"onnx": "model.onnx", "torchscript": "model.pt"}


@dataclass
class TableRow:
    """One line of the table an export ends with."""

    artifact: str  # "fp32 onnx", "torchscript", "int8 onnx", ...
    fmt: str | None  # the payload it describes ("onnx", "torchscript"); None: the fp32 model, built to compare with
    size: int  # bytes
    accuracy: float | None  # on the verification images (a fraction); None without labelled data
    images_per_s: float | None  # model only, batch 256, this machine; None with --no-speed
    ratio: float | None  # images/s against the fp32 ONNX model's
    path: Path | None = None  # the file written; None: built to compare with


@dataclass
class ExportResult:
    paths: dict[str, Path]  # format -> written file, plus "json" for the sidecar
    meta: ArtifactMeta
    checks: list[Verification] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. "dynamo exporter failed, used the legacy exporter"
    accuracy: Accuracy | None = None  # a variant against the fp32 model on labelled images
    table: list[TableRow] = field(default_factory=list)
    verified_on: int = 0  # images of the table's accuracy column


def export(cfg: ExportConfig, reporter: Reporter | None = None, *, images: np.ndarray | None = None) -> ExportResult:
    """Export `cfg.checkpoint` into `cfg.out_dir` as `cfg` says. `images` (uint8 [N, H, W, 3]) are the images an
    exact artifact is compared on (default: the test split of `cfg.data`, else a seeded random batch). A failed
    check raises CifarkitError, a variant that loses more than `cfg.max_drop` points GateError (exit 1); either
    way nothing is written."""
    cfg.validate()
    ckpt = Checkpoint.load(cfg.checkpoint)  # every field and the model checked before the folder is touched
    data = _labelled_data(cfg, ckpt)
    if images is None and data is not None:
        images = data.test_x
    with output_folder(cfg.out_dir) as out:  # a failed export leaves no empty folder behind
        return _Export(cfg, ckpt, data, images, reporter or Silent()).run(out)


def artifact_meta(ckpt: Checkpoint, checkpoint_path: str | None) -> ArtifactMeta:
    """The checkpoint's contract, copied, with the provenance of this export added."""
    import onnx  # noqa: F401 (imported so that versions() reports the running onnx)

    return replace(
        ckpt.artifact,
        checkpoint_sha256=file_sha256(checkpoint_path) if checkpoint_path else "",
        versions=versions("torch", "onnx", "onnxruntime"),
    )


def _labelled_data(cfg: ExportConfig, ckpt: Checkpoint) -> Any:
    """--data's images (CifarData), whose classes must be the checkpoint's; None without --data."""
    if not cfg.data:
        return None
    from cifarkit.data import load_data

    data = load_data(cfg.data, cfg.data_dir)
    if tuple(data.classes) != ckpt.class_names:
        raise CifarkitError(
            f"--data: {data.source} has classes {', '.join(data.classes)}; the checkpoint's are "
            f"{', '.join(ckpt.class_names)}: verification and calibration need the model's own classes"
        )
    return data


class _Export:
    """One export: build -> check exactly -> compress -> gate on labelled accuracy -> table -> write."""

    def __init__(self, cfg: ExportConfig, ckpt: Checkpoint, data: Any, images: np.ndarray | None, rep: Reporter):
        self.cfg, self.ckpt, self.data, self.rep = cfg, ckpt, data, rep
        self.tta = ckpt.artifact.tta if cfg.tta == "recipe" else cfg.tta
        self.meta = replace(artifact_meta(ckpt, cfg.checkpoint), tta=self.tta)
        net = ckpt.model().folded() if cfg.quantize == "int8" else ckpt.model()  # int8: BatchNorm folded first
        self.model = DeployedModel(net, self.meta.mean, self.meta.std, self.tta).eval()
        if images is not None and tuple(images.shape[1:]) != (*self.meta.image_size, 3):
            raise CifarkitError(
                f"--data: images are {images.shape[1:]}, the model expects {(*self.meta.image_size, 3)}"
            )
        self.sample = reference_inputs(self.meta, images, count=cfg.verify_images or EXACT_VERIFY_IMAGES)
        self.checks: list[Verification] = []
        self.notes: list[str] = []

    def run(self, out: Path) -> ExportResult:
        cfg = self.cfg
        formats = ("onnx",) if cfg.kind == "triton" else cfg.formats
        self.rep.phase("export", len(formats))
        payloads = {fmt: self.exact(fmt) for fmt in formats}  # fp32, each checked against the eager model
        variant: dict[str, Any] = {}
        accuracy = None
        if cfg.quantize == "int8" or cfg.precision == "fp16":
            payloads["onnx"], variant = self.compress(payloads["onnx"])
        if cfg.lossy:
            accuracy = self.gate(payloads)
            variant = {**variant, "tta": self.tta, "verification": accuracy.to_dict()}
        meta = replace(self.meta, variant=variant)
        if "onnx" in payloads:
            payloads["onnx"] = with_metadata(payloads["onnx"], meta)
        table, verified_on = self.table(payloads, accuracy)
        paths = self.write(out, payloads, meta, accuracy)
        for row in table:
            row.path = paths.get("triton" if row.fmt == "onnx" and "triton" in paths else row.fmt or "")
        return ExportResult(paths, meta, self.checks, self.notes, accuracy, table, verified_on)

    # ---- building and checking ------------------------------------------------------------------------

    def exact(self, fmt: str) -> bytes:
        """The fp32 artifact in `fmt`, compared with the eager model (max |dlogit| <= 1e-4, the same classes)."""
        if fmt == "onnx":
            payload, notes = onnx_bytes(self.model, self.meta, self.cfg.opset)
            self.notes.extend(notes)
            check = compare(fmt, onnx_runner(payload), self.model, self.sample)
        else:
            payload = torchscript_bytes(self.model, self.meta)
            check = compare(fmt, torchscript_runner(payload), self.model, self.sample)
        if not check.ok:
            raise CifarkitError(
                f"{fmt} artifact does not match the eager model: max |logit difference| {check.max_abs_diff:.3g} "
                f"(limit {MAX_ABS_LOGIT_DIFF:g}), same predicted classes: {check.same_classes}; nothing written"
            )
        self.checks.append(check)
        self.rep.progress(len(self.checks))
        return payload

    def compress(self, payload: bytes) -> tuple[bytes, dict[str, Any]]:
        from cifarkit.export import compress

        if self.cfg.precision == "fp16":
            payload, how = compress.fp16_bytes(payload)
            return payload, {"precision": "fp16", "fp16": how}
        data = self.data
        chosen = compress.calibration_indices(data.train_y, self.cfg.calibration_images)
        self.rep.note(f"calibrating int8 on {len(chosen):,} training images of {data.source}")
        payload, how = compress.int8_bytes(payload, np.ascontiguousarray(data.train_x[chosen]))
        how["batchnorm"] = "folded into the convolutions before quantization"
        how["calibration"] = compress.calibration_record(data.source, chosen)
        return payload, {"precision": "int8", "quantization": how}

    def gate(self, payloads: dict[str, bytes]) -> Accuracy:
        """The variant against the checkpoint's own fp32 model on the labelled test images; GateError if it loses
        more than --max-drop points (with the figures), else the figures."""
        data, cfg = self.data, self.cfg
        n = cfg.verify_images or len(data.test_y)
        x, y = data.test_x[:n], data.test_y[:n]
        fmt = "onnx" if "onnx" in payloads else "torchscript"
        run = onnx_runner(payloads["onnx"]) if fmt == "onnx" else torchscript_runner(payloads[fmt])
        self.rep.note(f"verifying the {cfg.variant_name} model on {len(y):,} labelled test images")
        acc = labelled_check(run, self.ckpt.deployed(), x, y)
        if acc.drop_points > cfg.max_drop:
            raise GateError(
                f"the {cfg.variant_name} model loses {acc.drop_points:.2f} accuracy points on {acc.images:,} test "
                f"images ({100 * acc.artifact:.2f} % against fp32's {100 * acc.reference:.2f} %, the same class for "
                f"{100 * acc.agree:.2f} %), over --max-drop {cfg.max_drop:g}; nothing written"
            )
        return acc

    # ---- the table --------------------------------------------------------------------------------------

    def table(self, payloads: dict[str, bytes], accuracy: Accuracy | None) -> tuple[list[TableRow], int]:
        """Each artifact's size, accuracy and images/s, against the fp32 ONNX model with the recipe's TTA."""
        cfg = self.cfg
        labelled = self.data is not None
        if accuracy is not None:
            n = accuracy.images
            x, y = self.data.test_x[:n], self.data.test_y[:n]
        else:
            x = self.sample
            y = self.data.test_y[: len(x)] if labelled else None
        fp32_payload = payloads.get("onnx") if not cfg.lossy else self.reference_onnx()
        rows = []
        if fp32_payload is not None:  # the reference row; without a variant it is the ONNX artifact itself
            rows.append(self.row("fp32 onnx", None if cfg.lossy else "onnx", fp32_payload, x, y))
        for fmt, payload in payloads.items():
            if fmt == "onnx" and not cfg.lossy:
                continue
            name = f"{cfg.variant_name} onnx" if fmt == "onnx" else fmt
            rows.append(self.row(name, fmt, payload, x, y))
        base = rows[0].images_per_s if rows else None
        for row in rows:
            row.ratio = row.images_per_s / base if row.images_per_s and base else None
        return rows, len(x)

    def reference_onnx(self) -> bytes | None:
        """The fp32 ONNX model with the checkpoint's own TTA, built for the table only."""
        if not self.cfg.speed:
            return None
        reference = self.ckpt.deployed()
        payload, _ = onnx_bytes(reference, self.ckpt.artifact, self.cfg.opset)
        return payload

    def row(self, artifact: str, fmt: str | None, payload: bytes, x: np.ndarray, y: np.ndarray | None) -> TableRow:
        run = torchscript_runner(payload) if fmt == "torchscript" else onnx_runner(payload)
        acc = float((classes_of(run, x) == y).mean()) if y is not None and len(y) else None
        speed = images_per_second(run, x) if self.cfg.speed else None
        return TableRow(artifact, fmt, len(payload), acc, speed, None)

    # ---- writing ----------------------------------------------------------------------------------------

    def write(self, out: Path, payloads: dict[str, bytes], meta: ArtifactMeta, acc: Accuracy | None) -> dict:
        sidecar = _sidecar(meta, payloads, self.checks, acc)
        if self.cfg.kind == "triton":
            from cifarkit.export.triton import write_repository

            name = self.cfg.triton_name or meta.model_name
            return write_repository(out, name, payloads["onnx"], meta, sidecar)
        files = {FILE_NAMES[fmt]: payload for fmt, payload in payloads.items()}
        files[ARTIFACT_JSON_NAME] = sidecar
        stale = [name for fmt, name in FILE_NAMES.items() if fmt not in payloads and (out / name).exists()]
        write_set(out, files, remove=stale)
        self.notes.extend(f"removed the older {name}: it is not part of this export" for name in stale)
        paths = {fmt: out / FILE_NAMES[fmt] for fmt in payloads}
        paths["json"] = out / ARTIFACT_JSON_NAME
        return paths


def _sidecar(meta: ArtifactMeta, payloads: dict[str, bytes], checks: list[Verification], acc: Accuracy | None) -> bytes:
    """model.json: the metadata, the files of the set and how each was verified."""
    sidecar = json.loads(meta.to_json())
    sidecar["files"] = {fmt: FILE_NAMES[fmt] for fmt in payloads}
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
    if acc is not None:
        sidecar["labelled_verification"] = acc.to_dict()
    return (json.dumps(sidecar, indent=2, sort_keys=True) + "\n").encode()
