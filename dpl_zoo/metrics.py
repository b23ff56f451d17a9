"""Training statistics kept on the training device and read on the host only when logged.

A CUDA step must not wait for the host: every ``.item()`` or ``.cpu()`` in the hot loop is a
synchronisation. :class:`StepMetrics` accumulates losses, mask rates, pseudo-label counts and
class histograms as device tensors; :meth:`StepMetrics.read` (one transfer) runs at the
logging interval and at the end of the epoch, as timm's train.py does.
"""
from __future__ import annotations

from typing import Optional

import torch

SCALARS = ("loss", "loss_x", "loss_u", "mask_rate")


class StepMetrics:
    def __init__(self, num_classes: int, device: torch.device):
        self.num_classes, self.device = num_classes, device
        # per scalar: [epoch sum, interval sum]; counts: accepted, accepted & correct
        self.scalars = torch.zeros(2, len(SCALARS), dtype=torch.float64, device=device)
        self.counts = torch.zeros(2, dtype=torch.float64, device=device)
        self.hist_all = torch.zeros(num_classes, dtype=torch.float64, device=device)
        self.hist_accepted = torch.zeros(num_classes, dtype=torch.float64, device=device)
        self.first_bad_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.first_bad_loss = torch.zeros((), dtype=torch.float64, device=device)
        self.steps = self.interval_steps = 0

    def update(self, step: int, loss: torch.Tensor, result=None, u_targets: Optional[torch.Tensor] = None) -> None:
        """Add one step; no host synchronisation."""
        loss = loss.detach()
        if result is None:
            values = torch.stack([loss, loss, torch.zeros_like(loss), torch.zeros_like(loss)])
        else:
            values = torch.stack([loss, result.loss_x, result.loss_u, result.mask_rate.to(loss.dtype)])
            mask = result.mask
            self.hist_all.scatter_add_(0, result.targets, torch.ones_like(result.targets, dtype=self.hist_all.dtype))
            self.hist_accepted += result.histogram
            right = (result.targets == u_targets.to(result.targets.device, non_blocking=True)).to(mask.dtype) * mask
            self.counts += torch.stack([mask.sum(), right.sum()]).double()
        self.scalars += values.double().unsqueeze(0)
        bad = ~torch.isfinite(loss)
        self.first_bad_loss = torch.where(bad & (self.first_bad_step < 0), loss.double(), self.first_bad_loss)
        self.first_bad_step = torch.where(bad & (self.first_bad_step < 0), step, self.first_bad_step)
        self.steps += 1
        self.interval_steps += 1

    def read(self) -> dict:
        """Interval means (since the last read), epoch sums and the first non-finite step: one transfer."""
        packed = torch.cat([self.scalars.flatten(), self.counts, self.first_bad_step.double().view(1),
                            self.first_bad_loss.view(1)]).cpu().tolist()
        n = len(SCALARS)
        epoch, interval = packed[:n], packed[n:2 * n]
        accepted, correct, bad = packed[2 * n], packed[2 * n + 1], int(packed[2 * n + 2])
        out = {k: v / max(self.interval_steps, 1) for k, v in zip(SCALARS, interval)}
        out.update(epoch_sums=dict(zip(SCALARS, epoch)), accepted=accepted, correct=correct,
                   pl_acc=correct / accepted if accepted else float("nan"), first_bad_step=bad,
                   first_bad_loss=packed[2 * n + 3])
        self.scalars[1].zero_()
        self.interval_steps = 0
        return out

    def packed_totals(self) -> torch.Tensor:
        """Epoch sums, counts and histograms in one float64 vector, to all-reduce over ranks."""
        return torch.cat([self.scalars[0], self.counts, self.hist_all, self.hist_accepted])

    @staticmethod
    def unpack_totals(packed: torch.Tensor, num_classes: int, steps: int) -> dict:
        values = packed.cpu().tolist()
        n = len(SCALARS)
        accepted, correct = values[n], values[n + 1]
        hist = values[n + 2:]
        return {**{k: v / max(steps, 1) for k, v in zip(SCALARS, values[:n])},
                "train_pl_acc": correct / accepted if accepted else float("nan"), "train_pl_accepted": int(accepted),
                "train_pl_hist": [int(h) for h in hist[:num_classes]],
                "train_pl_accepted_hist": [int(h) for h in hist[num_classes:]]}
