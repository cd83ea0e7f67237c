"""The evaluation's files: report.json and the three pictures (matplotlib, Agg: no display, no torch).

write_report_files(report, folder)     # report.json, confusion.png, reliability.png, mistakes.png
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cifarkit.escape import escape_name
from cifarkit.evaluation.results import EvalReport, ModelReport


def write_report_files(r: EvalReport, folder: Path) -> None:
    """report.json, confusion.png, reliability.png and mistakes.png into `folder`."""
    # ASCII JSON: any name (non-UTF-8 file names included, as \udcNN escapes) parses back to itself.
    (folder / "report.json").write_text(json.dumps(r.to_dict(), indent=2, allow_nan=False) + "\n", encoding="ascii")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = _model_labels(r)
    for name, plot in (("confusion.png", plot_confusion), ("reliability.png", plot_reliability)):
        fig = plot(r.models, labels)
        fig.savefig(folder / name, dpi=120)
        plt.close(fig)
    fig = plot_mistakes(r.models[0], labels[0], len(r.models) > 1)
    fig.savefig(folder / "mistakes.png", dpi=MISTAKES_DPI)
    plt.close(fig)


def _model_labels(r: EvalReport) -> list[str]:
    if len(r.models) == 1:
        return [escape_name(Path(r.models[0].path).name)]
    return [f"{tag}: {escape_name(Path(m.path).name)} ({m.kind})" for tag, m in zip("AB", r.models, strict=True)]


def plot_confusion(models: tuple[ModelReport, ...], labels: list[str]) -> Any:
    """Row-normalized confusion matrix per model: colour = fraction of the true class, text = image count."""
    import matplotlib.pyplot as plt
    import numpy as np

    names = [escape_name(s.name) for s in models[0].per_class]
    rows = [i for i, s in enumerate(models[0].per_class) if s.support]  # classes with images
    c = len(names)
    cell = 0.62 if c <= 12 else max(0.16, 7.0 / c)  # inches: counts stay readable up to ~30 classes
    size = (len(models) * (cell * c + 1.6) + 1.0, cell * len(rows) + 2.0)
    fig, axes = plt.subplots(1, len(models), figsize=size, squeeze=False, layout="constrained")
    image = None
    for ax, m, label in zip(axes[0], models, labels, strict=True):
        cm = m.confusion[rows]
        frac = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        image = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
        if c <= 30:
            size = 8 if c <= 12 else 6
            for (i, j), count in np.ndenumerate(cm):
                colour = "white" if frac[i, j] > 0.55 else "black"
                ax.text(j, i, f"{count:,}", ha="center", va="center", fontsize=size, color=colour)
        ax.set_xticks(range(c), names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(rows)), [names[i] for i in rows], fontsize=8)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title(f"{label}\ntop-1 {100 * m.top1:.2f} % of {m.images:,} images", fontsize=10)
    fig.colorbar(image, ax=list(axes[0]), fraction=0.04, pad=0.02, label="fraction of the true class's images")
    fig.suptitle("Confusion matrix: rows normalized; numbers are image counts", fontsize=11)
    return fig


def plot_reliability(models: tuple[ModelReport, ...], labels: list[str]) -> Any:
    """Reliability diagram per model: accuracy against confidence per bin (the diagonal is perfect
    calibration; red is the gap to it), and below, the share of images in each bin."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        2, len(models), figsize=(5.2 * len(models), 6.4), squeeze=False, gridspec_kw={"height_ratios": [3, 1]}
    )
    for col, (m, label) in enumerate(zip(models, labels, strict=True)):
        top, bottom = axes[0][col], axes[1][col]
        cal = m.calibration
        assert cal is not None
        width = cal.bins[0].upper - cal.bins[0].lower
        centres = [(b.lower + b.upper) / 2 for b in cal.bins]
        acc = [b.accuracy or 0.0 for b in cal.bins]
        conf = [b.confidence if b.confidence is not None else c for b, c in zip(cal.bins, centres, strict=True)]
        used = [b.count > 0 for b in cal.bins]
        top.bar(centres, acc, width=width, color="#4c72b0", edgecolor="white", label="accuracy in bin")
        gaps = [(c - a) if u else 0.0 for a, c, u in zip(acc, conf, used, strict=True)]
        # Hatched outline, not a fill: where a bin is under-confident the gap lies inside its blue bar
        top.bar(centres, gaps, bottom=acc, width=width, facecolor="none", edgecolor="#d62728", hatch="///",
                linewidth=0.8, label="gap to mean confidence")  # fmt: skip
        top.plot([0, 1], [0, 1], "--", color="gray", lw=1, label="perfect calibration")
        top.set_xlim(0, 1)
        top.set_ylim(0, 1)
        top.set_ylabel("accuracy")
        top.set_title(f"{label}\nECE {100 * cal.ece:.2f} %, NLL {cal.nll:.3f}, Brier {cal.brier:.3f}", fontsize=10)
        top.legend(loc="upper left", fontsize=8)
        share = [100 * b.count / m.images for b in cal.bins]
        bottom.bar(centres, share, width=width, color="#888888", edgecolor="white")
        bottom.set_xlim(0, 1)
        bottom.set_xlabel("confidence (probability of the predicted class)")
        bottom.set_ylabel("images (%)")
    fig.suptitle("Reliability diagram", fontsize=11)
    fig.tight_layout()
    return fig


