"""torch's optimizers without the first-call import of torch._dynamo: the same classes and updates, for the
fixed costs of short runs (a 30 s time budget, the blog's 4 epochs end to end).

torch.optim.Optimizer wraps add_param_group, zero_grad, state_dict and load_state_dict, and Adam's and SGD's
step, in functions that import torch._dynamo when first called (for torch.compile's sake); a plain training
step never needs it. Measured on this project's 2-core CPU: ~1.3 s and ~150 MB of resident memory per process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def _undecorated(method: Callable[..., Any]) -> Callable[..., Any]:
    return getattr(method, "__wrapped__", method)


class PlainMethods:
    """torch.optim.Optimizer's add_param_group, zero_grad, state_dict and load_state_dict without the wrappers that
    import torch._dynamo on their first call (~1.3 s and ~150 MB in every training process, measured here; a
    30 s budget cannot spare it). The same code runs: each wrapper keeps the function it wraps (`__wrapped__`);
    if a torch release drops that, the wrapped method runs as before."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        _undecorated(torch.optim.Optimizer.add_param_group)(self, param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        _undecorated(torch.optim.Optimizer.zero_grad)(self, set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return _undecorated(torch.optim.Optimizer.state_dict)(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        _undecorated(torch.optim.Optimizer.load_state_dict)(self, state_dict)


class Adam(PlainMethods, torch.optim.Adam):
    """torch.optim.Adam, the same update, no dynamo import. With fused=True, after its first step (which creates
    the state the stock way) each step calls the fused kernel directly, as torch's own fused path does
    (torch.optim.adam._fused_adam: count the step, then torch._fused_adam_) but without re-gathering the
    parameters' state in Python: ~0.15 ms less a step, which is 4 % of a batch-32 step of the blog CNN. Anything
    that path does not cover (a missing gradient, amsgrad, a gradient scaler, several dtypes) takes the stock step."""

    _lean: list[tuple[dict[str, Any], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        lean = getattr(self, "_lean", None)
        # GradScaler hands a fused optimizer its scale and inf flag as attributes: those steps take the stock path
        scaled = getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None
        if closure is None and lean and not scaled and all(p.grad is not None for g, *_ in lean for p in g["params"]):
            for group, params, exp_avgs, exp_avg_sqs, steps in lean:
                beta1, beta2 = group["betas"]
                torch._foreach_add_(steps, 1)
                torch._fused_adam_(
                    params, [p.grad for p in params], exp_avgs, exp_avg_sqs, [], steps, amsgrad=False,
                    lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
                    maximize=False, grad_scale=None, found_inf=None,
                )  # fmt: skip
            return None
        out = _undecorated(torch.optim.Adam.step)(self, closure)
        self._lean = self._lean_groups()
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._lean = []  # the next step takes the stock path and gathers the loaded state again

    def _lean_groups(self) -> list:
        """Each group's tensors for the direct path, or [] when a group needs what only the stock step does."""
        out = []
        for group in self.param_groups:
            params = group["params"]
            plain = (
                group.get("fused") and not group["amsgrad"] and not group["maximize"] and not group["capturable"]
                and not group["differentiable"] and not group.get("decoupled_weight_decay", False)
                and not isinstance(group["lr"], torch.Tensor) and len({(p.device, p.dtype) for p in params}) == 1
                and all(p.device.type == "cpu" and not torch.is_complex(p) and p in self.state for p in params)
            )  # fmt: skip
            if not plain:
                return []
            state = [self.state[p] for p in params]
            out.append((group, params, [s["exp_avg"] for s in state], [s["exp_avg_sq"] for s in state],
                        [s["step"] for s in state]))  # fmt: skip
        return out


class SGD(PlainMethods, torch.optim.SGD):
    """torch.optim.SGD, the same update, no dynamo import."""

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        return _undecorated(torch.optim.SGD.step)(self, closure)
