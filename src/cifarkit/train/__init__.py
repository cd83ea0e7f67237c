"""Training stage: TrainConfig -> train(cfg, reporter) -> TrainResult.

    from cifarkit.train import TrainConfig, train
    result = train(TrainConfig(data="/data/cifar10-jpeg", out="runs/blog"))

The package's modules, from the options down:
    config.py    TrainConfig and its checks (no torch: the CLI checks options before importing torch)
    recipes.py   recipe name -> Recipe (no torch)
    budget.py    --time-budget: durations, the progress map, the pacer (no torch)
    runtime.py   device, precision, autocast, allocator, the torchrun context
    batches.py   the training split on the device: shuffled, augmented, normalized there
    optim.py     optimizer, per-group learning rates, schedule, lookahead
    loop.py      the stage functions: train_one_epoch, evaluate
    build.py     the pieces of a run: data, net, optimization, pacer, checkpoint
    run.py       train(): the phases in order
    report.py    per-epoch records, metrics.json, loss.png

Names are imported lazily, so that `cifarkit.train.config` stays torch-free.
"""

from __future__ import annotations

from cifarkit.stage import lazy_exports

_EXPORTS = {
    "TrainConfig": "config",
    "RECIPE_FIELDS": "config",
    "Recipe": "recipes",
    "RECIPES": "recipes",
    "get_recipe": "recipes",
    "TrainResult": "run",
    "train": "run",
    "train_one_epoch": "loop",
    "evaluate": "loop",
    "Optimization": "optim",
    "make_optimization": "optim",
    "triangle_schedule": "optim",
    "Lookahead": "optim",
    "Metrics": "report",
    "EpochRecord": "report",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
