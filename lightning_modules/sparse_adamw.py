"""AdamW whose sparse-gradient parameters (an ``nn.Embedding(sparse=True)`` id table) update
only the rows of the step: with a million-item catalog a dense N x d update (and its DDP
all-reduce) costs more than the rest of the step together.

Dense parameters take ``torch.optim.AdamW``'s own step, unchanged. A sparse gradient's rows are
updated by the same AdamW formulas ("lazy Adam", as ``torch.optim.SparseAdam``): the moments
and the weights of the rows in the step change; every other row keeps its weights and its
moments, where dense AdamW would decay the moments and keep moving the row by its momentum.
The step count (bias correction) is the parameter's, so a row present in every step gets
exactly dense AdamW's update.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch


class SparseRowAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` that also takes sparse gradients, updating only their rows."""

    def __init__(self, params, **kwargs):
        if kwargs.get("amsgrad") or kwargs.get("maximize"):
            raise ValueError("SparseRowAdamW: amsgrad and maximize are not supported")
        super().__init__(params, **kwargs)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:  # Lightning's closure runs forward and backward: grads come after it
            with torch.enable_grad():
                loss = closure()
        parked = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    self._update_rows(p, group)
                    parked.append((p, p.grad))
                    p.grad = None  # AdamW's step skips it
        try:
            super().step()
        finally:
            for p, grad in parked:
                p.grad = grad
        return loss

    def _update_rows(self, p: torch.Tensor, group: dict) -> None:
        assert p.grad is not None  # step() calls this only for parameters with a sparse gradient
        grad = p.grad.coalesce()  # one row per index: repeated rows' gradients summed
        rows, g = grad.indices()[0], grad.values()
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        step = float(state["step"])
        beta1, beta2 = group["betas"]
        lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
        exp_avg = state["exp_avg"][rows].lerp_(g, 1 - beta1)
        exp_avg_sq = state["exp_avg_sq"][rows].mul_(beta2).addcmul_(g, g, value=1 - beta2)
        state["exp_avg"][rows] = exp_avg
        state["exp_avg_sq"][rows] = exp_avg_sq
        denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
        update = exp_avg / denom * (lr / (1 - beta1**step))
        if decay:  # decoupled weight decay, on the rows of the step only
            update = update + p[rows] * (lr * decay)
        p.index_add_(0, rows, update, alpha=-1.0)


def has_sparse_grad(params: Iterable[torch.Tensor]) -> bool:
    return any(p.grad is not None and p.grad.is_sparse for p in params)


@torch.no_grad()
def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (L2) that also counts sparse gradients (their rows,
    repeated rows summed); torch's own refuses them. Returns the total norm before clipping."""
    grads = []
    for p in params:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
        grads.append(p.grad)
    if not grads:
        return torch.tensor(0.0)
    norms = [(g.values() if g.is_sparse else g).detach().float().norm() for g in grads]
    total = torch.linalg.vector_norm(torch.stack(norms))
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        (g.values() if g.is_sparse else g).mul_(scale.to(g.dtype))
    return total
