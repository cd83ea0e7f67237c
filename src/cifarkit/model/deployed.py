"""The deployed module every artifact contains, and what evaluation runs: uint8 images in, normalization and
test-time augmentation inside the graph, logits and probabilities out.

    deployed = DeployedModel(net, mean, std, tta="none")     # uint8 [N, 32, 32, 3] -> logits, probabilities
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from cifarkit.spec import TTA_MODES


def normalize_uint8(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float32 [N, 3, H, W], exactly torchvision's ToTensor() then Normalize(mean, std).

    `mean` and `std` are float32 [1, 3, 1, 1]. The result is a channels_last-strided view of NCHW
    (what permuting an NHWC tensor gives); call .contiguous() for the classic layout."""
    # Cast first, then permute: the same values and strides, and in the exported graph the uint8 input then
    # feeds a Cast directly, which TensorRT needs for a uint8 network input (NVIDIA/TensorRT#3985).
    return x.to(torch.float32).permute(0, 3, 1, 2).div(255.0).sub(mean).div(std)


def channel_tensor(values: Sequence[float], device: torch.device | str = "cpu") -> torch.Tensor:
    """Per-channel values (mean or std) as the float32 [1, 3, 1, 1] tensor normalize_uint8 takes."""
    return torch.tensor(list(values), dtype=torch.float32, device=device).view(1, 3, 1, 1)


# ---------------------------------------------------------------------------------------------------------
# The deployed module: what both exported artifacts contain, and what evaluation runs
# ---------------------------------------------------------------------------------------------------------


class DeployedModel(nn.Module):
    """uint8 [N, H, W, 3] RGB -> (logits [N, C], probabilities [N, C]), float32.

    Normalization is torchvision's ToTensor() + Normalize(mean, std), done in the graph so that a host app
    feeds decoder output directly. Test-time augmentation, averaged in logit space (airbench's rule):
      hflip            mean of the image and its mirror
      hflip_translate  half that, half the mean of hflip over the image shifted 1 px up-left and down-right
                       (reflect padding)"""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float], tta: str = "none") -> None:
        super().__init__()
        if tta not in TTA_MODES:
            raise ValueError(f"tta must be one of {TTA_MODES}, got {tta!r}")
        self.net = net
        self.tta = tta
        self.register_buffer("mean", channel_tensor(mean))
        self.register_buffer("std", channel_tensor(std))

    def _mirror(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.net(x) + self.net(torch.flip(x, dims=[3])))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = normalize_uint8(images, self.mean, self.std).contiguous()  # [N, 3, H, W] float32
        if self.tta == "none":
            logits = self.net(x)
        elif self.tta == "hflip":
            logits = self._mirror(x)
        else:
            h, w = x.shape[2], x.shape[3]
            padded = nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
            shifted = 0.5 * (self._mirror(padded[:, :, 0:h, 0:w]) + self._mirror(padded[:, :, 2 : h + 2, 2 : w + 2]))
            logits = 0.5 * self._mirror(x) + 0.5 * shifted
        return logits, torch.softmax(logits, dim=1)

    @torch.no_grad()
    def run_numpy(self, images: np.ndarray, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
        """(logits, probabilities) as float32 numpy arrays for uint8 [N, H, W, 3] images, in batches, on the
        module's device: the eager reference that parity checks compare artifacts with."""
        device = self.mean.device
        logits, probs = [], []
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).to(device)
            lo, pr = self(batch)
            logits.append(lo.float().cpu().numpy())
            probs.append(pr.float().cpu().numpy())
        if not logits:
            return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
        return np.concatenate(logits), np.concatenate(probs)
