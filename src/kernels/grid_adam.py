"""Adam for voxel grids (DVGO's masked Adam); the update runs through ``kernels.grid_adam_step``.

Per parameter group, beyond Adam's ``lr``, ``betas`` and ``eps``:
- ``skip_zero_grad``: entries whose gradient is exactly zero keep their parameter *and* moments
  (voxels no ray touched this step are not decayed towards zero, as DVGO does);
- ``per_lr``: an optional tensor broadcastable to the parameters, multiplying the step
  (DVGO's view-count-based per-voxel learning rate).

Update (``t`` counts the group's steps): ``m = b1 m + (1-b1) g``; ``v = b2 v + (1-b2) g^2``;
``p -= lr * per_lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)``.
"""
from __future__ import annotations

import math

import torch

from src import kernels


class GridAdam(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.99), eps: float = 1e-8,
                 skip_zero_grad: bool = False, per_lr: torch.Tensor | None = None) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, skip_zero_grad=skip_zero_grad, per_lr=per_lr)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                state["step"] += 1
                step_size = group["lr"] * math.sqrt(1 - beta2 ** state["step"]) / (1 - beta1 ** state["step"])
                kernels.grid_adam_step(param, param.grad, state["exp_avg"], state["exp_avg_sq"], beta1, beta2,
                                       group["eps"], step_size, group["skip_zero_grad"], group["per_lr"])
        return loss
