"""Recipes and time budgets side by side on the machine at hand, against the airbench recipe as the reference.

Each configuration runs as its own `cifar-train` process on the same data (the decoded-image cache is built
first, outside the timings; per-epoch test evaluations are off, as in the reference measurements, unless
--eval-every is given), then one table: accuracy, wall seconds of the whole process, training images/s, peak
RSS, and the ratios against the reference run of the same invocation; then each run's accuracy against time.
Never fails on timing.

    python bench/recipes.py --data $CIFARKIT_DATA                                   # blog and airbench
    python bench/recipes.py --data $CIFARKIT_DATA --budgets 6m,10m --recipes airbench   # + budgeted runs
    python bench/recipes.py --data $CIFARKIT_DATA --reference none --recipes blog       # no reference run
    python bench/recipes.py --data $CIFARKIT_DATA --reference none --recipes blog,airbench,sprint \
        --budgets 1m,3m,6m --only-budgets --plot budgets.png                            # accuracy against budget
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(cmd: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS in KiB, stderr tail) of a child process, start to exit."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read() if proc.stderr else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{err[-2000:]}")
    return wall, usage.ru_maxrss, err[-2000:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.environ.get("CIFARKIT_DATA"), help="data source [$CIFARKIT_DATA]")
    p.add_argument("--recipes", default="blog,airbench", help="comma-separated recipe names, run at their epochs")
    p.add_argument("--budgets", default="", help="comma-separated time budgets (e.g. 6m,10m), each run per recipe")
    p.add_argument("--reference", default="airbench", help="the reference recipe (run first), or 'none'")
    p.add_argument("--eval-every", default="0", help="cifar-train --eval-every for every run (default 0)")
    p.add_argument("--only-budgets", action="store_true", help="only the --budgets runs, not the recipes' own epochs")
    p.add_argument("--keep", default=None, help="keep the run folders under this folder")
    p.add_argument("--plot", default=None, help="with --budgets: draw accuracy against budget per recipe to this PNG")
    p.add_argument("extra", nargs="*", help="further cifar-train options, after --")
    args = p.parse_args()
    if not args.data:
        sys.exit(
            "bench/recipes.py needs a data set: pass --data or set CIFARKIT_DATA (an extracted CIFAR-10 "
            "ImageFolder root, or a cifar-10-batches-py folder)"
        )
    from cifarkit.data import load_data

    load_data(args.data)  # build the decoded-image cache first so that no run pays for JPEG decoding

    cifar_train = str(Path(sys.executable).parent / "cifar-train")
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="cifarkit-recipes-"))
    root.mkdir(parents=True, exist_ok=True)
    recipes = [r for r in args.recipes.split(",") if r]
    budgets = [b for b in args.budgets.split(",") if b]
    plan: list[tuple[str, str | None]] = []
    if args.reference != "none":
        plan.append((args.reference, None))
    if not args.only_budgets:
        plan += [(r, None) for r in recipes if (r, None) not in plan]
    plan += [(r, b) for b in budgets for r in recipes]  # budget by budget: a drifting machine hits every recipe
    rows = []
    try:
        for recipe, budget in plan:
            name = recipe + (f"@{budget}" if budget else "")
            out = root / name.replace("@", "-")
            cmd = [cifar_train, "--data", args.data, "--recipe", recipe, "--out", str(out), "--overwrite"]
            cmd += ["--progress", "none", "--eval-every", args.eval_every, *args.extra]
            if budget:
                cmd += ["--time-budget", budget]
            print(f"running {name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
            wall, rss_kib, _ = run(cmd)
            m = json.loads((out / "metrics.json").read_text())
            rows.append((name, budget, m, wall, rss_kib))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    ref = rows[0] if args.reference != "none" else None
    print(f"\nrecipes on {os.cpu_count()} CPU cores, data {args.data}; reference: {ref[0] if ref else 'none'}\n")
    head = (
        f"{'run':<16} {'epochs':>6} {'steps':>6} {'wall s':>8} {'vs ref':>7} {'images/s':>9} {'peak RSS':>9} "
        f"{'test acc':>9} {'vs ref':>8}  precision / TTA"
    )
    print(head)
    print("-" * len(head))
    for name, _, m, wall, rss in rows:
        ips = sorted(m["images_per_second"])[len(m["images_per_second"]) // 2]
        acc = m["test"]["accuracy"]
        t_ratio = f"{wall / ref[3]:.2f}x" if ref else "-"
        a_diff = f"{100 * (acc - ref[2]['test']['accuracy']):+.2f}" if ref else "-"
        print(
            f"{name:<16} {m['epochs']:>6g} {m.get('steps', 0):>6} {wall:>8.1f} {t_ratio:>7} {ips:>9,.0f} "
            f"{rss / 1024:>7,.0f}MB {100 * acc:>8.2f}% {a_diff:>8}  {m['precision']} / {m['tta']}"
        )
    print("\nwhere the time went (seconds; phases of metrics.json):")
    for name, _, m, wall, _ in rows:
        phases = ", ".join(f"{k} {v:.1f}" for k, v in m.get("phases", {}).items())
        print(f"  {name:<16} {phases}; process {wall:.1f}")
    print(
        "\naccuracy against time (test accuracy after each evaluated epoch; the last uses the recipe's TTA; "
        "seconds since the run began):"
    )
    for name, _, m, _, _ in rows:
        points = [
            f"{t:.0f}s {100 * a:.2f}%"
            for t, a in zip(m["elapsed_seconds_per_epoch"], m["test_accuracy_per_epoch"], strict=True)
            if a is not None
        ]
        print(f"  {name:<16} " + ", ".join(points))
    if budgets:
        budget_table(rows, recipes, budgets, args.plot)


def budget_table(rows: list, recipes: list[str], budgets: list[str], plot: str | None) -> None:
    """Test accuracy of each recipe at each budget (and the process's wall seconds), and the curves as a PNG."""

    got = {(name.split("@")[0], budget): (m["test"]["accuracy"], wall) for name, budget, m, wall, _ in rows if budget}
    print("\naccuracy against time budget (test accuracy; the whole process's wall seconds in brackets):")
    print(f"  {'recipe':<12}" + "".join(f"{b:>20}" for b in budgets))
    for r in recipes:
        cells = [got.get((r, b)) for b in budgets]
        print(f"  {r:<12}" + "".join(f"{100 * c[0]:>11.2f}% ({c[1]:5.1f}s)" if c else f"{'-':>20}" for c in cells))
    if not plot:
        return
    plot_budgets(got, recipes, budgets, plot)
    print(f"\nplot: {plot}")


def plot_budgets(got: dict[tuple[str, str], tuple[float, float]], recipes: list[str], budgets: list[str],
                 plot: str) -> None:  # fmt: skip
    """Accuracy against budget, a line per recipe; each point labelled with its accuracy (below the point when
    a higher one at the same budget is close, so that labels do not overlap)."""
    import matplotlib

    from cifarkit.train.budget import parse_duration

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    seconds = [parse_duration(b) for b in budgets]
    for r in recipes:
        pts = [(s, b, 100 * got[(r, b)][0]) for s, b in zip(seconds, budgets, strict=True) if (r, b) in got]
        ax.plot([p[0] / 60 for p in pts], [p[2] for p in pts], marker="o", label=r)
        for x, b, y in pts:
            crowded = any(0 < 100 * got[(o, b)][0] - y < 2.0 for o in recipes if o != r and (o, b) in got)
            ax.annotate(f"{y:.2f}", (x / 60, y), textcoords="offset points", xytext=(0, -13 if crowded else 6),
                        ha="center", fontsize=8)  # fmt: skip
    ax.set_xlabel("time budget, whole process (minutes)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_xticks([s / 60 for s in seconds])
    ax.set_title(f"cifar-train --time-budget, {os.cpu_count()} CPU cores, one run each")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(plot)


if __name__ == "__main__":
    main()
