"""The confidence a pseudo-label needs: FreeMatch's self-adaptive threshold (SAT).

A fixed threshold (FixMatch's 0.95) accepts almost nothing while a model trained from few labels
is still unsure, so the unlabeled data teach little early on. SAT (Wang et al., "FreeMatch:
Self-adaptive Thresholding for Semi-supervised Learning", ICLR 2023) lets the threshold follow
the model's own confidence instead: a global level ``g`` (the running mean of the batch's top
probability) scaled per class by the running mean class distribution ``p~`` over its maximum:

    g <- m g + (1 - m) mean_i max_c p_ic        p~ <- m p~ + (1 - m) mean_i p_i
    threshold_c = g * p~_c / max_c' p~_c'

Both start at ``1 / C`` and ``m`` is 0.999, as in FreeMatch. Composed with DebiasPL, ``p`` is the
*debiased* pseudo-label distribution ``softmax(lw - tau log qhat)``: the threshold follows the
confidence of the pseudo-labels it gates. FreeMatch's fairness loss is not part of this.

Pure tensor code, like :mod:`dpl_zoo.method`; the statistics are summed over processes under
``torch.distributed`` so every rank holds the same thresholds.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from .distributed import is_distributed

THRESHOLD_MODES = ("fixed", "self_adaptive")


class SelfAdaptiveThreshold(nn.Module):
    """Per-class thresholds that follow the model's confidence (FreeMatch's SAT).

    ``global_confidence`` (a scalar) and ``class_confidence`` (1 x C) are buffers, so they travel
    in ``state_dict`` and checkpoints.
    """

    global_confidence: torch.Tensor
    class_confidence: torch.Tensor

    def __init__(self, num_classes: int, momentum: float = 0.999, sync: bool = True):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        if not isinstance(momentum, (int, float)) or isinstance(momentum, bool) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"threshold momentum must be in [0, 1), got {momentum!r}")
        self.num_classes = num_classes
        self.momentum = float(momentum)
        self.sync = sync
        self.register_buffer("global_confidence", torch.tensor(1.0 / num_classes, dtype=torch.float32))
        self.register_buffer("class_confidence", torch.full((1, num_classes), 1.0 / num_classes, dtype=torch.float32))

    def thresholds(self) -> torch.Tensor:
        """The current per-class thresholds, 1 x C."""
        local = self.class_confidence / self.class_confidence.max()
        return self.global_confidence * local

    @torch.no_grad()
    def update(self, probs: torch.Tensor) -> torch.Tensor:
        """One EMA step from a batch of pseudo-label distributions (N x C); returns the thresholds."""
        if probs.dim() != 2 or probs.shape[1] != self.num_classes:
            raise ValueError(f"probs must have shape (N, {self.num_classes}), got {tuple(probs.shape)}")
        probs = probs.detach().float()
        # one vector [class sums..., top-probability sum, count]: a single all-reduce serves all three
        stats = torch.cat([probs.sum(0), probs.max(dim=1).values.sum().view(1),
                           probs.new_tensor([float(probs.shape[0])])])
        if self.sync and is_distributed():
            dist.all_reduce(stats)
        count = stats[-1]
        m = self.momentum
        g = self.global_confidence * m + (stats[-2] / count.clamp(min=1.0)) * (1.0 - m)
        p = self.class_confidence * m + (stats[:-2] / count.clamp(min=1.0)).unsqueeze(0) * (1.0 - m)
        # an empty batch (all processes) leaves the state as it was; no host sync
        self.global_confidence.copy_(torch.where(count > 0, g, self.global_confidence))
        self.class_confidence.copy_(torch.where(count > 0, p, self.class_confidence))
        return self.thresholds()

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, momentum={self.momentum}"
