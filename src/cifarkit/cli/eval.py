"""`cifar-eval`: how good is a model on labelled images, where does it fail, and do two models differ?

cifar-eval runs/demo/model.onnx --data $CIFARKIT_DATA --out runs/demo/eval
cifar-eval runs/demo/model.onnx runs/demo/checkpoint.pt --data $CIFARKIT_DATA    # artifact vs checkpoint

Prints top-1 and top-k accuracy with 95 % bootstrap intervals, the per-class table (accuracy, precision, F1),
the most-confused pairs and calibration (ECE, NLL, Brier); with MODEL_B both side by side, their agreement and
McNemar's exact test. --out DIR adds report.json, predictions.csv, confusion.png, reliability.png and
mistakes.png, written into a temporary folder beside DIR and moved into place at the end. Exit status: 0 all
images evaluated, 1 some could not be read (each named on stderr), 2 usage error (bad option, model or data;
nothing written), 130 interrupted, 143 terminated. A model.onnx is run without importing torch.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import sys
from pathlib import Path
from typing import Any

from cifarkit.cli import EXIT_FAILED, EXIT_OK, fail, guarded

# As in cifar-infer: numpy's OpenBLAS would start a spinning thread per core for matrix products this command
# never does (~0.06 s of CPU per start on 2 cores). Set before numpy is imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from cifarkit.atomic import staged_folder  # noqa: E402
from cifarkit.cli.progress import PROGRESS, Bar  # noqa: E402
from cifarkit.escape import escape_name  # noqa: E402
from cifarkit.evaluation import BatchResult, EvalConfig, EvalReport, Evaluation, ModelReport  # noqa: E402

OUT_FILES = ("report.json", "predictions.csv", "confusion.png", "reliability.png", "mistakes.png")
PAIRS_SHOWN = 10  # most-confused pairs printed (per model)
DESCRIPTION = (
    "Evaluate a model.onnx, model.pt or checkpoint.pt on labelled images (and compare it with MODEL_B). "
    "Exit status: 0 all evaluated, 1 some images could not be read (each named on stderr), 2 usage error."
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, like every other usage error here
        fail(f"{message} (see cifar-eval --help)")


def parser() -> argparse.ArgumentParser:
    # argparse rather than typer, as for cifar-infer: the ONNX path should start fast.
    d = EvalConfig()
    p = _Parser(prog="cifar-eval", description=DESCRIPTION)
    p.add_argument("model", metavar="MODEL", help="model.onnx (or a folder holding one), model.pt or checkpoint.pt")
    p.add_argument("model_b", metavar="MODEL_B", nargs="?", help="a second model, evaluated on the same images")
    p.add_argument(
        "--data",
        required=True,
        help="labelled images: an ImageFolder root (train/ and test/), a folder of class sub-folders, a "
        "cifar-10-batches-py folder, 'torchvision' (downloads CIFAR-10) or 'sample' (the bundled sample)",
    )
    p.add_argument("--split", default=None, help=f"test or train (default {d.split}); not for class folders")
    p.add_argument("-o", "--out", default=None, help="also write report.json, predictions.csv and the PNGs to DIR")
    p.add_argument(
        "-k", "--top-k", type=int, default=None, help=f"top-k accuracy (default {d.top_k}, or fewer classes)"
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"images per call (default {d.batch_size})")
    p.add_argument("--threads", type=int, default=None, help="decoding threads; 0: main thread. Default: cores + 1")
    p.add_argument("--progress", default="auto", help="auto (a bar on a terminal for runs over 1 s), bar or none")
    p.add_argument("--skip-unknown", action="store_true", help="leave out class folders the model does not know")
    p.add_argument("--debug", action="store_true", help="show tracebacks and library warnings")
    return p


def main(argv: list[str] | None = None) -> int:
    """Evaluate, print the report, write --out. Returns the exit status."""
    args = parser().parse_args(argv)
    if args.progress not in PROGRESS:
        fail(f"--progress must be one of {', '.join(PROGRESS)}, got {args.progress!r}")
    d = EvalConfig()
    top_k = d.top_k if args.top_k is None else args.top_k
    cfg = EvalConfig(args.split or d.split, top_k, args.batch_size, args.threads, args.skip_unknown)
    guarded(cfg.validate, debug=args.debug)
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not out.is_dir():
        fail(f"--out {out} is a file, expected a folder")
    if not args.debug:
        import warnings

        warnings.simplefilter("ignore")  # Pillow's EXIF notes, torch.jit's deprecation: not the user's business

    ev = guarded(lambda: Evaluation(args.model, args.data, model_b=args.model_b, config=cfg), debug=args.debug)
    if args.top_k is not None and args.top_k > ev.top_k:
        fail(f"--top-k {args.top_k} is more than the model's {ev.top_k} classes")
    if args.split is not None and ev.data.split is None:
        print(
            f"warning: --split {args.split} is ignored: {escape_name(ev.data.location)} is a folder of class folders",
            file=sys.stderr,
        )
    _printing(_print_header, ev)

    def staged() -> EvalReport:
        # The staging folder is entered inside guarded(): an error or Ctrl-C removes it while the exception
        # unwinds, before guarded() turns it into an exit status (on Ctrl-C, at once: cli.interrupted).
        with staged_folder(out, replace=OUT_FILES) if out else contextlib.nullcontext() as stage:
            report = _run(ev, stage, args.progress)
            _printing(print_report, report)
            if stage is not None:
                write_figures(report, stage)
        return report

    report = guarded(staged, debug=args.debug)
    if out is not None:
        _printing(print, f"\nwrote {out}/: {', '.join(OUT_FILES)}")
    if report.failed:
        print(f"{report.failed:,} of {report.data.count:,} input(s) failed; see the lines above", file=sys.stderr)
    return EXIT_FAILED if report.failed else EXIT_OK


def app(argv: list[str] | None = None) -> None:
    """The console script's entry point."""
    raise SystemExit(main(argv))


