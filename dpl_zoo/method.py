"""The DebiasPL core: class prior, debiased pseudo-labels, adaptive margin, losses.

Pure tensor code with no I/O and no knowledge of the training loop, so any loop
(ours, timm's, Lightning's) can call it. The order of operations follows the
authors' reference implementation (MIT licence):

1. pseudo-labels from the weak logits debiased with the prior *before* its update;
2. prior (qhat) update from the softmax of the raw weak logits;
3. adaptive margin on the strong logits with the prior *after* the update.

All log/softmax work is done in float32 so the module is safe under autocast.
With ``tau = 0`` every adjustment is skipped, so the result is FixMatch exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .distributed import is_distributed
from .threshold import THRESHOLD_MODES, SelfAdaptiveThreshold

Views = Union[torch.Tensor, Sequence[torch.Tensor]]

CLD_TEMPERATURE = 0.07


def _check_range(name: str, value: float, low: float, high: float, high_inclusive: bool = True) -> None:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    ok = numeric and (low <= value <= high if high_inclusive else low <= value < high)
    if not ok:
        bracket = "]" if high_inclusive else ")"
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {value!r}")


def _check_logits(name: str, logits: torch.Tensor, num_classes: Optional[int] = None) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"{name} must be a 2-D tensor (batch, classes), got {shape}")
    if num_classes is not None and logits.shape[1] != num_classes:
        raise ValueError(
            f"{name} has {logits.shape[1]} classes but the class prior has {num_classes}; "
            f"build the prior with num_classes={logits.shape[1]} or fix the model head")


def _as_views(name: str, views: Views) -> list[torch.Tensor]:
    out = [views] if isinstance(views, torch.Tensor) else list(views)
    if not out:
        raise ValueError(f"{name} must hold at least one view")
    for i, v in enumerate(out):
        _check_logits(f"{name}[{i}]", v)
    if any(v.shape != out[0].shape for v in out):
        raise ValueError(f"{name}: all views must have the same shape, got {[tuple(v.shape) for v in out]}")
    return out


class ClassPrior(nn.Module):
    """Running estimate ``qhat`` (1 x C) of the classifier's mean predicted distribution.

    Kept as a buffer so it travels in ``state_dict`` and checkpoints. Under
    ``torch.distributed`` the batch statistics are summed over processes before
    the update (``sync=True``), so every rank holds the same prior and it equals
    the single-process update on the concatenated batch.
    """

    qhat: torch.Tensor

    def __init__(self, num_classes: int, momentum: float = 0.999, masked: bool = False, sync: bool = True,
                 target: Optional[Sequence[float] | torch.Tensor] = None):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        _check_range("momentum", momentum, 0.0, 1.0, high_inclusive=False)
        self.num_classes = num_classes
        self.momentum = float(momentum)
        self.masked = masked
        self.sync = sync
        self.register_buffer("qhat", torch.full((1, num_classes), 1.0 / num_classes, dtype=torch.float32))
        self.register_buffer("target", torch.full((1, num_classes), 1.0 / num_classes, dtype=torch.float32))
        self.uniform_target = True
        if target is not None:
            self.set_target(target)

    def set_target(self, target: Sequence[float] | torch.Tensor) -> None:
        """The distribution ``p*`` to debias towards (normalised here); uniform is the paper's method."""
        t = torch.as_tensor(target, dtype=torch.float64).flatten()
        if t.numel() != self.num_classes or not bool(torch.isfinite(t).all()) or bool((t <= 0).any()):
            raise ValueError(f"target prior must hold {self.num_classes} positive numbers, got {t.tolist()}")
        self.target.copy_((t / t.sum()).float().view(1, -1))
        self.uniform_target = bool((t == t[0]).all())

    def follow(self, target: torch.Tensor) -> None:
        """Debias towards ``target`` (1 x C, normalised, positive) from now on, e.g. an estimate that
        moves every step; a tensor copy, no host sync, and never treated as uniform."""
        self.target.copy_(target.detach().view(1, -1).to(self.target))
        self.uniform_target = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.uniform_target = bool((self.target == self.target[0, 0]).all())

    def log_prior(self) -> torch.Tensor:
        return torch.log(self.qhat)

    def log_ratio(self) -> torch.Tensor:
        """``log qhat - log p*``: what the pseudo-labels and the margin are adjusted by. With a
        uniform ``p*`` it is ``log qhat`` itself (not shifted by a constant), so the method is
        the paper's bit for bit."""
        if self.uniform_target:
            return torch.log(self.qhat)
        return torch.log(self.qhat) - torch.log(self.target)

    @torch.no_grad()
    def update(self, probs: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """EMA step towards the batch mean of ``probs`` (N x C), over the batch dimension only.

        With ``masked`` the mean runs over rows whose ``mask`` is set; a batch with no
        such row (on every process) leaves the prior unchanged.
        """
        _check_logits("probs", probs, self.num_classes)
        probs = probs.detach().float()
        if self.masked:
            if mask is None:
                raise ValueError("mask is required when the prior is masked (masked_qhat=True)")
            if mask.shape != probs.shape[:1]:
                raise ValueError(f"mask must have shape ({probs.shape[0]},), got {tuple(mask.shape)}")
            weights = mask.detach().float().unsqueeze(1)
        else:
            weights = torch.ones_like(probs[:, :1])
        # One vector [sum of probs..., count] so a single all-reduce serves both.
        stats = torch.cat([(probs * weights).sum(0), weights.sum(0)])
        if self.sync and is_distributed():
            dist.all_reduce(stats)
        count = stats[-1]
        # no host sync: an empty (masked) batch keeps the old prior through torch.where
        batch_mean = (stats[:-1] / count.clamp(min=1.0)).unsqueeze(0).to(self.qhat)
        updated = self.qhat * self.momentum + batch_mean * (1.0 - self.momentum)
        self.qhat.copy_(torch.where(count > 0, updated, self.qhat))
        return self.qhat

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, momentum={self.momentum}, masked={self.masked}, "
                f"target={'uniform' if self.uniform_target else self.target.flatten().tolist()}")