MISTAKES_DPI = 100  # plot_mistakes places pixels exactly: save it at this resolution


def plot_mistakes(m: ModelReport, label: str, with_b: bool, columns: int = 6) -> Any:
    """The most confident mistakes, each image as the model saw it, enlarged by a whole factor (nearest
    neighbour, ~160 px a side), with its file above it and the true and predicted labels (and the second
    model's answer) under it. Images are placed with figimage at exact pixel positions: no axes, so a grid of
    24 draws in ~0.1 s instead of ~0.9 s with one axes per image."""
    import matplotlib.pyplot as plt
    import numpy as np

    shown = list(m.mistakes)
    h, w = shown[0].pixels.shape[:2] if shown else (32, 32)
    scale = max(1, 160 // max(h, w))
    rows = max(1, -(-len(shown) // columns))
    cell_w, name_h, text_h, gap = max(210, w * scale + 20), 18, (62 if with_b else 46), 16  # pixels
    cell_h = name_h + h * scale + text_h + gap
    width, height, head = columns * cell_w + 20, rows * cell_h + 50, 50
    fig = plt.figure(figsize=(width / MISTAKES_DPI, height / MISTAKES_DPI), dpi=MISTAKES_DPI)
    wrong = m.images - m.correct
    title = f"{label}: the {len(shown)} most confident of {wrong:,} mistakes" if shown else f"{label}: no mistakes"
    fig.text(0.5, 1 - 25 / height, title, ha="center", va="center", fontsize=11)
    for i, x in enumerate(shown):
        row, col = divmod(i, columns)
        centre = (10 + col * cell_w + cell_w / 2) / width
        top = height - head - row * cell_h  # pixels from the bottom edge
        big = np.repeat(np.repeat(x.pixels, scale, axis=0), scale, axis=1)
        fig.figimage(
            big, xo=int(10 + col * cell_w + (cell_w - w * scale) / 2), yo=top - name_h - h * scale, origin="upper"
        )
        fig.text(
            centre, (top - name_h / 2) / height, _short(x.source), ha="center", va="center", fontsize=7, color="dimgray"
        )
        text = f"true: {escape_name(x.true)}\n{'A' if with_b else 'pred'}: {escape_name(x.predicted)}"
        text += f" {100 * x.probability:.1f} %"
        if with_b and x.predicted_b is not None:
            text += f"\nB: {escape_name(x.predicted_b)} {100 * (x.probability_b or 0.0):.1f} %"
        fig.text(centre, (top - name_h - h * scale - 4) / height, text, ha="center", va="top", fontsize=9)
    return fig


def _short(source: str, limit: int = 28) -> str:
    """The class folder and file name of a path (or an array source's name), cut to `limit` characters."""
    text = escape_name("/".join(Path(source).parts[-2:]))
    return text if len(text) <= limit else "..." + text[-(limit - 3) :]
