"""Verification: an artifact and the eager model on the same images, at several batch sizes. Nothing is written
until every artifact of an export has passed.

    check = compare("onnx", onnx_runner(payload), model, reference_inputs(meta, images, count=256))
    assert check.ok
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from cifarkit.errors import CifarkitError
from cifarkit.model.deployed import DeployedModel
from cifarkit.spec import ArtifactMeta

VERIFY_BATCH_SIZES = (1, 2, 7, 64)
MAX_ABS_LOGIT_DIFF = 1e-4


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