def debiased_probs(weak_logits: torch.Tensor, log_prior: torch.Tensor, tau: float) -> torch.Tensor:
    """The counterfactual pseudo-label distribution ``softmax(lw - tau * log qhat)``, float32, detached."""
    _check_range("tau", tau, 0.0, math.inf)
    logits = weak_logits.detach().float()
    if tau != 0:
        logits = logits - tau * log_prior
    return torch.softmax(logits, dim=-1)


def debiased_pseudo_labels(
        weak_logits: torch.Tensor, log_prior: torch.Tensor, tau: float, threshold: Union[float, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Counterfactual pseudo-labels: ``p = softmax(lw - tau * log qhat)``.

    Gradients never flow back to the weak logits.

    Args:
        weak_logits: N x C.
        log_prior: 1 x C, ``log qhat`` (or ``log qhat - log p*``).
        tau: debiasing strength; 0 gives FixMatch's pseudo-labels.
        threshold: confidence a pseudo-label needs to be used: one number, or one per class
            (a C or 1 x C tensor, e.g. :class:`dpl_zoo.threshold.SelfAdaptiveThreshold`'s), applied
            to the pseudo-label's class.

    Returns:
        ``(probs, targets, mask)``: N x C probabilities, N class indices, and a float mask (1 where
        ``max p >= threshold``).
    """
    probs = debiased_probs(weak_logits, log_prior, tau)
    return (probs, *accepted(probs, threshold))


def accepted(probs: torch.Tensor, threshold: Union[float, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(targets, mask)`` of pseudo-label distributions ``probs`` (N x C): the argmax, and 1 where its
    probability reaches ``threshold`` (one number, or one per class applied to the argmax's class)."""
    if not isinstance(threshold, torch.Tensor):
        _check_range("threshold", threshold, 0.0, 1.0)
    max_probs, targets = probs.max(dim=-1)
    if isinstance(threshold, torch.Tensor):
        per_class = threshold.detach().flatten().to(probs)
        if per_class.numel() != probs.shape[1]:
            raise ValueError(f"threshold holds {per_class.numel()} values for {probs.shape[1]} classes")
        threshold = per_class[targets]
    return targets, max_probs.ge(threshold).float()


def adaptive_margin(strong_logits: torch.Tensor, log_prior: torch.Tensor, tau: float) -> torch.Tensor:
    """Logit-adjusted strong logits ``ls + tau * log qhat``: over-predicted classes get a larger margin.

    Args:
        strong_logits: N x C.
        log_prior: 1 x C, ``log qhat`` (or ``log qhat - log p*``).
        tau: margin strength; 0 returns the logits unchanged (in float32).

    Returns:
        The adjusted N x C logits, float32.
    """
    _check_range("tau", tau, 0.0, math.inf)
    logits = strong_logits.float()
    if tau != 0:
        logits = logits + tau * log_prior
    return logits


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over *all* samples of ``CE * mask``: masked samples count as zeros, as in FixMatch."""
    return (F.cross_entropy(logits, targets, reduction="none") * mask).mean()


def cld_loss(strong_logits: torch.Tensor, weak_logits: torch.Tensor, temperature: float = CLD_TEMPERATURE) -> torch.Tensor:
    """Cross-level instance-group discrimination in probability space.

    Groups come from the weak view; the reference implementation takes the *argmin*
    over classes as the group id. That looks unusual but it is what the published
    results used, so it is reproduced here. Empty groups get a count of 1 (a zero
    centroid) so the division is safe.
    """
    _check_logits("strong_logits", strong_logits)
    _check_logits("weak_logits", weak_logits, strong_logits.shape[1])
    ps = torch.softmax(strong_logits.float(), dim=-1)
    pw = torch.softmax(weak_logits.detach().float(), dim=-1)
    groups = pw.argmin(dim=-1)
    onehot = F.one_hot(groups, pw.shape[1]).float()
    counts = onehot.sum(0).clamp(min=1.0)
    centroids = (onehot.t() @ pw) / counts.unsqueeze(1)
    affinity = ps @ centroids.t() / temperature
    return F.cross_entropy(affinity, groups)


def clip_assisted_loss(
        strong_logits: torch.Tensor, mask: torch.Tensor, clip_targets: torch.Tensor,
        clip_confidence: torch.Tensor, clip_threshold: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CE against zero-shot teacher labels for samples the student's own mask rejected.

    Returns ``(loss, clip_mask)``; the loss is a mean over all unlabeled samples.
    """
    _check_range("clip_threshold", clip_threshold, 0.0, 1.0)
    n = strong_logits.shape[0]
    if clip_targets.shape != (n,) or clip_confidence.shape != (n,):
        raise ValueError(
            f"clip_targets and clip_confidence must have shape ({n},), got "
            f"{tuple(clip_targets.shape)} and {tuple(clip_confidence.shape)}")
    clip_mask = (1.0 - mask) * clip_confidence.float().ge(clip_threshold).float()
    return masked_cross_entropy(strong_logits, clip_targets.long(), clip_mask), clip_mask


@dataclass
class DebiasPLOutput:
    """Everything one step computed, for the optimiser and for logging."""
    loss: torch.Tensor
    loss_x: torch.Tensor
    loss_u: torch.Tensor
    loss_cld: torch.Tensor
    loss_clip: torch.Tensor
    targets: torch.Tensor          # pseudo-labels of the (averaged) weak view, N
    mask: torch.Tensor             # float, N: 1 where the pseudo-label was accepted
    mask_rate: torch.Tensor
    histogram: torch.Tensor        # class counts of accepted pseudo-labels, C
    qhat: torch.Tensor             # prior after this step's update, 1 x C
    clip_mask: Optional[torch.Tensor] = None

    def scalars(self) -> dict[str, float]:
        """Loss terms and mask rate as Python floats, for metric logs."""
        return {k: float(getattr(self, k)) for k in ("loss", "loss_x", "loss_u", "loss_cld", "loss_clip", "mask_rate")}


class DebiasPLLoss(nn.Module):
    """The whole DebiasPL objective for one step, single view or multiviews.

    ``loss = loss_x + lambda_u * loss_u + lambda_cld * loss_cld``. Pass one weak and
    one strong view, or two of each (multiviews: three target sets, from the mean
    of the weak views and from each view alone, times two strong views). The two
    components can be switched off or given their own temperature for ablations:
    ``debias=False`` or ``tau_pl=0`` removes the counterfactual pseudo-labels,
    ``margin=False`` or ``tau_margin=0`` the adaptive margin. ``tau=0`` is FixMatch, bit for bit.
    The class prior ``qhat`` is a buffer (``self.prior.qhat``), saved with ``state_dict()`` and
    all-reduced under ``torch.distributed``.

    Args:
        num_classes: C, at least 2.
        tau: debiasing strength of both components (the paper: 0.4 on ImageNet; 2 for transfer).
        threshold: confidence a (debiased) pseudo-label needs to be used.
        qhat_momentum: EMA momentum of ``qhat`` (0.999 on ImageNet; 0.99 for runs of ~1,000 steps).
        lambda_u: weight of the unlabeled loss.
        lambda_cld: weight of the CLD term (0: off).
        masked_qhat: update ``qhat`` from accepted pseudo-labels only.
        tau_pl: tau of the counterfactual pseudo-labels alone (default: ``tau``).
        tau_margin: tau of the adaptive margin alone (default: ``tau``).
        debias: False removes the counterfactual pseudo-labels.
        margin: False removes the adaptive margin.
        clip_threshold: CLIP confidence that lets CLIP's label back up a rejected pseudo-label.
        sync_qhat: all-reduce the prior's batch statistics under ``torch.distributed``.
        target_prior: C positive numbers to debias towards instead of uniform
            (``log qhat - log p*`` replaces ``log qhat`` in both adjustments).
        threshold_mode: ``fixed`` (``threshold``, the paper) or ``self_adaptive`` (FreeMatch's
            per-class thresholds on the debiased pseudo-labels, :mod:`dpl_zoo.threshold`;
            ``threshold`` is then unused).
        threshold_momentum: EMA momentum of the self-adaptive thresholds (FreeMatch: 0.999).

    Raises:
        ValueError: a setting out of range (negative tau, a threshold outside [0, 1], ...).

    Example:
        ```python
        criterion = DebiasPLLoss(num_classes=10, tau=0.4, threshold=0.95)
        out = criterion(weak_logits, strong_logits, labeled_logits, labels)
        out.loss.backward()
        ```
    """

    def __init__(
            self,
            num_classes: int,
            tau: float = 0.4,
            threshold: float = 0.95,
            qhat_momentum: float = 0.999,
            lambda_u: float = 1.0,
            lambda_cld: float = 0.0,
            masked_qhat: bool = False,
            tau_pl: Optional[float] = None,
            tau_margin: Optional[float] = None,
            debias: bool = True,
            margin: bool = True,
            clip_threshold: float = 0.4,
            sync_qhat: bool = True,
            target_prior: Optional[Sequence[float] | torch.Tensor] = None,
            threshold_mode: str = "fixed",
            threshold_momentum: float = 0.999,
    ):
        super().__init__()
        _check_range("tau", tau, 0.0, math.inf)
        for name, value in (("tau_pl", tau_pl), ("tau_margin", tau_margin)):
            if value is not None:
                _check_range(name, value, 0.0, math.inf)
        _check_range("threshold", threshold, 0.0, 1.0)
        _check_range("clip_threshold", clip_threshold, 0.0, 1.0)
        _check_range("lambda_u", lambda_u, 0.0, math.inf)
        _check_range("lambda_cld", lambda_cld, 0.0, math.inf)
        if threshold_mode not in THRESHOLD_MODES:
            raise ValueError(f"threshold_mode must be one of {', '.join(THRESHOLD_MODES)}, got {threshold_mode!r}")
        self.prior = ClassPrior(num_classes, momentum=qhat_momentum, masked=masked_qhat, sync=sync_qhat,
                                target=target_prior)
        self.adaptive: Optional[SelfAdaptiveThreshold] = (
            SelfAdaptiveThreshold(num_classes, threshold_momentum, sync=sync_qhat)
            if threshold_mode == "self_adaptive" else None)
        self.tau_pl = (tau if tau_pl is None else tau_pl) if debias else 0.0
        self.tau_margin = (tau if tau_margin is None else tau_margin) if margin else 0.0
        self.threshold = threshold
        self.lambda_u = lambda_u
        self.lambda_cld = lambda_cld
        self.clip_threshold = clip_threshold

    @property
    def num_classes(self) -> int:
        return self.prior.num_classes

    def current_threshold(self) -> Union[float, torch.Tensor]:
        """The threshold the next pseudo-labels face: the fixed number, or the self-adaptive
        per-class thresholds (1 x C) as they stand, for diagnostics outside the step."""
        return self.threshold if self.adaptive is None else self.adaptive.thresholds().detach()

    def forward(
            self,
            weak_logits: Views,
            strong_logits: Views,
            labeled_logits: Optional[torch.Tensor] = None,
            labels: Optional[torch.Tensor] = None,
            clip_targets: Optional[torch.Tensor] = None,
            clip_confidence: Optional[torch.Tensor] = None,
    ) -> DebiasPLOutput:
        """One step's loss; updates ``qhat`` from the weak logits.

        Args:
            weak_logits: N x C logits of the weak views (the teacher's, or the student's; never
                back-propagated), or a list of two for multiviews.
            strong_logits: N x C logits of the strong views, the same number of views.
            labeled_logits: the labeled batch's logits (with ``labels``), for ``loss_x``.
            labels: the labeled batch's class indices.
            clip_targets: N zero-shot teacher labels, for the CLIP-assisted term.
            clip_confidence: N teacher confidences, with ``clip_targets``.

        Returns:
            The loss and its terms, the pseudo-labels, their mask and class histogram, and
            ``qhat`` after the update.

        Raises:
            ValueError: views of different shapes or counts, a wrong class count, ``labels``
                without ``labeled_logits`` (or the reverse).
        """
        weak = _as_views("weak_logits", weak_logits)
        strong = _as_views("strong_logits", strong_logits)
        if len(weak) != len(strong) or len(weak) not in (1, 2):
            raise ValueError(
                f"pass one weak and one strong view, or two of each (multiviews); "
                f"got {len(weak)} weak and {len(strong)} strong")
        if weak[0].shape != strong[0].shape:
            raise ValueError(
                f"weak_logits and strong_logits must have the same shape, "
                f"got {tuple(weak[0].shape)} and {tuple(strong[0].shape)}")
        _check_logits("weak_logits", weak[0], self.num_classes)
        if (labeled_logits is None) != (labels is None):
            raise ValueError("labeled_logits and labels go together: pass both or neither")
        if (clip_targets is None) != (clip_confidence is None):
            raise ValueError("clip_targets and clip_confidence go together: pass both or neither")

        weak = [w.detach().float() for w in weak]
        multiview = len(weak) == 2
        weak_mean = (weak[0] + weak[1]) / 2 if multiview else weak[0]

        # 1. pseudo-labels with the prior from before this step's update
        log_prior = self.prior.log_ratio()
        threshold: Union[float, torch.Tensor] = self.threshold
        if self.adaptive is None:
            _, targets, mask = debiased_pseudo_labels(weak_mean, log_prior, self.tau_pl, threshold)
        else:
            # FreeMatch's order: the thresholds take this batch's statistics, then gate it
            probs = debiased_probs(weak_mean, log_prior, self.tau_pl)
            threshold = self.adaptive.update(probs)
            targets, mask = accepted(probs, threshold)
        target_sets = [(targets, mask)]
        if multiview:
            for w in weak:
                _, t, m = debiased_pseudo_labels(w, log_prior, self.tau_pl, threshold)
                target_sets.append((t, m))

        # 2. prior update from the raw (not debiased) weak distribution
        self.prior.update(torch.softmax(weak_mean, dim=-1), mask)

        # 3. adaptive margin with the updated prior
        log_prior = self.prior.log_ratio()
        strong_adj = [adaptive_margin(s, log_prior, self.tau_margin) for s in strong]
        loss_u = torch.stack([
            masked_cross_entropy(s, t, m) for t, m in target_sets for s in strong_adj
        ]).mean()

        zero = strong_adj[0].new_zeros(())
        loss_clip, clip_mask = zero, None
        if clip_targets is not None:
            terms = [clip_assisted_loss(s, mask, clip_targets, clip_confidence, self.clip_threshold)
                     for s in strong_adj]
            loss_clip = torch.stack([t[0] for t in terms]).mean()
            clip_mask = terms[0][1]
            loss_u = (loss_u + loss_clip) / 2

        loss_cld = zero
        if self.lambda_cld > 0:
            if multiview:
                # reference: both views averaged, strong logits *without* the margin
                loss_cld = cld_loss((strong[0].float() + strong[1].float()) / 2, weak_mean)
            else:
                # reference: single-view mode passes the margin-adjusted strong logits
                loss_cld = cld_loss(strong_adj[0], weak_mean)

        loss_x = zero
        if labeled_logits is not None:
            _check_logits("labeled_logits", labeled_logits, self.num_classes)
            if labels.shape != labeled_logits.shape[:1]:
                raise ValueError(
                    f"labels must have shape ({labeled_logits.shape[0]},), got {tuple(labels.shape)}")
            loss_x = F.cross_entropy(labeled_logits.float(), labels)

        loss = loss_x + self.lambda_u * loss_u + self.lambda_cld * loss_cld
        return DebiasPLOutput(
            loss=loss, loss_x=loss_x.detach(), loss_u=loss_u.detach(), loss_cld=loss_cld.detach(),
            loss_clip=loss_clip.detach(), targets=targets, mask=mask, mask_rate=mask.mean(),
            # scatter_add, not bincount: bincount sizes its output from the data, a host sync on CUDA
            histogram=mask.new_zeros(self.num_classes).scatter_add_(0, targets, mask).long(),
            qhat=self.prior.qhat.detach().clone(), clip_mask=clip_mask,
        )

    def extra_repr(self) -> str:
        threshold = "self_adaptive" if self.adaptive is not None else self.threshold
        return (f"tau_pl={self.tau_pl}, tau_margin={self.tau_margin}, threshold={threshold}, "
                f"lambda_u={self.lambda_u}, lambda_cld={self.lambda_cld}")
