"""Batching from memory on the training device, with augmentation done there, batched.

A split lives on the device as one uint8 tensor; every batch is gathered, augmented and normalized there,
so there is no per-sample PIL work and no worker process.

    batches = DeviceBatches(data.train_x, data.train_y, batch_size=32, device=device,
                            mean=recipe.mean, std=recipe.std)
    for x, y in batches.epoch(0): ...    # x: [B, 3, 32, 32] float32 normalized, y: [B] int64
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from cifarkit.model.deployed import channel_tensor, normalize_uint8


class DeviceBatches:
    """Holds a split as one uint8 tensor on `device` and serves normalized batches from it.

    Every epoch is a fresh permutation drawn from a generator seeded with (seed, epoch), so a resumed run
    sees exactly the order an uninterrupted run would have. With `world_size` > 1 each rank takes an equal,
    disjoint share of every epoch's permutation (DistributedSampler's rule: pad by wrapping).

    Augmentation, on the device, batch by batch (airbench's scheme): `translate` shifts every image by up to
    that many pixels in x and y (reflect padding); `flip` mirrors a fixed random half of the images and then
    flips all of them every other epoch, which sees both views more evenly than independent coin flips. Each
    epoch's shifts are drawn for every image at once, from a generator seeded with (seed, epoch): the pixels
    do not depend on the batch size or on how far a run got before it was resumed."""

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        *,
        batch_size: int,
        device: torch.device,
        mean: Sequence[float],
        std: Sequence[float],
        shuffle: bool = True,
        seed: int = 0,
        channels_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        translate: int = 0,
        flip: bool = False,
        drop_last: bool = False,
    ) -> None:
        self.x = torch.from_numpy(x).to(device)  # uint8 [N, H, W, 3]
        self.y = torch.from_numpy(y).to(device)  # int64 [N]
        self.batch_size = batch_size
        self.device = device
        self.shuffle = shuffle
        self.seed = seed
        self.mean = channel_tensor(mean, device)  # [1, 3, 1, 1] float32
        self.std = channel_tensor(std, device)
        self.channels_last = channels_last
        self.rank = rank
        self.world_size = world_size
        self.translate = translate
        self.drop_last = drop_last
        self.flip_mask: torch.Tensor | None = None
        if flip:
            g = torch.Generator().manual_seed(seed * 1_000_003 + 7_777)
            self.flip_mask = (torch.rand(len(y), generator=g) < 0.5).to(device)  # [N] bool

    def __len__(self) -> int:
        n = self.per_rank
        if self.drop_last:  # a data set smaller than one batch is one short batch, not an epoch of none
            return max(1, n // self.batch_size)
        return -(-n // self.batch_size)

    @property
    def per_rank(self) -> int:
        n = len(self.y)
        return -(-n // self.world_size) if self.world_size > 1 else n

    def _generator(self, epoch: int, salt: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + salt)

    def order(self, epoch: int) -> torch.Tensor:
        n = len(self.y)
        idx = torch.randperm(n, generator=self._generator(epoch)) if self.shuffle else torch.arange(n)
        if self.world_size > 1:
            total = self.per_rank * self.world_size
            if total > n:
                idx = torch.cat([idx, idx[: total - n]])
            idx = idx[self.rank : total : self.world_size]
        return idx.to(self.device)

    def _shifts(self, epoch: int) -> torch.Tensor | None:
        """This epoch's translation of every image, int64 [N, 2] (dy, dx) in [-translate, translate]."""
        if not self.translate:
            return None
        r = self.translate
        return torch.randint(-r, r + 1, (len(self.y), 2), generator=self._generator(epoch, 500_009)).to(self.device)

    def gather(self, idx: torch.Tensor, epoch: int, shifts: torch.Tensor | None = None) -> torch.Tensor:
        """The augmented uint8 [B, H, W, 3] images `idx` as epoch `epoch` sees them: shifted by up to
        `translate` pixels with reflect padding (np.pad's "reflect": the edge pixel is not repeated), then
        mirrored where the flip mask says, in one gather from the stored images. Nothing the size of the data
        set is copied, and there is no boolean mask (which would make a GPU wait)."""
        if shifts is None and self.translate:
            shifts = self._shifts(epoch)
        flip = None if self.flip_mask is None else (self.flip_mask ^ bool(epoch % 2)).index_select(0, idx)
        if shifts is None and flip is None:
            return self.x.index_select(0, idx)
        n, h, w = len(idx), self.x.shape[1], self.x.shape[2]
        rows = torch.arange(h, device=self.device).expand(n, h)  # [B, H]
        cols = torch.arange(w, device=self.device).expand(n, w)  # [B, W]
        if flip is not None:
            cols = torch.where(flip.view(-1, 1), (w - 1) - cols, cols)  # mirror after the shift: reverse columns
        if shifts is not None:
            s = shifts.index_select(0, idx)
            rows = _reflect(rows + s[:, :1], h)
            cols = _reflect(cols + s[:, 1:], w)
        return self.x[idx.view(n, 1, 1), rows.view(n, h, 1), cols.view(n, 1, w)]

    def images(self, epoch: int) -> torch.Tensor:
        """This epoch's augmented uint8 [N, H, W, 3] images, all of them (for inspection: training gathers
        them batch by batch)."""
        return self.gather(torch.arange(len(self.y), device=self.device), epoch)

    def epoch(self, epoch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self.order(epoch)
        shifts = self._shifts(epoch)
        stop = min(len(self) * self.batch_size, len(idx)) if self.drop_last else len(idx)
        for start in range(0, stop, self.batch_size):
            b = idx[start : start + self.batch_size]
            xb = normalize_uint8(self.gather(b, epoch, shifts), self.mean, self.std)
            if not self.channels_last:
                xb = xb.contiguous()
            yield xb, self.y.index_select(0, b)


def _reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    """Indices in [-(n - 1), 2n - 2] reflected into [0, n): -1 -> 1, n -> n - 2 (np.pad's "reflect")."""
    i = i.abs()
    return torch.where(i > n - 1, 2 * (n - 1) - i, i)
