"""The evaluation run: decode in the ordered window, run each model on each batch, accumulate."""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from cifarkit.errors import CifarkitError
from cifarkit.evaluation.config import DEFAULT_TOP_K, FAILURES_KEPT, EvalConfig
from cifarkit.evaluation.metrics import (
    bootstrap_interval,
    brier_per_image,
    calibration_counts,
    ece_from_counts,
    macro_average,
    mcnemar_exact,
    most_confused,
    nll_per_image,
    per_class_scores,
    predicted_classes,
    top_k_hits,
)
from cifarkit.evaluation.results import Calibration, CalibrationBin, Comparison, EvalReport, Mistake, ModelReport
from cifarkit.evaluation.sources import LoadedModel, column_order, open_labelled, open_model
from cifarkit.files import Failure, chunked, default_threads, ordered_map
from cifarkit.preprocess import ImageError, to_pixels
from cifarkit.spec import versions

# ---------------------------------------------------------------------------------------------------------
# The run: decode in the ordered window, run each model on each batch, accumulate
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchResult:
    """What the on_batch hook sees for each batch, in input order (the CLI writes predictions.csv from it)."""

    sources: list[str]  # the images classified
    true: np.ndarray  # int64 [n] class index
    predicted: list[np.ndarray]  # per model: int64 [n]
    probability: list[np.ndarray]  # per model: float [n], the probability of the predicted class
    failures: list[Failure]  # inputs of this batch that could not be read


