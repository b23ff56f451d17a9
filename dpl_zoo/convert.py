"""The authors' released DebiasPL checkpoints to timm folders (``model.safetensors`` +
``config.json``), with the preprocessing the authors evaluated with.

The key mapping lives in :mod:`dpl_zoo.layouts`; this module only chooses the student or
the EMA teacher, builds the timm model and writes the folder.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .layouts import ConversionError, get_layout, map_state, read_checkpoint

# the authors' evaluation: resize 256, centre crop 224, bilinear, ImageNet mean/std (timm's resnet50.tv_in1k)
REFERENCE_DATA_CONFIG = dict(input_size=(3, 224, 224), **get_layout("debiaspl").preprocessing({}))


def convert_checkpoint(src: str | Path, out_dir: str | Path, teacher: bool = False,
                       arch: Optional[str] = None) -> Path:
    """An authors' DebiasPL ``.pth.tar`` (student, or ``teacher=True`` for the EMA model)
    to a timm folder: ``model.safetensors`` + ``config.json``."""
    import timm
    from .checkpoint import export_timm
    raw = read_checkpoint(src)
    arch = arch or (raw.get("arch") if isinstance(raw.get("arch"), str) and timm.is_model(raw.get("arch"))
                    else None) or "resnet50"
    tensors = raw.get("state_dict", raw)
    if not any(k.startswith(("module.main.", "module.ema.")) for k in tensors):
        if any(k.startswith(("module.encoder_q.", "encoder_q.")) for k in tensors):
            raise ConversionError(f"{src} is a MoCo backbone without a classifier: use it as initial_checkpoint "
                                  f"in a recipe to fine-tune, not as a zoo model")
        raise ConversionError(f"{src} is not in the authors' DebiasPL layout (module.main.* / module.ema.* keys)")
    prefix = "module.ema." if teacher else "module.main."
    fc = tensors.get(f"{prefix}fc.weight")
    if fc is None:
        raise ConversionError(f"{src}: no classifier ({prefix}fc.weight) for the {'teacher' if teacher else 'student'}")
    model = timm.create_model(arch, num_classes=int(fc.shape[0]))
    mapped, _ = map_state(raw, model, "debiaspl", teacher=teacher)
    model.load_state_dict(mapped, strict=True)
    labels = None
    if model.num_classes == 1000:
        from timm.data import ImageNetInfo
        labels = ImageNetInfo().label_names()
    return export_timm(model, out_dir, labels, REFERENCE_DATA_CONFIG)
