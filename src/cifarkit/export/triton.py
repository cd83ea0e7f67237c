"""A Triton Inference Server model repository for a cifarkit ONNX model (`cifar-export --format triton`):

    REPO/<name>/config.pbtxt        onnxruntime backend, uint8 images [32, 32, 3] in (the batch dimension is
                                    Triton's, up to max_batch_size), logits and probabilities out, dynamic
                                    batching, one instance (GPU where there is one, else CPU)
    REPO/<name>/labels.txt          the class names, one a line, index order (Triton's label_filename)
    REPO/<name>/model.json          cifarkit's metadata, and how the model was verified
    REPO/<name>/1/model.onnx        version 1

`tritonserver --model-repository REPO` serves it; docs/artifacts.md has the command and a tritonclient request.
A repository folder already holding a model of that name made from another checkpoint is refused, never
overwritten; the same model is replaced file by file, each set all old or all new.
"""

from __future__ import annotations

import json
from pathlib import Path

from cifarkit.atomic import staged_folder, write_set
from cifarkit.errors import CifarkitError
from cifarkit.spec import ARTIFACT_JSON_NAME, INPUT_NAME, OUTPUT_NAMES, ArtifactMeta

MAX_BATCH_SIZE = 256  # images a request batch at most: cifar-infer's range of best throughput (128-512)
PREFERRED_BATCH_SIZES = (64, 256)  # what dynamic batching waits to fill
MAX_QUEUE_DELAY_US = 1000  # how long it waits to fill one, in microseconds
LABELS_NAME = "labels.txt"
VERSION = "1"


def config_pbtxt(name: str, meta: ArtifactMeta) -> str:
    """The model's config.pbtxt (Triton's ModelConfig in protobuf text format)."""
    h, w = meta.image_size
    classes = len(meta.class_names)
    outputs = ",\n".join(
        f'  {{\n    name: "{out}"\n    data_type: TYPE_FP32\n    dims: [ {classes} ]\n'
        + (f'    label_filename: "{LABELS_NAME}"\n' if out == OUTPUT_NAMES[1] else "")
        + "  }"
        for out in OUTPUT_NAMES
    )
    preferred = ", ".join(str(b) for b in PREFERRED_BATCH_SIZES)
    return (
        f'name: "{name}"\n'
        'backend: "onnxruntime"\n'
        f"max_batch_size: {MAX_BATCH_SIZE}\n"
        f'input [\n  {{\n    name: "{INPUT_NAME}"\n    data_type: TYPE_UINT8\n    dims: [ {h}, {w}, 3 ]\n  }}\n]\n'
        f"output [\n{outputs}\n]\n"
        f"dynamic_batching {{\n  preferred_batch_size: [ {preferred} ]\n"
        f"  max_queue_delay_microseconds: {MAX_QUEUE_DELAY_US}\n}}\n"
        "instance_group [\n  {\n    count: 1\n    kind: KIND_AUTO\n  }\n]\n"
        "version_policy: { latest: { num_versions: 1 } }\n"
    )


def write_repository(repo: Path, name: str, payload: bytes, meta: ArtifactMeta, sidecar: bytes) -> dict[str, Path]:
    """Write the model `name` into the repository `repo` (created if needed); returns the files by role."""
    folder = repo / name
    files = {
        "config.pbtxt": config_pbtxt(name, meta).encode(),
        LABELS_NAME: ("\n".join(meta.class_names) + "\n").encode(),
        ARTIFACT_JSON_NAME: sidecar,
    }
    if folder.exists():
        _check_same_model(folder, name, meta, repo)
        write_set(folder / VERSION, {"model.onnx": payload}, option="--out")
        write_set(folder, files, option="--out")
    else:
        repo.mkdir(parents=True, exist_ok=True)
        with staged_folder(folder, "--out") as tmp:  # a new model appears complete or not at all
            (tmp / VERSION).mkdir()
            (tmp / VERSION / "model.onnx").write_bytes(payload)
            for file_name, data in files.items():
                (tmp / file_name).write_bytes(data)
    return {
        "triton": folder / VERSION / "model.onnx",
        "config": folder / "config.pbtxt",
        "json": folder / ARTIFACT_JSON_NAME,
    }


def _check_same_model(folder: Path, name: str, meta: ArtifactMeta, repo: Path) -> None:
    """A model folder of that name may only be replaced by the same checkpoint's export."""
    try:
        held = json.loads((folder / ARTIFACT_JSON_NAME).read_text())
        same = held.get("checkpoint_sha256") == meta.checkpoint_sha256 and held.get("schema") == meta.schema
    except (OSError, ValueError, AttributeError):
        same = False
    if not same:
        raise CifarkitError(
            f"--out {repo} already holds a model named {name!r} (made from another checkpoint, or not by cifarkit); "
            "pass --triton-name with another name, or remove that folder"
        )
