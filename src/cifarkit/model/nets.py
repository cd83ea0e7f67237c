"""The nets and a plain name -> constructor table (its names are cifarkit.model.MODEL_NAMES, torch-free).

Every constructor takes `num_classes` and nothing that ties it to a device; the training stage moves the
model where it belongs. A net owns what only it knows: which of its parameters train how (`param_groups`)
and any initialisation that needs data (`init_from_data`).

    from cifarkit.model.nets import build_model
    net = build_model("blog_cnn", num_classes=10)
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from cifarkit.errors import CifarkitError, first_line
from cifarkit.model import MODEL_NAMES, check_model_name
from cifarkit.model.deployed import normalize_uint8
from cifarkit.spec import MAX_CLASSES


class Recipe(Protocol):
    """What a net reads of a training recipe (cifarkit.train.recipes.Recipe) to group its parameters."""

    bias_lr_scale: float  # learning-rate multiplier for BatchNorm biases
    whiten_bias_epochs: int  # epochs during which a whitening conv's bias trains; 0: every epoch


@dataclass
class ParamGroup:
    """Parameters that train alike. The optimizer turns each into one torch param group."""

    name: str  # for messages and debugging
    params: list[nn.Parameter] = field(default_factory=list)
    lr_scale: float = 1.0  # multiplies the recipe's learning rate (weight decay is not scaled)
    train_epochs: int | None = None  # epochs during which the group trains, then its learning rate is 0;
    #                                  None: every epoch


class Net(nn.Module):
    """What every cifarkit net offers the trainer beyond forward()."""

    def param_groups(self, recipe: Recipe) -> list[ParamGroup]:
        """The trainable parameters, grouped by how `recipe` trains them. Default: one group."""
        return [ParamGroup("all", [p for p in self.parameters() if p.requires_grad])]

    def init_from_data(self, images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Data-dependent initialisation from uint8 [N, H, W, 3] training images (unaugmented), normalized
        with `mean` and `std` ([1, 3, 1, 1]) as training will. Default: nothing to do."""

    def side_range(self) -> tuple[int, int] | None:
        """The image sides, in pixels (height and width alike), this net takes: what its poolings leave must
        fit its classifier. None: any. Checked without running the net (tests/test_models.py holds each net's
        answer against real forward passes)."""
        return None

    def folded(self) -> Net:
        """An equivalent net for inference with each BatchNorm folded into the convolution before it (int8
        quantization then sees one Conv a layer, with its bias). Default: a copy (nothing to fold)."""
        return copy.deepcopy(self).eval()


class BlogCNN(Net):
    """The blog's CNN, exactly: conv 3->16->32->64 (3x3, stride 1, padding 1), ReLU after each, one shared
    2x2 max-pool after each conv, flatten 64*4*4 -> fc 64 -> ReLU -> fc C. 89,834 parameters for C = 10,
    about 5.7 MFLOP per 32x32 image forward."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, padding=1)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(64 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, num_classes)
        self.relu = nn.ReLU()

    def side_range(self) -> tuple[int, int]:
        return (32, 39)  # three 2x2 poolings must leave 4 pixels a side: fc1 takes 64 * 4 * 4 features

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, 3, 32, 32] float, normalized
        # The blog writes pool(relu(conv(x))). ReLU and max-pooling commute exactly (both are monotonic, and the
        # gradient reaches the same element, or none when the window is all <= 0), so the ReLU runs on the pooled,
        # 4x smaller tensor: the same numbers, forward and backward, ~7 % less time a training step at batch 32.
        x = self.relu(self.pool(self.conv1(x)))  # [N, 16, 16, 16]
        x = self.relu(self.pool(self.conv2(x)))  # [N, 32, 8, 8]
        x = self.relu(self.pool(self.conv3(x)))  # [N, 64, 4, 4]
        x = torch.flatten(x, 1)  # [N, 1024]
        x = self.relu(self.fc1(x))  # [N, 64]
        return self.fc2(x)  # [N, C] logits


# ---------------------------------------------------------------------------------------------------------
# A fast, strong CIFAR-10 network, after airbench94 (Keller Jordan, "94% on CIFAR-10 in 3.29 seconds on a
# single GPU", arXiv 2404.00498): a frozen 2x2 patch-whitening conv, three conv groups with BatchNorm and
# GELU, a 3x3 max-pool head and a scaled linear classifier. 1.97 M parameters.
# ---------------------------------------------------------------------------------------------------------


class _BatchNorm(nn.BatchNorm2d):
    """BatchNorm with a learnable bias only (the scale is fixed at 1), as in airbench."""

    def __init__(self, num_features: int, momentum: float = 0.6, eps: float = 1e-12) -> None:
        super().__init__(num_features, eps=eps, momentum=1 - momentum)
        self.weight.requires_grad_(False)


class _Conv(nn.Conv2d):
    """3x3 'same' conv without bias, initialised as identity on the first in_channels filters (dirac)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, kernel_size=3, padding="same", bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        w = self.weight.data
        nn.init.dirac_(w[: w.size(1)])


