"""What each net states about itself holds: the image sides it takes (Net.side_range, which the checkpoint check
uses instead of running the net) are exactly the sides a real forward pass accepts, and its output has one logit
per class."""

from __future__ import annotations

import pytest
import torch

from cifarkit.model import MODEL_NAMES
from cifarkit.model.nets import build_model


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_side_range_is_what_a_forward_pass_accepts(name):
    torch.manual_seed(0)
    net = build_model(name, num_classes=7).eval()
    lo, hi = net.side_range()
    accepted = []
    with torch.no_grad():
        for side in range(8, 64):
            try:
                out = net(torch.zeros(1, 3, side, side))
            except RuntimeError:
                continue
            if tuple(out.shape) == (1, 7):
                accepted.append(side)
        if hi < 64:  # a rectangle inside the range works too, one outside it does not
            assert net(torch.zeros(1, 3, lo, hi)).shape == (1, 7)
            with pytest.raises(RuntimeError):
                net(torch.zeros(1, 3, lo, hi + 1))
    # a net with a global pooling head takes every side from its least up (its upper bound is a policy)
    assert accepted == list(range(lo, min(hi, 63) + 1))