def _printing(fn: Any, *args: Any) -> None:
    """fn(*args) printing to stdout; if the reader has gone (`cifar-eval ... | head`), the rest of the
    output goes to /dev/null and the run goes on, so that --out is still written."""
    try:
        fn(*args)
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def _print_header(ev: Evaluation) -> None:
    for tag, m in zip("AB", ev.models, strict=False):
        label = f"{tag}: " if len(ev.models) > 1 else "model: "
        print(f"{label}{escape_name(m.path)} ({m.kind}, {m.meta.model_name}, {len(m.meta.class_names)} classes)")
    d = ev.data
    split = f", {d.split} split" if d.split else ""
    print(f"data: {escape_name(d.location)} ({d.kind}{split}): {d.count:,} images of {len(d.classes)} classes")
    for note in d.notes:
        print(f"warning: {escape_name(note)}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------
# The run: stream, write predictions.csv as rows come, report failures
# ---------------------------------------------------------------------------------------------------------


def _run(ev: Evaluation, stage: Path | None, progress: str) -> EvalReport:
    names = [escape_name(c) for c in ev.class_names]
    bar = Bar(progress, "evaluating", total=ev.data.count)
    done = failed = 0
    f = open(stage / "predictions.csv", "w", encoding="utf-8", newline="") if stage else None  # noqa: SIM115
    rows = csv.writer(f, lineterminator="\n") if f else None
    if rows:
        extra = ["predicted_b", "probability_b"] if len(ev.models) > 1 else []
        rows.writerow(["path", "true", "predicted", "probability", *extra])

    def on_batch(b: BatchResult) -> None:
        nonlocal done, failed
        for failure in b.failures:
            bar.say(f"error: {escape_name(failure.message)}")
        if rows:
            preds, probs, true = [p.tolist() for p in b.predicted], [q.tolist() for q in b.probability], b.true.tolist()
            for j, src in enumerate(b.sources):
                row = [escape_name(src), names[true[j]]]
                for p, q in zip(preds, probs, strict=True):
                    row += [names[p[j]], f"{q[j]:.6f}"]
                rows.writerow(row)
        done, failed = done + len(b.sources), failed + len(b.failures)
        bar.update(done, failed)

    try:
        return ev.run(on_batch)
    finally:
        bar.close()
        if f:
            f.close()


# ---------------------------------------------------------------------------------------------------------
# Printing
# ---------------------------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f} %"


def _interval(m: ModelReport, which: str) -> str:
    lo, hi = m.top1_interval if which == "top1" else m.topk_interval
    return f"{100 * lo:.2f}-{100 * hi:.2f} %"


def print_report(r: EvalReport) -> None:
    ips = r.images / r.seconds if r.seconds > 0 else 0.0
    print(f"evaluated {r.images:,} images in {r.seconds:.1f} s ({ips:,.0f} images/s)")
    if len(r.models) == 1:
        _print_one(r.models[0])
    else:
        _print_two(r)


def _print_one(m: ModelReport) -> None:
    k = m.top_k
    print(f"\ntop-1 accuracy  {_pct(m.top1):>8}  (95 % CI {_interval(m, 'top1')})")
    print(f"top-{k} accuracy  {_pct(m.topk):>8}  (95 % CI {_interval(m, 'topk')})")
    names = {s.name: escape_name(s.name) for s in m.per_class}
    width = max(len("macro average"), *(len(n) for n in names.values()))
    print(f"\n{'class':<{width}}  {'images':>7}  {'accuracy':>9}  {'precision':>9}  {'F1':>9}")
    for s in m.per_class:
        if s.support:
            row = f"{_pct(s.recall):>9}  {_pct(s.precision):>9}  {_pct(s.f1):>9}"
            print(f"{names[s.name]:<{width}}  {s.support:>7,}  {row}")
    p, rec, f1 = m.macro
    print(f"{'macro average':<{width}}  {m.images:>7,}  {_pct(rec):>9}  {_pct(p):>9}  {_pct(f1):>9}")
    _print_pairs(m, PAIRS_SHOWN)
    c = m.calibration
    bins = len(c.bins) if c else 0
    if c is not None:
        print(f"\ncalibration: ECE {_pct(c.ece)} ({bins} bins), NLL {c.nll:.4f} nats, Brier {c.brier:.4f}")


def _print_pairs(m: ModelReport, n: int, title: str = "") -> None:
    if not m.confused:
        return
    print(f"\nmost confused{title} (true -> predicted):")
    width = max(len(escape_name(p.true)) + len(escape_name(p.predicted)) + 4 for p in m.confused[:n])
    for p in m.confused[:n]:
        pair = f"{escape_name(p.true)} -> {escape_name(p.predicted)}"
        print(f"  {pair:<{width}} {p.count:>6,} images ({100 * p.fraction:.1f} % of {escape_name(p.true)})")


def _print_two(r: EvalReport) -> None:
    a, b = r.models
    rows = [
        ("kind", a.kind, b.kind),
        ("top-1 accuracy", _pct(a.top1), _pct(b.top1)),
        ("  95 % CI", _interval(a, "top1"), _interval(b, "top1")),
        (f"top-{a.top_k} accuracy", _pct(a.topk), _pct(b.topk)),
        ("  95 % CI", _interval(a, "topk"), _interval(b, "topk")),
        ("macro F1", _pct(a.macro[2]), _pct(b.macro[2])),
    ]
    if a.calibration and b.calibration:
        ca, cb = a.calibration, b.calibration
        rows += [
            ("ECE", _pct(ca.ece), _pct(cb.ece)),
            ("NLL (nats)", f"{ca.nll:.4f}", f"{cb.nll:.4f}"),
            ("Brier", f"{ca.brier:.4f}", f"{cb.brier:.4f}"),
        ]
    print(f"\n{'':<16}  {'A':>16}  {'B':>16}")
    for label, va, vb in rows:
        print(f"{label:<16}  {va:>16}  {vb:>16}")
    names = {s.name: escape_name(s.name) for s in a.per_class}
    width = max(len("class"), *(len(n) for n in names.values()))
    head = f"{'accuracy':>9}  {'precision':>9}  {'F1':>9}"
    print(f"\n{'':<{width}}  {'':>7}  {'A':^31}    {'B':^31}")
    print(f"{'class':<{width}}  {'images':>7}  {head}    {head}")
    for sa, sb in zip(a.per_class, b.per_class, strict=True):
        if sa.support:
            cells = [f"{_pct(s.recall):>9}  {_pct(s.precision):>9}  {_pct(s.f1):>9}" for s in (sa, sb)]
            print(f"{names[sa.name]:<{width}}  {sa.support:>7,}  {cells[0]}    {cells[1]}")
    _print_pairs(a, PAIRS_SHOWN // 2, " for A")
    _print_pairs(b, PAIRS_SHOWN // 2, " for B")
    c = r.comparison
    if c is None:
        return
    print(
        f"\nagreement: {c.agree:,} of {c.images:,} images in the same class ({100 * c.agree / c.images:.2f} %); "
        f"max |dprobability| {c.max_abs_dprob:.3g}"
    )
    verdict = "a real difference at the 5 % level" if c.mcnemar_p < 0.05 else "no evidence of a real difference"
    print(
        f"McNemar's exact test: A right and B wrong on {c.a_right_b_wrong:,} images, A wrong and B right on "
        f"{c.a_wrong_b_right:,}: p = {c.mcnemar_p:.4g} ({verdict})"
    )


# ---------------------------------------------------------------------------------------------------------
# --out: report.json and the pictures (matplotlib, Agg: no display, no torch)
# ---------------------------------------------------------------------------------------------------------


def write_figures(r: EvalReport, folder: Path) -> None:
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


if __name__ == "__main__":
    app()
