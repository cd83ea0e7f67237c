"""Dependencies point down the layout (README, "How the code is laid out"): the torch-free core at the bottom,
the model side above it, the stages above that, the command line on top. Checked in fresh processes, by what
importing a module really loads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

CORE = ("cifarkit.errors", "cifarkit.spec", "cifarkit.stage", "cifarkit.escape", "cifarkit.files", "cifarkit.atomic")
STAGES = ("cifarkit.model", "cifarkit.train", "cifarkit.export", "cifarkit.infer", "cifarkit.evaluation")


def _loaded_after(module: str) -> set[str]:
    code = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return set(json.loads(out.stdout))


def _hits(loaded: set[str], never: tuple[str, ...]) -> list[str]:
    """The loaded modules that are, or are inside, a package of `never`."""
    return sorted(m for m in loaded if any(m == n or m.startswith(n + ".") for n in never))


@pytest.mark.parametrize(
    ("module", "never"),
    [
        # The core: no torch, no numpy, no stage.
        *((m, ("torch", "numpy", *STAGES, "cifarkit.cli")) for m in CORE),
        ("cifarkit.preprocess", ("torch", "PIL", *STAGES)),  # Pillow only when an image needs it
        ("cifarkit.data", ("torch", *STAGES)),
        ("cifarkit.shards", ("torch", "numpy", "pyarrow", *STAGES)),  # pyarrow only when a shard is met
        # Every stage's config, and every command's module: options are checked before anything heavy loads.
        ("cifarkit.train.config", ("torch", "numpy")),
        ("cifarkit.export.config", ("torch", "numpy", "onnx")),
        ("cifarkit.infer.config", ("torch", "numpy", "onnxruntime")),
        ("cifarkit.evaluation.config", ("torch", "numpy", "onnxruntime")),
        ("cifarkit.pack", ("torch", "numpy", "pyarrow")),
        ("cifarkit.train.budget", ("torch", "numpy")),
        *((f"cifarkit.cli.{c}", ("torch", "onnx", "cifarkit.model.nets")) for c in ("train", "export", "eval", "pack")),
        ("cifarkit.cli.infer", ("torch", "cifarkit.model", "ray", "pyarrow", "PIL")),
        # The model side knows no stage; export knows no training; inference knows no torch.
        ("cifarkit.model.checkpoint", ("cifarkit.train.run", "cifarkit.train.batches", "cifarkit.data", "PIL")),
        ("cifarkit.export.run", ("cifarkit.train", "cifarkit.data", "PIL")),
        ("cifarkit.infer.run", ("torch", "cifarkit.model", "cifarkit.train", "ray", "pyarrow")),
        ("cifarkit.evaluation.stage", ("torch", "cifarkit.model", "cifarkit.train")),
        # The service: its options and command are light; the HTTP engine is a client, Ray-free.
        ("cifarkit.serve.config", ("torch", "numpy", "ray")),
        ("cifarkit.cli.serve", ("torch", "numpy", "ray", "starlette", "aiohttp", "PIL")),
        ("cifarkit.infer.http", ("torch", "ray", "cifarkit.serve")),  # the client shares cifarkit.multipart only
        ("cifarkit.multipart", ("torch", "numpy", "ray", "cifarkit.serve", "cifarkit.infer")),
        # A run's live log loads TensorBoard's writer only when a run folder first holds a checkpoint.
        ("cifarkit.train.events", ("torch", "tensorboard")),
    ],
)
def test_module_imports_only_what_it_needs(module, never):
    assert not _hits(_loaded_after(module), never), f"{module} imports {_hits(_loaded_after(module), never)}"


def test_the_model_names_are_the_nets():
    """cifarkit.model.MODEL_NAMES (torch-free, for option checks) lists exactly the nets cifarkit builds."""
    from cifarkit.model import MODEL_NAMES
    from cifarkit.model.nets import MODELS

    assert tuple(MODELS) == MODEL_NAMES
