"""What a run freezes, and the trainable rest of a model that runs on cached features.

``freeze: N`` freezes the first ``N`` of timm's coarse parameter groups (the grouping
``layer_decay`` uses: the stem, then one group per stage, the head last), so ``freeze: 1`` is
the stem and ``freeze: 3`` on a ResNet is stem + layer1 + layer2. ``freeze: backbone`` freezes
everything but the classifier. Freezing uses timm's ``freeze``: parameters stop taking
gradients and BatchNorm layers become ``FrozenBatchNorm2d`` (running statistics fixed), so a
frozen part computes the same function in training and evaluation, which is what lets its
output be cached (:mod:`dpl_zoo.view_cache`), unless it draws stochastic depth or dropout: that
is refused with cached views. Parameters timm's module-wise freeze cannot reach (a ViT's
``cls_token`` and ``pos_embed``) are frozen one by one.

With cached features the training step runs only the trainable rest (:func:`split_for_cache`),
built from the model's own modules, so training it trains the model; the EMA teacher copies
that rest alone, never the frozen backbone.
"""
from __future__ import annotations

import copy
from typing import Callable, Union

import torch
import torch.nn as nn

FreezeSpec = Union[None, int, str]


class FreezeError(ValueError):
    """A freeze setting this model cannot take; the message says what to use instead."""


def coarse_groups(model: nn.Module) -> list[list[str]]:
    """Parameter names per timm coarse group, in forward order (stem first, head last)."""
    from timm.models import group_parameters
    if not hasattr(model, "group_matcher"):
        raise FreezeError(f"{type(model).__name__} has no timm group_matcher; use freeze: backbone")
    groups = group_parameters(model, model.group_matcher(coarse=True))
    return [groups[k] for k in sorted(groups)]


def frozen_parameter_names(model: nn.Module, spec: FreezeSpec) -> list[str]:
    if spec is None:
        return []
    if spec == "backbone":
        head = {id(p) for p in model.get_classifier().parameters()}
        return [n for n, p in model.named_parameters() if id(p) not in head]
    groups = coarse_groups(model)
    if not isinstance(spec, int) or isinstance(spec, bool) or not 0 <= spec < len(groups):
        raise FreezeError(f"freeze must be backbone or a number of stages 0..{len(groups) - 1} for "
                          f"{type(model).__name__} (its {len(groups)} timm groups: stem, stages, head), got {spec!r}")
    return [name for group in groups[:spec] for name in group]


def _maximal_modules(model: nn.Module, names: set[str]) -> list[str]:
    """The fewest modules whose parameters are exactly within ``names`` (timm freezes by module)."""
    out: list[str] = []

    def visit(prefix: str, module: nn.Module) -> None:
        own = [prefix + n for n, _ in module.named_parameters()]
        if own and all(n in names for n in own):
            out.append(prefix.rstrip("."))
            return
        for child_name, child in module.named_children():
            visit(f"{prefix}{child_name}.", child)

    visit("", model)
    return out


def freeze(model: nn.Module, spec: FreezeSpec) -> list[str]:
    """Freeze part of ``model`` in place with timm's ``freeze``: parameters stop taking gradients
    and BatchNorm layers become frozen ones (running statistics fixed).

    Args:
        model: a timm model.
        spec: ``"backbone"`` (everything but the classifier), ``N`` (timm's first ``N`` coarse
            parameter groups: the stem, then stages), or None (nothing).

    Returns:
        The names of the frozen modules.

    Raises:
        FreezeError: ``N`` outside the model's groups, a model without timm's ``group_matcher``
            (use ``"backbone"``), or a spec that would freeze the head too.

    Example:
        ```python
        model = timm.create_model("resnet50", num_classes=10)
        freeze(model, 4)              # the stem and layer1..layer3; layer4 and the head train
        ```
    """
    names = set(frozen_parameter_names(model, spec))
    if not names:
        return []
    from timm.utils.model import freeze as timm_freeze
    modules = _maximal_modules(model, names)
    if "" in modules:
        raise FreezeError("freeze would freeze the whole model, head included; nothing would be trained")
    timm_freeze(model, modules)
    # timm freezes whole modules: parameters of a module that keeps trainable ones too (a ViT's
    # cls_token and pos_embed sit on the model itself, beside its head) are frozen one by one
    for name, p in model.named_parameters():
        if name in names:
            p.requires_grad_(False)
    return modules


def exportable(model: nn.Module) -> nn.Module:
    """A copy with frozen BatchNorm layers turned back into plain ones (same values), so the
    export is an ordinary timm model."""
    from timm.layers import FrozenBatchNormAct2d
    from timm.utils.model import unfreeze_batch_norm_2d
    from torchvision.ops.misc import FrozenBatchNorm2d
    if not any(isinstance(m, (FrozenBatchNorm2d, FrozenBatchNormAct2d)) for m in model.modules()):
        return model
    out = unfreeze_batch_norm_2d(copy.deepcopy(model))
    for p in out.parameters():
        p.requires_grad_(True)
    return out


# --- the trainable rest of a model, for cached features ---------------------------------------

