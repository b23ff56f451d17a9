"""Optimiser and lr schedule of a run, from timm's factories.

Transfer learning wants the new head to learn faster than the pretrained layers
(``backbone_lr_scale``: every parameter outside the classifier at that fraction of ``lr``,
as TLlib's ``--finetune`` does with 0.1). The scale rides on timm's own parameter groups
(weight-decay filtering or layer-wise decay) as ``lr_scale``, which timm's schedulers apply,
so it composes with ``layer_decay`` and every timm optimiser. Frozen parameters
(``requires_grad`` off) are in no group.
"""
from __future__ import annotations

from typing import Optional

import torch.nn as nn


def classifier_parameter_ids(model: nn.Module) -> set[int]:
    """The new head's parameters: timm's ``get_classifier()`` (the layer a new class count replaces)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Module):
        raise ValueError(f"{type(model).__name__} has no get_classifier(); backbone_lr_scale needs a timm model")
    return {id(p) for p in head.parameters()}


def param_groups(model: nn.Module, weight_decay: float, filter_bias_and_bn: bool = True,
                 layer_decay: Optional[float] = None, backbone_lr_scale: Optional[float] = None) -> list[dict]:
    """timm's parameter groups for ``model``, with the backbone's ``lr_scale`` multiplied by
    ``backbone_lr_scale`` (each group split into its classifier and backbone parts). timm's
    schedulers apply ``lr_scale``; frozen parameters are in no group.

    Args:
        model: a timm model (``get_classifier()`` names the new head).
        weight_decay: the decay of the decayed groups.
        filter_bias_and_bn: no decay on biases and normalisation layers (timm's default).
        layer_decay: layer-wise lr decay (timm's ``param_groups_layer_decay``), e.g. for ViTs.
        backbone_lr_scale: the lr of everything outside the classifier as a fraction of ``lr``
            (0.1: the pretrained layers learn ten times slower than the new head).

    Returns:
        Parameter groups for ``timm.optim.create_optimizer_v2`` or any torch optimiser.

    Raises:
        ValueError: ``backbone_lr_scale`` with a model that has no ``get_classifier()``.

    Example:
        ```python
        groups = param_groups(model, weight_decay=5e-4, backbone_lr_scale=0.1)
        optimizer = timm.optim.create_optimizer_v2(groups, "momentum", lr=0.01)
        ```
    """
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay
    no_decay = getattr(model, "no_weight_decay", lambda: set())()
    if layer_decay is not None:
        groups = param_groups_layer_decay(model, weight_decay=weight_decay, layer_decay=layer_decay,
                                          no_weight_decay_list=no_decay)
    elif filter_bias_and_bn and weight_decay:
        groups = param_groups_weight_decay(model, weight_decay=weight_decay, no_weight_decay_list=no_decay)
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    if backbone_lr_scale is None:
        return groups
    head = classifier_parameter_ids(model)
    out = []
    for group in groups:
        params = list(group["params"])
        settings = {k: v for k, v in group.items() if k != "params"}
        head_part = [p for p in params if id(p) in head]
        body_part = [p for p in params if id(p) not in head]
        if head_part:
            out.append({**settings, "params": head_part})
        if body_part:
            out.append({**settings, "params": body_part,
                        "lr_scale": settings.get("lr_scale", 1.0) * backbone_lr_scale})
    return out


def build_optimization(cfg, model: nn.Module, steps_per_epoch: int):
    """timm optimiser + per-update lr schedule for ``cfg`` (a ``TrainConfig`` or ``PretrainConfig``). The schedule is
    applied once at update 0, so the first step already runs at the scheduled, scaled lr."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    # a pretraining config (PretrainConfig) has neither layer decay nor a new classifier
    groups = param_groups(model, cfg.weight_decay, cfg.filter_bias_and_bn, getattr(cfg, "layer_decay", None),
                          getattr(cfg, "backbone_lr_scale", None))
    if not any(group["params"] for group in groups):
        raise ValueError("no parameter of the model is trainable: freeze leaves nothing to train")
    optimizer = create_optimizer_v2(groups, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                    momentum=cfg.momentum)
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
    return optimizer, scheduler


def build_scheduler(cfg, optimizer, steps_per_epoch: int, position: int = 0):
    """The per-update schedule of ``cfg`` for ``cfg.epochs`` epochs, set to update ``position``.

    A resume rebuilds it from the current config and restores only its position: timm's
    scheduler state holds its length, so restoring it would keep an old ``epochs``.
    """
    from timm.scheduler import create_scheduler_v2
    scheduler, _ = create_scheduler_v2(optimizer, sched=cfg.sched, num_epochs=cfg.epochs,
                                       warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr,
                                       step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    scheduler.step_update(num_updates=position)
    return scheduler