class _ConvGroup(nn.Module):
    def __init__(self, cin: int, cout: int, bn_momentum: float) -> None:
        super().__init__()
        self.conv1 = _Conv(cin, cout)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = _BatchNorm(cout, bn_momentum)
        self.conv2 = _Conv(cout, cout)
        self.norm2 = _BatchNorm(cout, bn_momentum)
        self.activ = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.activ(self.norm1(self.pool(self.conv1(x))))
        return self.activ(self.norm2(self.conv2(x)))


class AirbenchNet(Net):
    """[N, 3, 32, 32] -> [N, C]. Widths (64, 256, 256) as airbench94; `whiten` is initialised from training
    data by `init_from_data` before training (its weights are then frozen)."""

    WHITENING_IMAGES = 5000  # airbench's patch statistics come from the first 5,000 training images

    def __init__(
        self,
        num_classes: int = 10,
        widths: Sequence[int] = (64, 256, 256),
        bn_momentum: float = 0.6,
        scaling_factor: float = 1 / 9,
    ) -> None:
        super().__init__()
        whiten_width = 2 * 3 * 2 * 2  # +/- each eigenvector of the 12-dim 2x2x3 patch covariance
        self.whiten = nn.Conv2d(3, whiten_width, kernel_size=2, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)
        nn.init.zeros_(self.whiten.bias)
        self.block1 = _ConvGroup(whiten_width, widths[0], bn_momentum)
        self.block2 = _ConvGroup(widths[0], widths[1], bn_momentum)
        self.block3 = _ConvGroup(widths[1], widths[2], bn_momentum)
        self.head_pool = nn.MaxPool2d(3)
        self.fc = nn.Linear(widths[2], num_classes, bias=False)
        self.scaling_factor = scaling_factor
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.whiten(x))  # [N, 24, 31, 31]
        x = self.block3(self.block2(self.block1(x)))  # [N, 256, 3, 3]
        x = torch.flatten(self.head_pool(x), 1)  # [N, 256]
        return self.fc(x) * self.scaling_factor

    def folded(self) -> AirbenchNet:
        """BatchNorm folded into the conv before it: norm2 directly; norm1 through the max-pool between them,
        which commutes with a per-channel affine map of positive scale (max(a*x + b) = a*max(x) + b for a > 0);
        a BatchNorm with a scale that is not positive is kept as it is."""
        net = copy.deepcopy(self).eval()
        for block in (net.block1, net.block2, net.block3):
            for conv, norm in (("conv1", "norm1"), ("conv2", "norm2")):
                fused = fold_batchnorm(getattr(block, conv), getattr(block, norm))
                if fused is not None:
                    setattr(block, conv, fused)
                    setattr(block, norm, nn.Identity())
        return net

    def side_range(self) -> tuple[int, int]:
        # The 2x2 whitening conv takes a pixel, three 2x2 poolings halve, and the 3x3 head pooling must leave one
        # pixel: floor(floor(floor((side - 1) / 2) / 2) / 2) in 3..5.
        return (25, 48)

    def param_groups(self, recipe: Recipe) -> list[ParamGroup]:
        """airbench's groups: BatchNorm biases learn `bias_lr_scale` times faster; the whitening bias trains
        for the first `whiten_bias_epochs` only; every other trainable parameter at the base rate."""
        norm_biases = [m.bias for m in self.modules() if isinstance(m, _BatchNorm)]
        special = {id(p) for p in norm_biases} | {id(self.whiten.bias)}
        others = [p for p in self.parameters() if p.requires_grad and id(p) not in special]
        return [
            ParamGroup("norm_biases", norm_biases, lr_scale=recipe.bias_lr_scale),
            ParamGroup("weights", others),
            ParamGroup("whiten_bias", [self.whiten.bias], train_epochs=recipe.whiten_bias_epochs or None),
        ]

    def init_from_data(self, images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> None:
        first = normalize_uint8(images[: self.WHITENING_IMAGES], mean, std).contiguous().cpu()
        init_whitening(self.whiten, first)


class SprintNet(AirbenchNet):
    """The `sprint` recipe's net: airbench's layers with a global max-pool head, so that it trains at any side
    from 9 pixels up (progressive resizing: the first part of a schedule at a lower resolution, where a step
    costs less) and gives the same answer as airbench's 3x3 head pooling at 32x32; a classifier scaled by
    1/width with unit-variance weights (airbench94_muon's head). `widths` trade speed for accuracy."""

    MAX_SIDE = 1024  # the global pooling takes any side; a checkpoint recording a larger one is refused

    def __init__(self, num_classes: int = 10, widths: Sequence[int] = (64, 256, 256), bn_momentum: float = 0.6):
        super().__init__(num_classes, widths=widths, bn_momentum=bn_momentum, scaling_factor=1 / widths[2])
        self.head_pool = nn.AdaptiveMaxPool2d(1)
        if not self.fc.weight.is_meta:  # std on a meta tensor goes through torch._refs, which imports dynamo
            with torch.no_grad():
                self.fc.weight.div_(self.fc.weight.std())

    def side_range(self) -> tuple[int, int]:
        # The 2x2 whitening conv takes a pixel and three 2x2 poolings halve: one pixel must be left for the head.
        return (9, self.MAX_SIDE)

    def param_groups(self, recipe: Recipe) -> list[ParamGroup]:
        """Filters (the 3x3 convolutions, for Muon), the classifier, BatchNorm biases, and the whitening bias
        (trained for the first `whiten_bias_epochs` only)."""
        filters = [p for p in self.parameters() if p.requires_grad and p.dim() == 4]
        norm_biases = [m.bias for m in self.modules() if isinstance(m, _BatchNorm)]
        return [
            ParamGroup("filters", filters),
            ParamGroup("head", [self.fc.weight]),
            ParamGroup("norm_biases", norm_biases),
            ParamGroup("whiten_bias", [self.whiten.bias], train_epochs=recipe.whiten_bias_epochs or None),
        ]


@torch.no_grad()
def fold_batchnorm(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> nn.Conv2d | None:
    """A conv with bias equal to norm(conv(x)) in inference (running statistics), or None when a channel's scale
    gamma / sqrt(var + eps) is not positive (then it could not pass a max-pool between the two)."""
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)  # [C_out]
    if not bool((scale > 0).all()):
        return None
    fused = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, groups=conv.groups, bias=True,
    )  # fmt: skip
    fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
    fused.bias.copy_((bias - norm.running_mean) * scale + norm.bias)
    return fused