class _Tail(nn.Module):
    """Stages after the cached cut, the feature head and pooling, then the head's dropout
    (``drop_rate``, as timm's ``forward_head`` applies it in training) and the classifier. Holds
    the model's own modules (shared, not copied)."""

    def __init__(self, stages: list[nn.Module], head: list[nn.Module], drop_rate: float = 0.0):
        super().__init__()
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(*head)
        self.drop_rate = drop_rate

    def get_classifier(self) -> nn.Module:
        """The model's classifier, as timm models name it (hooks and probes find it the same way)."""
        return self.head[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(x)
        for module in self.head[:-1]:
            x = module(x)
        classifier = self.head[-1]
        if self.drop_rate:   # in the classifier's mode: the tail follows model.train() / .eval() too
            x = nn.functional.dropout(x, p=self.drop_rate, training=classifier.training)
        return classifier(x)


def _efficientnet_split(model, start: int):
    """timm EfficientNet / EfficientNet-Lite: stem, ``blocks[0..6]``, conv_head + bn2, pool, classifier."""
    def prefix(x):
        return model.blocks[:start](model.bn1(model.conv_stem(x)))
    return prefix, _Tail(list(model.blocks[start:]), [model.conv_head, model.bn2, model.global_pool,
                                                     model.classifier], _head_drop_rate(model))


def _resnet_split(model, start: int):
    """timm ResNet: stem, ``layer1..4``, pool, fc."""
    layers = [model.layer1, model.layer2, model.layer3, model.layer4]

    def prefix(x):
        x = model.maxpool(model.act1(model.bn1(model.conv1(x))))
        for layer in layers[:start]:
            x = layer(x)
        return x
    return prefix, _Tail(layers[start:], [model.global_pool, model.fc], _head_drop_rate(model))


def _families() -> dict:
    from timm.models.efficientnet import EfficientNet
    from timm.models.resnet import ResNet
    return {EfficientNet: _efficientnet_split, ResNet: _resnet_split}


def split_for_cache(model: nn.Module, spec: FreezeSpec) -> tuple[Callable[[torch.Tensor], torch.Tensor], nn.Module]:
    """``(frozen_prefix, trainable_tail)``: ``tail(prefix(x))`` equals ``model(x)`` in eval mode.

    ``backbone``: the prefix gives the pooled pre-logit features, the tail is the classifier.
    ``N`` stages: the prefix is the stem and the first ``N - 1`` stages (supported for timm's
    EfficientNet and ResNet families), the tail the rest of the model. In training the tail
    applies the head's dropout as the model does; a prefix that would draw randomness of its own
    in training (stochastic depth, dropout) is refused, since its output is computed once.
    """
    prefix, tail = _split(model, spec)
    _refuse_randomness_in(model, tail)
    return prefix, tail


def _split(model: nn.Module, spec: FreezeSpec):
    if spec == "backbone":
        def features(x):
            return model.forward_head(model.forward_features(x), pre_logits=True)
        classifier, rate = model.get_classifier(), _head_drop_rate(model)
        # the classifier alone when there is no head dropout: its tensors keep their names (older checkpoints)
        return features, (_Tail([], [classifier], rate) if rate else classifier)
    if not isinstance(spec, int) or isinstance(spec, bool) or spec < 1:
        raise FreezeError(f"data.cached_views needs freeze: backbone or freeze: N >= 1 (the stem at least), got {spec!r}")
    for family, split in _families().items():
        if isinstance(model, family):
            stages = len(coarse_groups(model)) - 2     # groups: stem, stages..., head
            if spec - 1 > stages:
                raise FreezeError(f"freeze: {spec} leaves no stage to train before the head; use freeze: backbone")
            return split(model, spec - 1)
    names = ", ".join(f.__name__ for f in _families())
    raise FreezeError(f"cached stage outputs (data.cached_views with freeze: {spec}) are supported for timm's "
                      f"{names} families, not {type(model).__name__}; use freeze: backbone with data.cached_views, "
                      f"or freeze: {spec} without data.cached_views")


# timm's head dropout as a module (ViTs: head_drop; ConvNeXt-style heads: head.drop); ResNet and
# EfficientNet apply it as a function. The tail applies it in every case, at every step.
_HEAD_DROPOUT = ("head_drop", "head.drop")


def _head_drop_rate(model: nn.Module) -> float:
    rate = getattr(model, "drop_rate", None)
    if rate is None:   # ViTs keep it in their head dropout module only
        modules = dict(model.named_modules())
        rate = next((m.p for name in _HEAD_DROPOUT
                     if isinstance(m := modules.get(name), nn.modules.dropout._DropoutNd)), 0.0)
    return float(rate or 0.0)


def _refuse_randomness_in(model: nn.Module, tail: nn.Module) -> None:
    """Refuse a frozen part that draws randomness in training: stochastic depth (timm's
    ``drop_path_rate``), DropBlock, dropout. Without a cache it draws anew at every step; a cached
    feature is computed once, so training on it would silently go without."""
    from timm.layers import DropBlock2d, DropPath, PatchDropout
    in_tail = {id(m) for m in tail.modules()}
    found = []
    for name, m in model.named_modules():
        rate = (getattr(m, "drop_prob", 0.0) if isinstance(m, (DropPath, DropBlock2d)) else
                getattr(m, "prob", 0.0) if isinstance(m, PatchDropout) else
                m.p if isinstance(m, nn.modules.dropout._DropoutNd) else 0.0)
        if rate and id(m) not in in_tail and not (name in _HEAD_DROPOUT and rate == _head_drop_rate(model)):
            found.append(f"{name} ({type(m).__name__} {rate:g})")
    if found:
        raise FreezeError(f"the frozen part draws randomness at every training step ({', '.join(found[:3])}"
                          f"{' ...' if len(found) > 3 else ''}: stochastic depth or dropout), which features cached "
                          f"once cannot repeat; set those rates to 0 in model_kwargs (drop_path_rate, drop_block_rate, "
                          f"proj_drop_rate, attn_drop_rate, pos_drop_rate, patch_drop_rate), or train without "
                          f"data.cached_views")
