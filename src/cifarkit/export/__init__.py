"""Export stage: ExportConfig -> export(cfg, reporter) -> ExportResult, verified ONNX and TorchScript files.

    from cifarkit.export import ExportConfig, export
    result = export(ExportConfig(checkpoint="runs/blog/checkpoint.pt", out="artifacts/"))

    config.py    ExportConfig and its checks (no torch)
    formats.py   ONNX and TorchScript bytes with cifarkit's metadata, and their runners
    compress.py  fp16 weights and int8 static quantization of a verified fp32 ONNX model
    verify.py    an artifact against the eager model (exact), or against the fp32 model on labelled images;
                 images/s for the closing table
    triton.py    a Triton model repository (config.pbtxt, labels, version 1)
    run.py       export(): load and check the checkpoint, build, check, compress, gate, tabulate, write

Names are imported lazily, so that `cifarkit.export.config` stays torch-free. Export imports nothing from
training (cifarkit.train): the checkpoint (cifarkit.model) is all it reads.
"""

from __future__ import annotations

from cifarkit.stage import lazy_exports

_EXPORTS = {
    "ExportConfig": "config",
    "FORMATS": "config",
    "DEFAULT_OPSET": "config",
    "ExportResult": "run",
    "TableRow": "run",
    "Accuracy": "verify",
    "export": "run",
    "FILE_NAMES": "run",
    "load_torchscript": "formats",
    "onnx_bytes": "formats",
    "torchscript_bytes": "formats",
    "Verification": "verify",
    "compare": "verify",
    "MAX_ABS_LOGIT_DIFF": "verify",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
