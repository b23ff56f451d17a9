"""Models from a config: a timm architecture, its initial weights and its data config."""
from __future__ import annotations

from typing import Any

import torch.nn as nn

from .config import ConfigError, TrainConfig


def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """A timm model; ``img_size`` is passed to architectures with a fixed input size (ViTs)."""
    model = _create(cfg, num_classes)
    if cfg.initial_checkpoint:
        from . import distributed as dist_utils
        from .cache import download_to_cache, is_url
        from .layouts import load_start_point
        source, sha256 = cfg.initial_checkpoint, cfg.initial_checkpoint_sha256
        if is_url(source):  # one download, by rank 0, that the other ranks then read from the cache
            if dist_utils.is_main():
                download_to_cache(source, sha256=sha256)
            dist_utils.barrier()
        info = load_start_point(model, source, sha256=sha256)
        # a start point brings the preprocessing its weights were trained with
        model.pretrained_cfg = {**model.pretrained_cfg, **info["data_config"]}
    if cfg.head_hidden_size:    # after the start point, which brings a linear head's names
        set_mlp_head(model, cfg.head_hidden_size, num_classes)
    return model


# What rebuilding a run's model reads from its config: the architecture, its freezing and its
# preprocessing. Nothing else is read or validated again, so a checkpoint rebuilds anywhere,
# without the files only training needed (dpl.target_prior, data.labeled_csv,
# data.teacher_predictions, initial_checkpoint, data.root).
MODEL_KEYS = ("model", "model_kwargs", "img_size", "mean", "std", "crop_pct", "interpolation", "head_hidden_size",
              "freeze")


def model_config(saved: dict) -> TrainConfig:
    """The model-building part of a saved run config (``MODEL_KEYS``), with no start weights."""
    if not isinstance(saved, dict) or "model" not in saved:
        from .checkpoint import CheckpointError
        raise CheckpointError("the checkpoint's config names no model; it was not written by dpl-zoo train")
    return TrainConfig(**{k: saved[k] for k in MODEL_KEYS if k in saved}, pretrained=False, initial_checkpoint=None)


def model_from_checkpoint(state: dict) -> tuple[nn.Module, dict]:
    """``(model, data_config)`` as a run checkpoint holds them: the architecture from its config,
    frozen as it trained (frozen layers' tensors keep their frozen names), its tensors, and the
    preprocessing it trained with. No start weights are read: a start file changed or gone since
    does not matter."""
    cfg = model_config(state["config"])
    model = build_model(cfg, len(state["classes"]))
    if cfg.freeze is not None:
        from .freeze import freeze
        freeze(model, cfg.freeze)
    model.load_state_dict(state["state_dict"])
    data_config = state.get("data_config") or resolve_data_config(cfg, model)  # older checkpoints: none saved
    data_config = {k: tuple(v) if isinstance(v, list) else v for k, v in data_config.items()}
    model.pretrained_cfg = {**model.pretrained_cfg, **data_config}
    return model, data_config


def _create(cfg, num_classes: int) -> nn.Module:
    """``timm.create_model`` for ``cfg.model`` (a clear error for an unknown name); ``img_size`` is
    passed to architectures with a fixed input size (ViTs)."""
    import timm
    from timm.models import get_pretrained_cfg
    from timm.models import split_model_name_tag
    arch = split_model_name_tag(cfg.model)[0]
    if ":" not in cfg.model and not timm.is_model(arch):
        import difflib
        close = difflib.get_close_matches(cfg.model, timm.list_models(), n=3, cutoff=0.6)
        raise ConfigError(f"unknown timm model {cfg.model!r}" + (f"; did you mean {', '.join(close)}?" if close else
                                                                "; see timm.list_models()"))
    kwargs = dict(cfg.model_kwargs)
    pcfg = get_pretrained_cfg(cfg.model)
    if cfg.img_size and pcfg is not None and pcfg.fixed_input_size:
        kwargs.setdefault("img_size", cfg.img_size)
    return timm.create_model(cfg.model, pretrained=cfg.pretrained, num_classes=num_classes, **kwargs)


def build_backbone(cfg) -> nn.Module:
    """The backbone of a pretraining run (a ``PretrainConfig``): the timm model without classifier
    (``num_classes=0``: pooled features), as the fine-tuning recipes will build it."""
    return _create(cfg, 0)


def set_mlp_head(model: nn.Module, hidden: int, num_classes: int) -> nn.Module:
    """Replace the classifier (timm's ``pretrained_cfg["classifier"]``) by Linear, ReLU, Linear: a
    head that can bend frozen features, not only weigh them. No BatchNorm: with an EMA teacher
    the student's batches hold labeled and strong views only, and running statistics of strong
    views do not fit the clean views it is evaluated on."""
    name = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    current = model.get_submodule(name) if name else None
    if not isinstance(current, nn.Linear):
        raise ConfigError(f"head_hidden_size needs a timm model with a linear classifier named in its pretrained_cfg; "
                          f"{type(model).__name__} has {type(current).__name__} at {name!r}")
    model.set_submodule(name, nn.Sequential(nn.Linear(current.in_features, hidden), nn.ReLU(inplace=True),
                                            nn.Linear(hidden, num_classes)))
    return model


def resolve_data_config(cfg, model: nn.Module) -> dict:
    from timm.data import resolve_data_config as timm_resolve
    args: dict[str, Any] = {}
    if cfg.img_size:
        args["input_size"] = (3, cfg.img_size, cfg.img_size)
    if cfg.mean:
        args["mean"] = tuple(cfg.mean)
    if cfg.std:
        args["std"] = tuple(cfg.std)
    if cfg.crop_pct:
        args["crop_pct"] = cfg.crop_pct
    if cfg.interpolation:
        args["interpolation"] = cfg.interpolation
    return timm_resolve(args=args, model=model)
