"""Training recipes: a plain name -> Recipe table. `blog` is the default and must keep working exactly;
`airbench` is the strong recipe, after airbench94 (Keller Jordan, arXiv 2404.00498, hlb-CIFAR10).

A recipe fixes everything about how a model is trained; TrainConfig may override epochs, batch size and
learning rate. Pure Python: the CLI reads it for its help text without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from cifarkit.spec import BLOG_MEAN, BLOG_STD, CIFAR10_MEAN, CIFAR10_STD


@dataclass(frozen=True)
class Recipe:
    name: str
    model: str  # a name in cifarkit.model.MODEL_NAMES
    epochs: float  # may be fractional: training stops after ceil(steps_per_epoch * epochs) optimizer steps
    batch_size: int  # images per optimizer step
    lr: float  # Adam: the learning rate. SGD: airbench's lr per 1,024 images (decoupled from momentum)
    mean: tuple[float, float, float]  # normalization after scaling pixels to [0, 1], per channel (R, G, B);
    std: tuple[float, float, float]  # it travels to the checkpoint and into the exported graph
    optimizer: str = "adam"  # "adam" | "sgd_nesterov"
    momentum: float = 0.0  # SGD momentum
    weight_decay: float = 0.0  # SGD: airbench's decay per 1,024 images (decoupled from the learning rate)
    bias_lr_scale: float = 1.0  # learning-rate multiplier for BatchNorm biases (not applied to weight decay)
    #                             (the model says which parameters those are: cifarkit.model.nets.ParamGroup)
    label_smoothing: float = 0.0
    loss_reduction: str = "mean"  # "mean" | "sum" (airbench sums, which scales with the batch)
    schedule: tuple[float, float, float] | None = None  # triangle: (start, peak position in [0, 1], end)
    #                                                     multipliers of lr; None: constant
    lookahead_every: int = 0  # optimizer steps between lookahead (EMA) updates; 0: off
    translate: int = 0  # pixels of random translation (reflect padding); 0: off
    flip: bool = False  # horizontal flip: a random half at epoch 0, then all images flipped every other epoch
    drop_last: bool = False  # drop the last incomplete batch of every epoch
    whiten_bias_epochs: int = 0  # epochs during which the whitening conv's bias trains, then frozen; 0: never frozen
    tta: str = "none"  # test-time augmentation inside the deployed model: none | hflip | hflip_translate
    # optimizer "muon" (cifarkit.train.muon): `lr` is Muon's, for the conv filters; these are SGD's for the rest
    head_lr: float = 0.0  # the classifier's learning rate
    bias_lr: float = 0.0  # BatchNorm and whitening biases' learning rate
    muon_momentum: float = 0.0  # Muon's Nesterov momentum (`momentum` is SGD's)
    # Progressive resizing: stages (progress, side), in order: until that fraction of the schedule, train at side
    # x side pixels (bilinear, antialiased); after the last stage at the data's size. (): always the data's size
    progressive: tuple[tuple[float, int], ...] = ()
    summary: str = ""


RECIPES: dict[str, Recipe] = {
    "blog": Recipe(
        name="blog",
        model="blog_cnn",
        epochs=4,
        batch_size=32,
        lr=1e-3,
        mean=BLOG_MEAN,
        std=BLOG_STD,
        summary="the blog's recipe: 3-conv CNN, Adam 1e-3, batch 32, 4 epochs, no augmentation (69 %)",
    ),
    "airbench": Recipe(
        name="airbench",
        model="airbench",
        epochs=9.9,
        batch_size=1024,
        lr=11.5,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        optimizer="sgd_nesterov",
        momentum=0.85,
        weight_decay=0.0153,
        bias_lr_scale=64.0,
        label_smoothing=0.2,
        loss_reduction="sum",
        schedule=(0.2, 0.23, 0.07),
        lookahead_every=5,
        translate=2,
        flip=True,
        drop_last=True,
        whiten_bias_epochs=3,
        tta="hflip_translate",
        summary="airbench94: whitened BatchNorm CNN, Nesterov SGD, triangle schedule, label smoothing, "
        "lookahead, flip+translate, TTA (94 % on PNG CIFAR-10, ~90.5 % on the JPEG copy)",
    ),
    "sprint": Recipe(
        name="sprint",
        model="sprint",
        epochs=8,
        batch_size=1000,
        lr=0.24,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        optimizer="muon",
        momentum=0.85,
        muon_momentum=0.6,
        weight_decay=2e-6,
        head_lr=0.67,
        bias_lr=0.053,
        label_smoothing=0.2,
        loss_reduction="sum",
        schedule=(1.0, 0.0, 0.0),
        translate=2,
        flip=True,
        drop_last=True,
        whiten_bias_epochs=3,
        tta="hflip_translate",
        summary="the CPU recipe for --time-budget: airbench's net with a global-pool head, Muon for the filters",
    ),
}


def get_recipe(name: str) -> Recipe:
    from cifarkit.errors import CifarkitError

    try:
        return RECIPES[name]
    except KeyError:
        raise CifarkitError(f"--recipe: unknown recipe {name!r}, expected one of {', '.join(RECIPES)}") from None
