"""Training steps as timm ``TrainingTask``s: DebiasPL (student, EMAN teacher and the method core in one
module) and MoCo v2 with EMAN (self-supervised pretraining, :class:`MoCoTask`).

The task owns the forward passes of one semi-supervised step (student on labeled + strong views, teacher on weak views),
hands the logits to :class:`~dpl_zoo.method.DebiasPLLoss`, and keeps ``qhat`` as
task state so timm-style checkpoints carry it (``get_task_state``).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.task import TrainingTask
from timm.utils.model import unwrap_model

from .method import DebiasPLLoss, DebiasPLOutput
from .prior_estimate import PriorEstimator


def classifier_of(model: nn.Module) -> nn.Linear:
    """The linear classifier whose input (pre-logit features) the prior estimate reads."""
    model = unwrap_model(model)
    if isinstance(model, nn.Linear):   # a frozen backbone's cached pooled features: the head is the model
        return model
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(classifier, nn.Linear):
        raise ValueError(f"dpl.target_prior: estimated reads the features going into the model's linear "
                         f"classifier; {type(model).__name__}'s get_classifier() gives "
                         f"{type(classifier).__name__}: use a timm model with a linear head, or a fixed target_prior")
    return classifier


class DebiasPLTask(TrainingTask):
    """One step of DebiasPL / FixMatch / supervised training.

    ``method="supervised"`` uses only the labeled batch; ``fixmatch`` is the same
    code with ``tau = 0`` in the criterion. With ``ema_decay`` set, an EMAN teacher
    (timm ``ModelEmaV3``: parameters and BatchNorm statistics averaged) makes the
    pseudo-labels and stays in eval mode; otherwise (or with ``ema_pseudo_labels=False``,
    which keeps the average for evaluation only, as FixMatch and USB do) the student's own
    weak-view logits, detached, do. ``qhat`` and the target prior are task state
    (``get_task_state`` / ``load_task_state``), so timm-style checkpoints carry them.

    Args:
        model: the student, a timm model (its head sized for your classes).
        criterion: the `DebiasPLLoss` (moved to ``device``).
        method: ``debiaspl``, ``fixmatch`` or ``supervised``.
        ema_decay: the EMAN teacher's decay; None: no teacher.
        ema_pseudo_labels: False: the student makes the pseudo-labels and the EMA model (with
            ``ema_decay``) is only evaluated.
        multiviews: two weak and two strong views per unlabeled image.
        device: where the criterion's buffers go (the logits' device).
        ema_warmup: ramp the EMA decay up, as timm's ``--model-ema-warmup`` does (short runs).
        prior_estimator: estimate the unlabeled prior and debias towards it
            (:class:`~dpl_zoo.prior_estimate.PriorEstimator`); it reads the pre-logit features of the
            model that makes the pseudo-labels, on the labeled batch and the (first) weak view.

    Example:
        ```python
        task = DebiasPLTask(model, DebiasPLLoss(10, tau=2.0), ema_decay=0.999, ema_warmup=True)
        loss = task(x, y, [weak, strong])["loss"]      # labeled batch, then the unlabeled views
        loss.backward(); optimizer.step(); task.update_ema()
        ```
    """

    def __init__(self, model: nn.Module, criterion: DebiasPLLoss, method: str = "debiaspl",
                 ema_decay: Optional[float] = 0.999, multiviews: bool = False,
                 device: Optional[torch.device] = None, ema_warmup: bool = False,
                 prior_estimator: Optional[PriorEstimator] = None, ema_pseudo_labels: bool = True):
        super().__init__(device=device, verbose=False)
        self.trainable_module = model
        # the criterion's buffers (qhat, the target prior) must sit where the logits are
        self.criterion = criterion.to(device) if device is not None else criterion
        self.method = method
        self.ema_pseudo_labels = ema_pseudo_labels
        self.weak_views = 2 if multiviews else 1
        self._ema_slots, self._ema_slots_key = [], None
        if ema_decay is not None:
            # warm-up (timm's): the decay starts low and rises to ema_decay, so in a short run the
            # teacher follows the student instead of staying near its random new head
            self.setup_ema(decay=ema_decay, use_warmup=ema_warmup)
        self.prior_estimator = prior_estimator
        self._capture, self._features = False, None
        if prior_estimator is not None:
            if method == "supervised":
                raise ValueError("a prior estimate needs pseudo-labels: method supervised has none")
            if device is not None:
                self.prior_estimator.to(device)
            # after setup_ema: the teacher is a copy, and a hook on the student would be copied with it
            classifier_of(self.teacher()).register_forward_hook(self._keep_features)

    def _keep_features(self, module, inputs, output) -> None:
        if self._capture:
            self._features = inputs[0].detach()

    def prepare_distributed(self, device_ids: Optional[list] = None, **ddp_kwargs) -> "DebiasPLTask":
        """Wrap the student in DistributedDataParallel; the teacher stays unwrapped (no gradients)."""
        from torch.nn.parallel import DistributedDataParallel as DDP
        self.trainable_module = DDP(self.trainable_module, device_ids=device_ids, **ddp_kwargs)
        return self

    def train(self, mode: bool = True) -> "DebiasPLTask":
        super().train(mode)
        if self.has_ema():
            self.get_trainable_module(ema=True).module.eval()  # the teacher always runs in eval mode
        return self

    def update_ema(self, step: Optional[int] = None) -> None:
        """The EMAN teacher's update: timm's ``ModelEmaV3.update`` (same decay schedule, one foreach
        lerp over the floating-point parameters and buffers, integer buffers copied), with the
        tensor pairs found once instead of by two ``state_dict()`` walks per step, and the integer
        buffers copied in one foreach call instead of one copy each. On a GPU the step waits for
        this host work: a ResNet-50 update took 7.3 ms of host time beyond the lerp itself on the
        2-core CPU here, 1.1 ms after (medians of 30).
        Other EMA settings (another device, parameters only, no foreach) go through timm's own."""
        if not self.has_ema():
            return
        ema = self.get_trainable_module(ema=True)
        student = unwrap_model(self.get_trainable_module())
        if not (getattr(ema, "foreach", False) and not getattr(ema, "exclude_buffers", False)
                and getattr(ema, "device", None) is None and getattr(ema, "dtype", None) is None):
            ema.update(student, step=step)
            return
        key = (id(ema.module), id(student))
        if self._ema_slots_key != key:
            self._ema_slots = _ema_slots(ema.module, student)
            self._ema_slots_key = key
        floats_e, floats_s, ints_e, ints_s = [], [], [], []
        for mod_e, mod_s, table, name in self._ema_slots:   # current tensors: .to() swaps buffers
            t_e, t_s = getattr(mod_e, table)[name], getattr(mod_s, table)[name]
            if t_e.is_floating_point():
                floats_e.append(t_e)
                floats_s.append(t_s)
            else:
                ints_e.append(t_e)
                ints_s.append(t_s)
        weight = 1.0 - ema.get_decay(step)
        with torch.no_grad():
            if floats_e:
                lerp = getattr(ema, "_foreach_lerp_", None)   # timm's: stochastic rounding, mixed dtypes
                if lerp is not None:
                    lerp(floats_e, floats_s, weight)
                else:
                    torch._foreach_lerp_(floats_e, floats_s, weight=weight)
            if ints_e:
                torch._foreach_copy_(ints_e, ints_s)

    def compile_criterion(self, **compile_kwargs) -> "DebiasPLTask":
        """``torch.compile`` the criterion in place (its few element-wise operations fused into
        fewer kernels); its state_dict keys, ``qhat`` buffer and outputs stay as they are."""
        self.criterion.compile(**compile_kwargs)
        return self

    def teacher(self) -> nn.Module:
        """The model that makes pseudo-labels: the EMA teacher, else the student."""
        return self.averaged() if self._ema_teaches() else unwrap_model(self.trainable_module)

    def averaged(self) -> Optional[nn.Module]:
        """The EMA of the student (evaluated beside it), or None without one."""
        return self.get_trainable_module(ema=True).module if self.has_ema() else None

    def _ema_teaches(self) -> bool:
        return self.has_ema() and self.ema_pseudo_labels

    def forward(self, x: torch.Tensor, y: torch.Tensor, unlabeled: Sequence[torch.Tensor] = (),
                clip_targets: Optional[torch.Tensor] = None,
                clip_confidence: Optional[torch.Tensor] = None) -> Dict[str, Any]:
        student = self.trainable_module
        if self.method == "supervised":
            logits_x = student(x)
            loss = F.cross_entropy(logits_x.float(), y)
            return {"loss": loss, "output": logits_x, "result": None}
        if len(unlabeled) != 2 * self.weak_views:
            raise ValueError(f"expected {self.weak_views} weak and {self.weak_views} strong views, got {len(unlabeled)} tensors")
        weak, strong = list(unlabeled[:self.weak_views]), list(unlabeled[self.weak_views:])
        n, nu = x.shape[0], weak[0].shape[0]
        estimating = self.prior_estimator is not None
        if self._ema_teaches():
            logits = student(torch.cat([x, *strong]))
            with torch.no_grad():
                self._capture = estimating
                # the estimate also reads the teacher's features of the labeled batch
                teacher_in = torch.cat([x, *weak]) if estimating else torch.cat(weak)
                weak_logits = self.teacher()(teacher_in)[n if estimating else 0:].split(nu)
                self._capture = False
        else:
            # one forward over everything, as FixMatch does, so BatchNorm sees the whole batch
            self._capture = estimating
            logits = student(torch.cat([x, *weak, *strong]))
            self._capture = False
            weak_logits = logits[n:n + nu * self.weak_views].detach().split(nu)
            logits = torch.cat([logits[:n], logits[n + nu * self.weak_views:]])
        logits_x, strong_logits = logits[:n], logits[n:].split(nu)
        result: DebiasPLOutput = self.criterion(list(weak_logits), list(strong_logits), logits_x, y,
                                                clip_targets=clip_targets, clip_confidence=clip_confidence)
        if estimating:
            features, self._features = self._features, None
            self.prior_estimator.step(features[:n], y, features[n:n + nu], result.targets, result.mask)
            # the next step debiases towards the new estimate (the start prior until it is formed)
            self.criterion.prior.follow(self.prior_estimator.target())
        return {"loss": result.loss, "output": logits_x, "result": result}

    def get_task_state(self, module: Optional[nn.Module] = None, ema: bool = False) -> Dict[str, Any]:
        prior = self.criterion.prior
        state = {"qhat": prior.qhat.detach().cpu().clone(), "target_prior": prior.target.detach().cpu().clone()}
        if self.prior_estimator is not None:
            state["prior_estimate"] = {k: v.detach().cpu().clone() for k, v in self.prior_estimator.state_dict().items()}
        if self.criterion.adaptive is not None:
            state["threshold"] = {k: v.detach().cpu().clone() for k, v in self.criterion.adaptive.state_dict().items()}
        return state

    def load_task_state(self, state: Optional[Dict[str, Any]], strict: bool = True,
                        module: Optional[nn.Module] = None, ema: bool = False) -> None:
        if not state:
            if strict:
                raise ValueError("checkpoint has no DebiasPL task state (qhat)")
            return
        qhat = state["qhat"]
        if qhat.shape != self.criterion.prior.qhat.shape:
            raise ValueError(f"checkpoint qhat has shape {tuple(qhat.shape)}, this run needs "
                             f"{tuple(self.criterion.prior.qhat.shape)}: the checkpoint is for another class count")
        self.criterion.prior.qhat.copy_(qhat)
        if "target_prior" in state:  # checkpoints before the target prior existed debiased towards uniform
            self.criterion.prior.set_target(state["target_prior"].flatten())
        if self.prior_estimator is not None:
            if "prior_estimate" not in state:
                raise ValueError("checkpoint has no prior estimate: it was trained with a fixed dpl.target_prior, "
                                 "this run estimates it; resume with the run's own target_prior")
            self.prior_estimator.load_state_dict(state["prior_estimate"])
            self.criterion.prior.follow(self.prior_estimator.target())
        if self.criterion.adaptive is not None:
            if "threshold" not in state:
                raise ValueError("checkpoint has no self-adaptive threshold: it was trained with dpl.threshold_mode "
                                 "fixed; resume with the run's own threshold_mode")
            self.criterion.adaptive.load_state_dict(state["threshold"])