class _Tally:
    """One model's running figures: nothing per image is kept."""

    def __init__(self, num_classes: int, k: int, bins: int) -> None:
        self.k = k
        self.confusion = np.zeros((num_classes, num_classes), np.int64)
        self.topk = 0
        self.nll = 0.0
        self.brier = 0.0
        self.calibration = np.zeros((3, bins), np.float64)

    def add(self, logits: np.ndarray, probs: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pred = predicted_classes(logits)
        conf = probs[np.arange(len(pred)), pred]
        np.add.at(self.confusion, (y, pred), 1)  # in place: no [C, C] temporary per batch
        self.topk += int(top_k_hits(logits, y, self.k).sum())
        self.nll += float(nll_per_image(logits, y).sum())
        self.brier += float(brier_per_image(probs, y).sum())
        self.calibration += calibration_counts(conf, pred == y, self.calibration.shape[1])
        return pred, conf

    def report(self, model: LoadedModel, names: tuple[str, ...], mistakes: tuple[Mistake, ...]) -> ModelReport:
        n, correct = int(self.confusion.sum()), int(np.trace(self.confusion))
        scores = per_class_scores(self.confusion, names)
        bins = self.calibration.shape[1]
        cal_bins = tuple(
            CalibrationBin(m / bins, (m + 1) / bins, int(c), s / c if c else None, r / c if c else None)
            for m, (c, s, r) in enumerate(self.calibration.T.tolist())
        )
        calibration = Calibration(ece_from_counts(self.calibration), self.nll / n, self.brier / n, cal_bins)
        return ModelReport(
            model.path, model.kind, model.meta, n, correct, correct / n, bootstrap_interval(correct, n),
            self.k, self.topk / n, bootstrap_interval(self.topk, n), tuple(scores), macro_average(scores),
            self.confusion, tuple(most_confused(self.confusion, names)), calibration, mistakes,
        )  # fmt: skip


class _Mistakes:
    """The `keep` most confident mistakes seen so far: a min-heap on confidence, so memory is bounded."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.heap: list[tuple[float, int, Mistake]] = []
        self.seen = 0

    def offer(self, names: list[str], sources: list[str], pixels: np.ndarray, y: np.ndarray, outs: list) -> None:
        pred, conf = outs[0][2], outs[0][3]
        for j in np.flatnonzero(pred != y).tolist():
            self.seen += 1
            p = float(conf[j])
            if len(self.heap) == self.keep and (not self.keep or p <= self.heap[0][0]):
                continue
            b = outs[1] if len(outs) > 1 else None
            m = Mistake(
                sources[j], names[y[j]], names[pred[j]], p, pixels[j].copy(),
                names[b[2][j]] if b else None, float(b[3][j]) if b else None,
            )  # fmt: skip
            item = (p, self.seen, m)
            heapq.heappush(self.heap, item) if len(self.heap) < self.keep else heapq.heapreplace(self.heap, item)

    def result(self) -> tuple[Mistake, ...]:
        return tuple(m for _, _, m in sorted(self.heap, key=lambda t: (-t[0], t[1])))


class Evaluation:
    """One or two models bound to labelled images; everything that can be wrong with the inputs is found
    here (CifarkitError), before run() reads a single image."""

    def __init__(self, config: EvalConfig) -> None:
        config.validate()
        self.config = config
        paths = [config.model] + ([config.model_b] if config.model_b else [])
        self.models = [open_model(p, load_timeout=config.load_timeout) for p in paths]
        self.order_b = column_order(self.models[0], self.models[1]) if config.model_b else None
        self.class_names = tuple(self.models[0].meta.class_names)
        if config.top_k is not None and config.top_k > len(self.class_names):
            raise CifarkitError(f"--top-k {config.top_k} is more than the model's {len(self.class_names)} classes")
        self.top_k = min(config.top_k or DEFAULT_TOP_K, len(self.class_names))
        self.data = open_labelled(
            config.data,
            self.class_names,
            split=config.split_or_default,
            skip_unknown=config.skip_unknown,
            data_dir=config.data_dir,
        )

    def run(self, on_batch: Callable[[BatchResult], None] | None = None) -> EvalReport:
        """Stream every image through every model; on_batch sees each batch's predictions and failures."""
        cfg, models = self.config, self.models
        rules = list(dict.fromkeys(m.rule for m in models))  # decode once per distinct preprocessing rule
        tallies = [_Tally(len(self.class_names), self.top_k, cfg.bins) for _ in models]
        mistakes = _Mistakes(cfg.mistakes)
        pair = np.zeros(4, np.float64)  # agree, b, c, max |dprob|
        failures: list[str] = []
        failed = 0
        threads = default_threads() if cfg.threads is None else cfg.threads
        t0 = time.perf_counter()
        decode = _Decoder(rules)
        for sources, labels, pixels, bad in ordered_map(decode, chunked(self.data.items(), cfg.batch_size), threads):
            raw = [self._outputs(i, pixels) for i in range(len(models))] if sources else []
            sources, labels, pixels, raw, broken = _finite_only(sources, labels, pixels, raw, len(models) > 1)
            bad = bad + broken  # unreadable images, then those a model gave no finite answer for
            failed += len(bad)
            failures.extend(f.message for f in bad[: max(0, FAILURES_KEPT - len(failures))])
            if not sources:
                if on_batch is not None:
                    on_batch(BatchResult([], labels, [], [], bad))
                continue
            outs = [(lo, pr, *tally.add(lo, pr, labels)) for (lo, pr), tally in zip(raw, tallies, strict=True)]
            if len(outs) == 2:
                (_, pa, ya, _), (_, pb, yb, _) = outs
                right_a, right_b = ya == labels, yb == labels
                pair[:3] += ((ya == yb).sum(), (right_a & ~right_b).sum(), (~right_a & right_b).sum())
                pair[3] = max(pair[3], float(np.abs(pa.astype(np.float64) - pb).max()))
            mistakes.offer(self.class_names, sources, pixels[models[0].rule], labels, outs)
            if on_batch is not None:
                on_batch(BatchResult(sources, labels, [o[2] for o in outs], [o[3] for o in outs], bad))
        seconds = time.perf_counter() - t0
        if not tallies[0].confusion.sum():
            raise CifarkitError(f"--data: none of the {failed:,} images could be evaluated (see the errors above)")
        reports = tuple(
            tally.report(model, self.class_names, mistakes.result() if i == 0 else ())
            for i, (model, tally) in enumerate(zip(models, tallies, strict=True))
        )
        comparison = None
        if len(models) == 2:
            n = reports[0].images
            agree, b, c = (int(v) for v in pair[:3])
            comparison = Comparison(n, agree, float(pair[3]), b, c, mcnemar_exact(b, c))
        packages = ("python", "numpy", "pillow", "onnxruntime") + (
            ("torch",) if any(m.kind != "onnx" for m in models) else ()
        )
        return EvalReport(self.data, reports, comparison, failed, tuple(failures), seconds, cfg, versions(*packages))

    def _outputs(self, i: int, pixels: dict) -> tuple[np.ndarray, np.ndarray]:
        """Model i's (logits, probabilities) for a batch, its columns in the first model's class order."""
        model = self.models[i]
        logits, probs = model.run(pixels[model.rule])
        if i and self.order_b is not None:
            logits, probs = logits[:, self.order_b], probs[:, self.order_b]
        return logits, probs


def _finite_only(sources: list[str], labels: np.ndarray, pixels: dict, raw: list, two: bool) -> tuple:
    """The batch without the images for which a model's output is not finite (NaN or Inf: a broken model must
    not score an image), and a Failure for each of those, as cifar-infer reports them."""
    ok = np.ones(len(sources), bool)
    which = np.full(len(sources), -1)
    for i, (logits, probs) in enumerate(raw):
        bad = ~(np.isfinite(logits).all(axis=1) & np.isfinite(probs).all(axis=1))
        which[bad & ok] = i
        ok &= ~bad
    if ok.all():
        return sources, labels, pixels, raw, []
    broken = [
        Failure(src, f"{src}: {f'model {chr(65 + m)}' if two else 'the model'}'s output is not finite (NaN or Inf); "
                "the model is broken")
        for src, m in zip(sources, which.tolist(), strict=True) if m >= 0
    ]  # fmt: skip
    keep = np.flatnonzero(ok)
    sources = [sources[j] for j in keep.tolist()]
    pixels = {rule: px[keep] for rule, px in pixels.items()}
    return sources, labels[keep], pixels, [(lo[keep], pr[keep]) for lo, pr in raw], broken


class _Decoder:
    """A chunk of (name, item, label) -> (names, labels, {rule: uint8 pixels}, failures) for the images that
    decoded; runs in the decoding threads."""

    def __init__(self, rules: list[tuple[tuple[int, int], str, str]]) -> None:
        self.rules = rules

    def __call__(self, chunk: tuple[int, list[tuple[str, Any, int]]]) -> tuple:
        _, items = chunk
        out = {rule: np.empty((len(items), *rule[0], 3), np.uint8) for rule in self.rules}  # [B, H, W, 3] each
        names: list[str] = []
        labels: list[int] = []
        bad: list[Failure] = []
        for name, item, label in items:
            if isinstance(item, Failure):
                bad.append(item)
                continue
            try:
                for (size, mode, filt), px in out.items():
                    px[len(names)] = to_pixels(item, size, mode, filt, name)
            except ImageError as exc:
                bad.append(Failure(name, str(exc)))
                continue
            names.append(name)
            labels.append(label)
        return names, np.array(labels, np.int64), {r: px[: len(names)] for r, px in out.items()}, bad
