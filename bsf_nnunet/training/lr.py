"""Learning-rate schedules with nnU-Net's ``step(current_step)`` convention (stateless given the step)."""
from __future__ import annotations

import math

from torch.optim.lr_scheduler import LRScheduler


def warmup_cosine_lr(step: int, initial_lr: float, max_steps: int, warmup_steps: int, min_lr: float = 0.0,
                     decay: bool = True) -> float:
    """Linear warmup from ``initial_lr / (warmup_steps + 1)`` to ``initial_lr``, then cosine decay to ``min_lr``
    (``decay=False``: constant ``initial_lr`` after the warm-up)."""
    step = max(0, int(step))
    if warmup_steps > 0 and step < warmup_steps:
        return initial_lr * (step + 1) / (warmup_steps + 1)
    if not decay:
        return initial_lr
    span = max(1, max_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (initial_lr - min_lr) * (1.0 + math.cos(math.pi * t))


class WarmupCosineLR(LRScheduler):
    def __init__(self, optimizer, initial_lr: float, max_steps: int, warmup_steps: int, min_lr: float = 0.0,
                 current_step: int = None, decay: bool = True):
        self.initial_lr = initial_lr
        self.decay = decay
        self.max_steps = max_steps
        self.warmup_steps = warmup_steps
        self.min_lr = min_lr
        self.ctr = 0
        super().__init__(optimizer, current_step if current_step is not None else -1)

    def step(self, current_step=None):
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        lr = warmup_cosine_lr(current_step, self.initial_lr, self.max_steps, self.warmup_steps, self.min_lr,
                              self.decay)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._last_lr = [lr for _ in self.optimizer.param_groups]
