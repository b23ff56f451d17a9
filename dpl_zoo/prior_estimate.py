"""The unlabeled data's class prior, estimated during training (``dpl.target_prior: estimated``).

DebiasPL debiases pseudo-labels towards a target distribution. When the unlabeled images' class
mix is unknown, neither fixed choice is right: ``uniform`` fights a real imbalance, ``labeled``
copies a labeled split that was drawn N per class or at another time and place.

Why not the pseudo-label histogram, or the model's mean prediction: that is what DebiasPL
corrects, and the model is trained towards its own target, so an estimate read back from it
echoes the target it was given (tried: it stays where it starts, or runs away to one class).

The estimator here is label-shift EM (Saerens, Latinne and Decaestecker, 2002) with a calibrated
classifier that is *not* the model: a linear probe on the teacher's pre-logit features (detached),
trained with logit adjustment (Menon et al., 2021) so that it predicts as if classes were equally
frequent: on the labeled batch its logits are shifted by the labeled split's log prior, on
accepted pseudo-labels by the log share of each class among the recently accepted ones. Such a
balanced probe ``g`` is what EM needs: the unlabeled prior ``pi`` is the fixed point of
``pi = mean_x softmax(g(x) + log pi)`` over unlabeled images, taken here as one online step per
training step, ``pi <- m pi + (1 - m) mean softmax(g(x) + log pi)``. Anchoring ``g`` to the labels
(and to the pseudo-labels' own frequencies) is what keeps the estimate from echoing the target;
ACR (CVPR 2023) and SimPro (ICML 2024) estimate the same quantity with anchors and EM too.

Pure tensor code with closed-form gradients, no I/O: the training task calls :meth:`step` with
features it captured. Under ``torch.distributed`` the probe's gradients and the EM and histogram
statistics are summed over processes, so every rank holds the same estimate.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from .distributed import is_distributed

STARTS = ("uniform", "labeled")


class PriorEstimator(nn.Module):
    """Online estimate ``pi`` (1 x C) of the unlabeled data's class prior.

    Args:
        num_classes: C, at least 2.
        feature_dim: D, the width of the classifier's input (pre-logit features).
        labeled_prior: the labeled split's class shares (C positive numbers; a class without labels
            should get a small positive share, as ``target_prior: labeled`` gives it).
        start: ``uniform`` or ``labeled``: the estimate before it is formed, and EM's start.
        momentum: EM step's momentum ``m`` (and the decay of the pseudo-label counts).
        warmup: steps the probe trains before EM starts moving ``pi``.
        min_accepted: accepted pseudo-labels needed (with ``warmup``) before the estimate is used.
        lr, weight_decay, probe_momentum: the probe's SGD.
        lambda_u: weight of the probe's pseudo-label loss.
        min_share: floor of any class's share (a class never predicted keeps a finite log share).
        sync: all-reduce under ``torch.distributed``.
    """

    def __init__(self, num_classes: int, feature_dim: int, labeled_prior: Sequence[float] | torch.Tensor,
                 start: str = "uniform", momentum: float = 0.99, warmup: int = 100,
                 min_accepted: Optional[int] = None, lr: float = 0.03, weight_decay: float = 5e-4,
                 probe_momentum: float = 0.9, lambda_u: float = 1.0, min_share: float = 1e-3, sync: bool = True):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        if not isinstance(feature_dim, int) or feature_dim < 1:
            raise ValueError(f"feature_dim must be a positive integer, got {feature_dim!r}")
        if start not in STARTS:
            raise ValueError(f"start must be one of {', '.join(STARTS)}, got {start!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if not 0.0 < min_share < 1.0 / num_classes:
            raise ValueError(f"min_share must be in (0, 1/C), got {min_share!r}")
        labeled = torch.as_tensor(labeled_prior, dtype=torch.float64).flatten()
        if labeled.numel() != num_classes or not bool(torch.isfinite(labeled).all()) or bool((labeled <= 0).any()):
            raise ValueError(f"labeled_prior must hold {num_classes} positive numbers, got {labeled.tolist()}")
        labeled = (labeled / labeled.sum()).float().view(1, -1)
        self.num_classes, self.feature_dim = num_classes, feature_dim
        self.start, self.momentum, self.warmup = start, float(momentum), int(warmup)
        self.min_accepted = 20 * num_classes if min_accepted is None else int(min_accepted)
        self.lr, self.weight_decay, self.probe_momentum = float(lr), float(weight_decay), float(probe_momentum)
        self.lambda_u, self.min_share, self.sync = float(lambda_u), float(min_share), sync
        start_prior = labeled.clone() if start == "labeled" else torch.full((1, num_classes), 1.0 / num_classes)
        self.register_buffer("labeled_log_prior", labeled.log())
        self.register_buffer("start_prior", start_prior)
        self.register_buffer("prior", start_prior.clone())
        self.register_buffer("weight", torch.zeros(num_classes, feature_dim))
        self.register_buffer("bias", torch.zeros(num_classes))
        self.register_buffer("weight_velocity", torch.zeros(num_classes, feature_dim))
        self.register_buffer("bias_velocity", torch.zeros(num_classes))
        self.register_buffer("pl_counts", torch.zeros(num_classes))     # decayed counts of accepted pseudo-labels
        self.register_buffer("accepted", torch.zeros((), dtype=torch.long))  # all accepted so far
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def probe(self, features: torch.Tensor) -> torch.Tensor:
        """The balanced probe's logits ``g(x)`` (N x C)."""
        return features.float() @ self.weight.t() + self.bias

    def ready(self) -> torch.Tensor:
        """Whether the estimate is formed (a 0-dim bool tensor: no host sync)."""
        return (self.steps >= self.warmup) & (self.accepted >= self.min_accepted)

    def target(self) -> torch.Tensor:
        """What to debias towards now: the estimate once :meth:`ready`, else the start prior."""
        return torch.where(self.ready(), self.prior, self.start_prior)

    def pseudo_label_log_prior(self) -> torch.Tensor:
        # the share of each class among recently accepted pseudo-labels; a class without any gets
        # half a count, so its log share stays finite (as the labeled prior does)
        counts = torch.where(self.pl_counts > 0, self.pl_counts, self.pl_counts.new_tensor(0.5))
        return (counts / counts.sum()).log().view(1, -1)

    @torch.no_grad()
    def step(self, labeled_features: torch.Tensor, labels: torch.Tensor, unlabeled_features: torch.Tensor,
             pl_targets: torch.Tensor, pl_mask: torch.Tensor) -> None:
        """One probe SGD step, the pseudo-label counts, then (after ``warmup``) one EM step.

        Args:
            labeled_features: B x D pre-logit features of the labeled batch (the teacher's).
            labels: B class indices.
            unlabeled_features: N x D pre-logit features of the weak unlabeled views.
            pl_targets: N pseudo-labels (DebiasPL's, after debiasing).
            pl_mask: N floats, 1 where the pseudo-label was accepted.
        """
        fl, fu = labeled_features.detach().float(), unlabeled_features.detach().float()
        for name, f in (("labeled_features", fl), ("unlabeled_features", fu)):
            if f.dim() != 2 or f.shape[1] != self.feature_dim:
                raise ValueError(f"{name} must be N x {self.feature_dim}, got {tuple(f.shape)}")
        mask = pl_mask.detach().float()
        onehot_u = torch.nn.functional.one_hot(pl_targets.long(), self.num_classes).float()
        batch_hist = (onehot_u * mask.unsqueeze(1)).sum(0)
        n_l, n_u = torch.tensor(float(fl.shape[0])), torch.tensor(float(fu.shape[0]))
        # logit-adjusted cross-entropy, closed form: d/dz CE(z + a, y) = softmax(z + a) - onehot(y)
        g_l = (torch.softmax(self.probe(fl) + self.labeled_log_prior, -1)
               - torch.nn.functional.one_hot(labels.long(), self.num_classes).float())
        g_u = (torch.softmax(self.probe(fu) + self.pseudo_label_log_prior(), -1) - onehot_u) * mask.unsqueeze(1)
        # sums here, divided by the (global) batch sizes below: the mean over all processes' rows
        grad_w = torch.cat([g_l.t() @ fl, self.lambda_u * (g_u.t() @ fu)]).view(2, self.num_classes, -1)
        grad_b = torch.stack([g_l.sum(0), self.lambda_u * g_u.sum(0)])
        em = torch.softmax(self.probe(fu) + self.prior.log(), -1).sum(0)
        stats = torch.cat([grad_w.flatten(), grad_b.flatten(), batch_hist, em,
                           torch.stack([n_l, n_u]).to(fl)])
        if self.sync and is_distributed():
            dist.all_reduce(stats)
        c, d = self.num_classes, self.feature_dim
        grad_w, rest = stats[:2 * c * d].view(2, c, d), stats[2 * c * d:]
        grad_b, batch_hist, em, (n_l, n_u) = rest[:2 * c].view(2, c), rest[2 * c:3 * c], rest[3 * c:4 * c], rest[4 * c:]
        rows = (n_l + n_u).clamp(min=1.0)
        gw = (grad_w[0] + grad_w[1]) / rows + self.weight_decay * self.weight
        gb = (grad_b[0] + grad_b[1]) / rows
        self.weight_velocity.mul_(self.probe_momentum).add_(gw)
        self.bias_velocity.mul_(self.probe_momentum).add_(gb)
        self.weight.sub_(self.lr * self.weight_velocity)
        self.bias.sub_(self.lr * self.bias_velocity)
        self.pl_counts.mul_(self.momentum).add_(batch_hist)
        self.accepted.add_(batch_hist.sum().round().long())
        # EM: only once the probe has trained a while (a fresh probe is uniform and would pull pi there)
        moved = self.prior * self.momentum + (em / n_u).view(1, -1) * (1.0 - self.momentum)
        moved = moved.clamp(min=self.min_share)
        moved = moved / moved.sum()
        self.prior.copy_(torch.where(self.steps >= self.warmup, moved, self.prior))
        self.steps.add_(1)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, feature_dim={self.feature_dim}, start={self.start}, "
                f"momentum={self.momentum}, warmup={self.warmup}, min_accepted={self.min_accepted}")
