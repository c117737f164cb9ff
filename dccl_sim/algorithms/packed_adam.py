"""Adam over K independent devices' parameters stacked in one tensor, each device with its own step count."""

from __future__ import annotations

import torch


class PackedAdam:
    """Row m of every parameter belongs to device m; a step updates only the rows of the active devices.

    Equal, row by row, to K separate torch.optim.Adam instances (no weight decay, no amsgrad): a device that
    has run out of minibatches neither moves nor advances its bias correction.
    """

    def __init__(
        self, params: list[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
    ) -> None:
        self.params = params
        self.lr, self.betas, self.eps = lr, betas, eps
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]
        self.steps = torch.zeros(params[0].shape[0], dtype=torch.float64)

    def step(self, active: torch.Tensor) -> None:
        """Update the rows `active` (int64 indices of devices) from the parameters' .grad."""
        self.step_rows(active, [param.grad[active] for param in self.params])

    @torch.no_grad()
    def step_rows(self, active: torch.Tensor, grads: list[torch.Tensor]) -> None:
        """Update the rows `active` from their gradients `grads` (one [len(active), ...] tensor per parameter)."""
        beta1, beta2 = self.betas
        self.steps[active] += 1
        t = self.steps[active]
        correction1 = (1 - beta1**t).to(self.params[0].dtype)
        correction2_sqrt = (1 - beta2**t).sqrt().to(self.params[0].dtype)
        for param, exp_avg, exp_avg_sq, grad in zip(self.params, self.exp_avg, self.exp_avg_sq, grads, strict=True):
            shape = (-1,) + (1,) * (grad.dim() - 1)
            m = exp_avg[active].mul_(beta1).add_(grad, alpha=1 - beta1)
            v = exp_avg_sq[active].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            exp_avg[active], exp_avg_sq[active] = m, v
            denom = (v.sqrt() / correction2_sqrt.view(shape)).add_(self.eps)
            param[active] -= (self.lr / correction1.view(shape)) * m / denom
