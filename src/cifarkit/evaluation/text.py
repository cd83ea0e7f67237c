"""The evaluation as text, as cifar-eval prints it (names escaped by cifarkit.escape).

print(header_text(evaluation)); report = evaluation.run(); print(report_text(report))
"""

from __future__ import annotations

from cifarkit.escape import escape_name
from cifarkit.evaluation.results import EvalReport, ModelReport

PAIRS_SHOWN = 10  # most-confused pairs printed (per model)


def header_lines(models: list, data: object) -> list[str]:
    """What is evaluated on what: one line per model, one for the data."""
    out = []
    for tag, m in zip("AB", models, strict=False):
        label = f"{tag}: " if len(models) > 1 else "model: "
        out.append(f"{label}{escape_name(m.path)} ({m.kind}, {m.meta.model_name}, {len(m.meta.class_names)} classes)")
    split = f", {data.split} split" if data.split else ""  # type: ignore[attr-defined]
    out.append(
        f"data: {escape_name(data.location)} ({data.kind}{split}): {data.count:,} images of "  # type: ignore[attr-defined]
        f"{len(data.classes)} classes"  # type: ignore[attr-defined]
    )
    return out


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f} %"


def _interval(m: ModelReport, which: str) -> str:
    lo, hi = m.top1_interval if which == "top1" else m.topk_interval
    return f"{100 * lo:.2f}-{100 * hi:.2f} %"


def report_text(r: EvalReport) -> str:
    """The report as cifar-eval prints it: headline, per-class table, most-confused pairs, calibration (two
    models: side by side, agreement and McNemar's test)."""
    out: list[str] = []
    ips = r.images / r.seconds if r.seconds > 0 else 0.0
    out.append(f"evaluated {r.images:,} images in {r.seconds:.1f} s ({ips:,.0f} images/s)")
    if len(r.models) == 1:
        _one(out, r.models[0])
    else:
        _two(out, r)
    return "\n".join(out)


def _one(out: list[str], m: ModelReport) -> None:
    k = m.top_k
    out.append(f"\ntop-1 accuracy  {_pct(m.top1):>8}  (95 % CI {_interval(m, 'top1')})")
    out.append(f"top-{k} accuracy  {_pct(m.topk):>8}  (95 % CI {_interval(m, 'topk')})")
    names = {s.name: escape_name(s.name) for s in m.per_class}
    width = max(len("macro average"), *(len(n) for n in names.values()))
    out.append(f"\n{'class':<{width}}  {'images':>7}  {'accuracy':>9}  {'precision':>9}  {'F1':>9}")
    for s in m.per_class:
        if s.support:
            row = f"{_pct(s.recall):>9}  {_pct(s.precision):>9}  {_pct(s.f1):>9}"
            out.append(f"{names[s.name]:<{width}}  {s.support:>7,}  {row}")
    p, rec, f1 = m.macro
    out.append(f"{'macro average':<{width}}  {m.images:>7,}  {_pct(rec):>9}  {_pct(p):>9}  {_pct(f1):>9}")
    _pairs(out, m, PAIRS_SHOWN)
    c = m.calibration
    bins = len(c.bins) if c else 0
    if c is not None:
        out.append(f"\ncalibration: ECE {_pct(c.ece)} ({bins} bins), NLL {c.nll:.4f} nats, Brier {c.brier:.4f}")


def _pairs(out: list[str], m: ModelReport, n: int, title: str = "") -> None:
    if not m.confused:
        return
    out.append(f"\nmost confused{title} (true -> predicted):")
    width = max(len(escape_name(p.true)) + len(escape_name(p.predicted)) + 4 for p in m.confused[:n])
    for p in m.confused[:n]:
        pair = f"{escape_name(p.true)} -> {escape_name(p.predicted)}"
        out.append(f"  {pair:<{width}} {p.count:>6,} images ({100 * p.fraction:.1f} % of {escape_name(p.true)})")


def _two(out: list[str], r: EvalReport) -> None:
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
    out.append(f"\n{'':<16}  {'A':>16}  {'B':>16}")
    for label, va, vb in rows:
        out.append(f"{label:<16}  {va:>16}  {vb:>16}")
    names = {s.name: escape_name(s.name) for s in a.per_class}
    width = max(len("class"), *(len(n) for n in names.values()))
    head = f"{'accuracy':>9}  {'precision':>9}  {'F1':>9}"
    out.append(f"\n{'':<{width}}  {'':>7}  {'A':^31}    {'B':^31}")
    out.append(f"{'class':<{width}}  {'images':>7}  {head}    {head}")
    for sa, sb in zip(a.per_class, b.per_class, strict=True):
        if sa.support:
            cells = [f"{_pct(s.recall):>9}  {_pct(s.precision):>9}  {_pct(s.f1):>9}" for s in (sa, sb)]
            out.append(f"{names[sa.name]:<{width}}  {sa.support:>7,}  {cells[0]}    {cells[1]}")
    _pairs(out, a, PAIRS_SHOWN // 2, " for A")
    _pairs(out, b, PAIRS_SHOWN // 2, " for B")
    c = r.comparison
    if c is None:
        return
    out.append(
        f"\nagreement: {c.agree:,} of {c.images:,} images in the same class ({100 * c.agree / c.images:.2f} %); "
        f"max |dprobability| {c.max_abs_dprob:.3g}"
    )
    verdict = "a real difference at the 5 % level" if c.mcnemar_p < 0.05 else "no evidence of a real difference"
    out.append(
        f"McNemar's exact test: A right and B wrong on {c.a_right_b_wrong:,} images, A wrong and B right on "
        f"{c.a_wrong_b_right:,}: p = {c.mcnemar_p:.4g} ({verdict})"
    )