@torch.no_grad()
def init_whitening(layer: nn.Conv2d, images: torch.Tensor, eps: float = 5e-4) -> None:
    """Set a 2x2 conv to whiten image patches: weights = +/- eigenvectors / sqrt(eigenvalues + eps) of the
    patch covariance of `images` (float [N, 3, H, W], normalized; airbench uses the first 5,000)."""
    c, (h, w) = images.shape[1], layer.weight.shape[2:]
    patches = images.unfold(2, h, 1).unfold(3, w, 1).transpose(1, 3).reshape(-1, c, h, w).double()
    flat = patches.reshape(len(patches), -1)
    cov = (flat.T @ flat) / len(flat)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    eigenvalues = eigenvalues.flip(0).view(-1, 1, 1, 1)
    eigenvectors = eigenvectors.T.reshape(c * h * w, c, h, w).flip(0)
    scaled = (eigenvectors / torch.sqrt(eigenvalues + eps)).to(layer.weight.dtype)
    layer.weight.copy_(torch.cat((scaled, -scaled)))


MODELS: dict[str, Callable[..., Net]] = {
    "blog_cnn": BlogCNN,
    "airbench": AirbenchNet,
    "sprint": SprintNet,
}
assert tuple(MODELS) == MODEL_NAMES, "cifarkit.model.MODEL_NAMES must list the nets of this table"


MAX_PARAMETERS = 200_000_000  # airbench has 1.97 M, the blog's CNN 89,834; a checkpoint may not ask for more


def meta_model(name: str, num_classes: int, **kwargs: object) -> Net:
    """The net `name` built on the meta device: its structure and shapes, no memory and no random numbers. An
    unknown name, arguments the constructor does not take, or a size over MAX_PARAMETERS (a checkpoint asking
    for huge widths) is a CifarkitError."""
    check_model_name(name)
    if not (isinstance(num_classes, int) and 2 <= num_classes <= MAX_CLASSES):
        raise CifarkitError(f"model {name!r}: the number of classes must be 2 to {MAX_CLASSES:,}, got {num_classes!r}")
    try:
        with torch.device("meta"):
            net = MODELS[name](num_classes=num_classes, **kwargs)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise CifarkitError(f"model {name!r} cannot be built with {_short(kwargs)} ({first_line(exc)})") from None
    size = count_parameters(net)
    if size > MAX_PARAMETERS:
        raise CifarkitError(
            f"model {name!r} with {_short(kwargs)} has {size:,} parameters, over the {MAX_PARAMETERS:,} limit"
        )
    return net


def build_model(name: str, num_classes: int, **kwargs: object) -> Net:
    """Construct a registered model by name, after meta_model has checked it: nothing is allocated and no
    random number is drawn before the check."""
    meta_model(name, num_classes, **kwargs)
    return MODELS[name](num_classes=num_classes, **kwargs)


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@torch.no_grad()
def multiply_adds(model: nn.Module, side: int) -> int:
    """Multiply-adds of the convolutions and linear layers for one side x side image (counted on a forward pass
    of one zero image in eval mode, which moves no BatchNorm statistic; the model's mode is restored)."""
    total = 0

    def count(module: nn.Module, _: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            total += out.numel() * k
        elif isinstance(module, nn.Linear):
            total += out.numel() * module.in_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    param = next(model.parameters())
    try:
        model.eval()
        model(torch.zeros(1, 3, side, side, device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return total


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