def _ema_slots(ema_module: nn.Module, student: nn.Module) -> list[tuple[nn.Module, nn.Module, str, str]]:
    """Where each teacher tensor and its student tensor live, in ``state_dict`` order (the
    pairing of timm's ModelEmaV3): parameters, then persistent buffers, module by module."""
    slots = []
    for mod_e, mod_s in zip(ema_module.modules(), student.modules()):
        for name, value in mod_e._parameters.items():
            if value is not None:
                slots.append((mod_e, mod_s, "_parameters", name))
        for name, value in mod_e._buffers.items():
            if value is not None and name not in mod_e._non_persistent_buffers_set:
                slots.append((mod_e, mod_s, "_buffers", name))
    return slots


class MoCoTask(TrainingTask):
    """One step of MoCo v2 with EMAN as a timm ``TrainingTask``.

    The query encoder (:class:`~dpl_zoo.moco.MoCoEncoder`) is the trainable module; the key
    encoder is its timm ``ModelEmaV3`` copy, which averages parameters *and* buffers (BatchNorm
    running statistics; the batch counter is copied), i.e. EMAN, and always runs in eval mode, so a
    key depends on its image only. ``forward(query_view, key_view)`` computes the InfoNCE loss
    against the queue, then enqueues the batch's keys; call :meth:`update_ema` after the
    optimiser step (MoCo updates the key encoder before computing keys: the same sequence).
    The queue is task state (``get_task_state``), saved with checkpoints.
    """

    def __init__(self, encoder: nn.Module, queue_size: int = 65536, dim: int = 128, temperature: float = 0.2,
                 momentum: float = 0.999, device: Optional[torch.device] = None,
                 generator: Optional[torch.Generator] = None):
        from .moco import KeyQueue
        super().__init__(device=device, verbose=False)
        self.trainable_module = encoder
        self.temperature = temperature
        self.queue = KeyQueue(queue_size, dim, generator=generator)
        if device is not None:
            self.queue.to(device)
        self.setup_ema(decay=momentum)

    def key_encoder(self) -> nn.Module:
        return self.get_trainable_module(ema=True).module

    def train(self, mode: bool = True) -> "MoCoTask":
        super().train(mode)
        self.key_encoder().eval()   # EMAN: the key encoder uses its averaged statistics
        return self

    def forward(self, query_view: torch.Tensor, key_view: torch.Tensor) -> Dict[str, Any]:
        from .moco import moco_loss
        q = self.trainable_module(query_view)
        with torch.no_grad():
            k = self.key_encoder()(key_view)
        loss, logits = moco_loss(q, k, self.queue.snapshot(), self.temperature)
        self.queue.enqueue(k)
        # how often the positive is the most similar key: a cheap sign that training works
        instance_acc = (logits.detach().argmax(1) == 0).float().mean()
        return {"loss": loss, "output": logits, "instance_acc": instance_acc}

    def get_task_state(self, module: Optional[nn.Module] = None, ema: bool = False) -> Dict[str, Any]:
        return {"queue": self.queue.keys.detach().cpu().clone(), "queue_ptr": self.queue.ptr.detach().cpu().clone()}

    def load_task_state(self, state: Optional[Dict[str, Any]], strict: bool = True,
                        module: Optional[nn.Module] = None, ema: bool = False) -> None:
        if not state or "queue" not in state:
            if strict:
                raise ValueError("checkpoint has no MoCo task state (the queue of keys)")
            return
        if state["queue"].shape != self.queue.keys.shape:
            raise ValueError(f"checkpoint queue has shape {tuple(state['queue'].shape)}, this run needs "
                             f"{tuple(self.queue.keys.shape)} (moco.queue_size x moco.dim)")
        self.queue.keys.copy_(state["queue"])
        self.queue.ptr.copy_(state["queue_ptr"])
