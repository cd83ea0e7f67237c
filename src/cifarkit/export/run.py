"""Export stage: ExportConfig -> export() -> ExportResult: verified, self-describing ONNX and TorchScript files.

Both artifacts are the same wrapped module (`DeployedModel`): input `images` uint8 [N, H, W, 3] RGB, outputs
`logits` and `probabilities` float32 [N, C]; cast, scale, normalization (and test-time augmentation, where
the recipe uses it) happen inside the graph. Nothing is written until every artifact has been run and compared
with the eager model; then the set is written so that a reader sees all new files or all old ones.

    from cifarkit.export import ExportConfig, export
    result = export(ExportConfig(checkpoint="runs/blog/checkpoint.pt", out="artifacts/", format="all"))
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from cifarkit.atomic import output_folder, write_set
from cifarkit.errors import CifarkitError
from cifarkit.export.config import ExportConfig
from cifarkit.export.formats import onnx_bytes, onnx_runner, torchscript_bytes, torchscript_runner
from cifarkit.export.verify import MAX_ABS_LOGIT_DIFF, Verification, compare, reference_inputs
from cifarkit.model.checkpoint import Checkpoint, file_sha256
from cifarkit.spec import ARTIFACT_JSON_NAME, ArtifactMeta, versions
from cifarkit.stage import Reporter, Silent

FILE_NAMES = {"onnx": "model.onnx", "torchscript": "model.pt"}


@dataclass
class ExportResult:
    paths: dict[str, Path]  # format -> written file, plus "json" for the sidecar
    meta: ArtifactMeta
    checks: list[Verification] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. "dynamo exporter failed, used the legacy exporter"


def export(cfg: ExportConfig, reporter: Reporter | None = None, *, images: np.ndarray | None = None) -> ExportResult:
    """Export `cfg.checkpoint` into `cfg.out_dir` in each of `cfg.formats`, verifying each artifact against the
    eager model on `images` (uint8 [N, H, W, 3]; else the test split of `cfg.data`; else a seeded random batch)
    at batch sizes 1, 2, 7 and 64. A failed check raises CifarkitError with the worst difference and writes
    nothing for any format."""
    cfg.validate()
    rep = reporter or Silent()
    ckpt = Checkpoint.load(cfg.checkpoint)  # every field and the model checked before the folder is touched
    if images is None and cfg.data:
        from cifarkit.data import load_data

        images = load_data(cfg.data, cfg.data_dir).test_x
    with output_folder(cfg.out_dir) as out:  # a failed export leaves no empty folder behind
        return _export(cfg, ckpt, out, images, rep)


def artifact_meta(ckpt: Checkpoint, checkpoint_path: str | None) -> ArtifactMeta:
    """The checkpoint's contract, copied, with the provenance of this export added."""
    import onnx  # noqa: F401 (imported so that versions() reports the running onnx)

    return replace(
        ckpt.artifact,
        checkpoint_sha256=file_sha256(checkpoint_path) if checkpoint_path else "",
        versions=versions("torch", "onnx"),
    )


def _export(cfg: ExportConfig, ckpt: Checkpoint, out: Path, images: np.ndarray | None, rep: Reporter) -> ExportResult:
    model = ckpt.deployed()
    meta = artifact_meta(ckpt, cfg.checkpoint)
    if images is not None and tuple(images.shape[1:]) != (*meta.image_size, 3):
        raise CifarkitError(f"--data: images are {images.shape[1:]}, the model expects {(*meta.image_size, 3)}")
    sample = reference_inputs(meta, images, count=cfg.verify_count)

    payloads: dict[str, bytes] = {}
    checks: list[Verification] = []
    notes: list[str] = []
    rep.phase("export", len(cfg.formats))
    for fmt in cfg.formats:
        if fmt == "onnx":
            payload, fmt_notes = onnx_bytes(model, meta, cfg.opset)
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
        rep.progress(len(checks))

    # Everything verified: now write the set (model files and sidecar) so that a reader sees all new or all old.
    files = {FILE_NAMES[fmt]: payload for fmt, payload in payloads.items()}
    files[ARTIFACT_JSON_NAME] = _sidecar(meta, payloads, checks)
    stale = [name for fmt, name in FILE_NAMES.items() if fmt not in payloads and (out / name).exists()]
    write_set(out, files, remove=stale)
    notes.extend(f"removed the older {name}: it is not part of this export" for name in stale)
    paths = {fmt: out / FILE_NAMES[fmt] for fmt in payloads}
    paths["json"] = out / ARTIFACT_JSON_NAME
    return ExportResult(paths=paths, meta=meta, checks=checks, notes=notes)


def _sidecar(meta: ArtifactMeta, payloads: dict[str, bytes], checks: list[Verification]) -> bytes:
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
    return (json.dumps(sidecar, indent=2, sort_keys=True) + "\n").encode()
