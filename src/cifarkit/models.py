"""Model zoo: a plain name -> constructor table. Every constructor takes `num_classes` and nothing that
ties it to a device; the training stage moves the model where it belongs.

    from cifarkit.models import build_model
    model = build_model("blog_cnn", num_classes=10)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from cifarkit.errors import CifarkitError


class BlogCNN(nn.Module):
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, 3, 32, 32] float, normalized
        x = self.pool(self.relu(self.conv1(x)))  # [N, 16, 16, 16]
        x = self.pool(self.relu(self.conv2(x)))  # [N, 32, 8, 8]
        x = self.pool(self.relu(self.conv3(x)))  # [N, 64, 4, 4]
        x = torch.flatten(x, 1)  # [N, 1024]
        x = self.relu(self.fc1(x))  # [N, 64]
        return self.fc2(x)  # [N, C] logits


MODELS: dict[str, Callable[..., nn.Module]] = {
    "blog_cnn": BlogCNN,
}


def build_model(name: str, num_classes: int, **kwargs: object) -> nn.Module:
    """Construct a registered model by name; an unknown name is a CifarkitError listing the known ones."""
    try:
        ctor = MODELS[name]
    except KeyError:
        raise CifarkitError(f"--model: unknown model {name!r}, expected one of {', '.join(sorted(MODELS))}") from None
    return ctor(num_classes=num_classes, **kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
