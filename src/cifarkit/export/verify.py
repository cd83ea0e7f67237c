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


# ---------------------------------------------------------------------------------------------------------
# Artifacts that cannot match fp32 exactly: accuracy on labelled images, against the fp32 model
# ---------------------------------------------------------------------------------------------------------

LABELLED_BATCH = 256  # images a call when measuring accuracy


@dataclass
class Accuracy:
    """An artifact against the fp32 eager model (the checkpoint's own test-time augmentation) on labelled
    images."""

    images: int
    reference: float  # the fp32 model's accuracy, a fraction
    artifact: float  # the artifact's
    agree: float  # the share of images both put in the same class

    @property
    def drop_points(self) -> float:
        """Accuracy points lost (negative: gained)."""
        return 100.0 * (self.reference - self.artifact)

    def to_dict(self) -> dict[str, float | int]:
        return {
            "images": self.images,
            "fp32_accuracy": round(self.reference, 6),
            "accuracy": round(self.artifact, 6),
            "drop_points": round(self.drop_points, 4),
            "same_class": round(self.agree, 6),
        }


def classes_of(run: Callable[[np.ndarray], np.ndarray], images: np.ndarray) -> np.ndarray:
    """The classes `run` (uint8 batch -> logits) gives `images`, batch by batch: int64 [N]."""
    out = [run(images[s : s + LABELLED_BATCH]).argmax(1) for s in range(0, len(images), LABELLED_BATCH)]
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def labelled_check(
    run: Callable[[np.ndarray], np.ndarray], reference: DeployedModel, images: np.ndarray, labels: np.ndarray
) -> Accuracy:
    """The artifact's accuracy, the fp32 model's, and how often they agree, on the same labelled images."""
    ours = classes_of(run, images)
    theirs = classes_of(lambda b: reference.run_numpy(b, batch_size=LABELLED_BATCH)[0], images)
    n = max(len(labels), 1)
    return Accuracy(len(labels), float((theirs == labels).sum()) / n, float((ours == labels).sum()) / n,
                    float((ours == theirs).sum()) / n)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Speed, for the table every export ends with
# ---------------------------------------------------------------------------------------------------------

SPEED_BATCH = 256  # images a call: cifar-infer's range of best throughput (128-512)
SPEED_REPEATS = 3  # timed calls after a warm-up; the median is reported


def images_per_second(run: Callable[[np.ndarray], np.ndarray], images: np.ndarray) -> float:
    """Model-only throughput of `run` at batch SPEED_BATCH on this machine: the median of SPEED_REPEATS timed calls
    after one untimed call (allocations, kernel selection). `images` are cycled to fill a batch."""
    import time

    batch = np.ascontiguousarray(np.resize(images, (SPEED_BATCH, *images.shape[1:])))
    run(batch)
    times = []
    for _ in range(SPEED_REPEATS):
        t0 = time.perf_counter()
        run(batch)
        times.append(time.perf_counter() - t0)
    return SPEED_BATCH / sorted(times)[len(times) // 2]
