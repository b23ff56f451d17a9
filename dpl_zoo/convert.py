"""Weights from other layouts into timm models: the authors' DebiasPL checkpoints,
MoCo(-EMAN) backbones, plain timm/torch files and safetensors.

Legacy ``.pth.tar`` files are read with ``torch.load(weights_only=True)``: tensors
and plain containers only, never arbitrary pickled code.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

# prefixes of the authors' checkpoint layout -> nothing (timm resnet names match after them)
STUDENT_PREFIXES = ("module.main.backbone.", "module.main.")
TEACHER_PREFIXES = ("module.ema.backbone.", "module.ema.")
MOCO_PREFIXES = ("module.encoder_q.",)


class ConversionError(ValueError):
    """Weights that cannot be mapped onto the model; the message says why."""


def read_state(path: str | Path) -> dict:
    """The raw mapping stored in a weights file (safetensors or a weights-only torch file)."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - re-raised with what to do
            raise ConversionError(f"{path} is not a readable safetensors file ({e}); download it again") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with what to do
        raise ConversionError(
            f"{path} could not be loaded as weights only ({type(e).__name__}: {e}). It may be corrupt, or it holds "
            f"pickled code, which dpl-zoo refuses to run; convert it to safetensors with trusted tools first") from e


def detect_layout(state: dict) -> str:
    keys = list(state)
    if any(k.startswith(TEACHER_PREFIXES[1]) for k in keys) or any(k.startswith(STUDENT_PREFIXES[1]) for k in keys):
        return "debiaspl"
    if any(k.startswith(MOCO_PREFIXES[0]) for k in keys):
        return "moco"
    return "plain"


def _strip(state: dict, prefixes: tuple[str, ...]) -> dict:
    out = {}
    for key, value in state.items():
        for p in prefixes:
            if key.startswith(p):
                out[key[len(p):]] = value
                break
    return out


def to_timm_state(state: dict, teacher: bool = False) -> tuple[dict, str]:
    """Map a checkpoint's state dict to timm key names; returns ``(state, layout)``.

    MoCo backbones lose their projection head (``fc.*``): they are a starting point
    for fine-tuning, not a classifier.
    """
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    layout = detect_layout(state)
    if layout == "debiaspl":
        mapped = _strip(state, TEACHER_PREFIXES if teacher else STUDENT_PREFIXES)
    elif layout == "moco":
        mapped = {k: v for k, v in _strip(state, MOCO_PREFIXES).items() if not k.startswith("fc.")}
    else:
        mapped = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    mapped = {k: v for k, v in mapped.items() if isinstance(v, torch.Tensor)}
    if not mapped:
        raise ConversionError(f"no weights found for the {'teacher' if teacher else 'student'} in a {layout} checkpoint")
    return mapped, layout


def load_initial_weights(model: nn.Module, path: str | Path, teacher: bool = False) -> dict:
    """Load weights to start fine-tuning from; a classifier of another size is left freshly initialised."""
    state, layout = to_timm_state(read_state(path), teacher=teacher)
    own = model.state_dict()
    head = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    for k in head:
        state.pop(k)
    missing, unexpected = model.load_state_dict(state, strict=False)
    classifier = set(_classifier_keys(model))
    real_missing = [k for k in missing if k not in classifier]
    if unexpected or real_missing or any(k not in classifier for k in head):
        raise ConversionError(
            f"{path} ({layout} layout) does not fit {type(model).__name__}: missing {real_missing[:5]}, "
            f"unexpected {unexpected[:5]}, shape mismatch {head[:5]}; is it for another architecture?")
    return {"layout": layout, "reset_head": sorted(set(missing) | set(head))}


def _classifier_keys(model: nn.Module) -> list[str]:
    name = getattr(model, "pretrained_cfg", {}).get("classifier", "fc")
    names = name if isinstance(name, (list, tuple)) else [name]
    return [k for k in model.state_dict() if any(k.startswith(f"{n}.") for n in names)]


def infer_num_classes(state: dict, classifier: str = "fc") -> Optional[int]:
    weight = state.get(f"{classifier}.weight")
    return int(weight.shape[0]) if weight is not None else None


def convert_checkpoint(src: str | Path, out_dir: str | Path, teacher: bool = False,
                       arch: Optional[str] = None) -> Path:
    """An authors' DebiasPL ``.pth.tar`` (student, or ``teacher=True`` for the EMA model)
    to a timm folder: ``model.safetensors`` + ``config.json``."""
    import timm
    from .checkpoint import export_timm
    raw = read_state(src)
    arch = arch or (raw.get("arch") if isinstance(raw.get("arch"), str) else None) or "resnet50"
    state, layout = to_timm_state(raw, teacher=teacher)
    if layout == "moco":
        raise ConversionError(f"{src} is a MoCo backbone without a classifier: use it as initial_checkpoint "
                              f"in a recipe to fine-tune, not as a zoo model")
    num_classes = infer_num_classes(state)
    if num_classes is None:
        raise ConversionError(f"{src}: no classifier (fc.weight) found for the {'teacher' if teacher else 'student'}")
    model = timm.create_model(arch, num_classes=num_classes)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ConversionError(f"{src} does not match timm {arch}: {e}") from e
    labels = None
    if num_classes == 1000:
        from timm.data import ImageNetInfo
        labels = ImageNetInfo().label_names()
    return export_timm(model, out_dir, labels, {"input_size": (3, 224, 224), "crop_pct": 0.875})
