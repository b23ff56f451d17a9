"""Atomic checkpoints, resume, and export of the final weights as a timm folder.

A checkpoint is written to a temporary file in the same folder, flushed to disk and
renamed over the old one, so a crash or a full disk mid-write leaves the previous
checkpoint intact. Everything in it loads with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used for this run; the message says why."""


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a checkpoint is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(path: str | Path) -> dict:
    """Load a checkpoint of this project (tensors and plain Python only: no pickle)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with what to do
        raise CheckpointError(f"cannot read checkpoint {path} ({type(e).__name__}: {e}); "
                              f"it is truncated, corrupt or not a dpl-zoo checkpoint") from e


def export_timm(model: torch.nn.Module, out_dir: str | Path, label_names: Optional[list[str]] = None,
                data_config: Optional[dict] = None, head_hidden_size: Optional[int] = None,
                training: Optional[dict] = None) -> Path:
    """``model.safetensors`` + timm ``config.json`` (pretrained_cfg, label names): loadable with
    ``timm.create_model("local-dir:...")`` and ready to publish. An MLP head
    (``head_hidden_size``) is recorded in ``config.json`` as ``dpl_zoo.head_hidden_size``: plain
    timm cannot build it, ``dpl_zoo.load`` can. ``training``: what the model card should say of how
    it was trained (method, target prior, the prior estimate), kept as ``dpl_zoo.training``."""
    from timm.models import save_for_hf
    out_dir = Path(out_dir)
    model_config = {"label_names": list(label_names)} if label_names else None
    from .identity import PREPROCESSING_KEYS
    data_cfg = {k: v for k, v in (data_config or {}).items() if k in PREPROCESSING_KEYS}
    if not all(t.is_contiguous() for t in model.state_dict().values()):
        # channels_last training: safetensors stores contiguous tensors only
        model = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    save_for_hf(model, out_dir, model_config=model_config, safe_serialization=True)
    section = {k: v for k, v in (("head_hidden_size", head_hidden_size), ("training", training)) if v}
    if section:
        config_path = out_dir / "config.json"
        config = json.loads(config_path.read_text())
        config["dpl_zoo"] = section
        config_path.write_text(json.dumps(config, indent=4))
    if data_cfg:  # the preprocessing trained with; set here, not through save_for_hf(data_config=), which older timm (1.0.29) lacks
        config_path = out_dir / "config.json"
        config = json.loads(config_path.read_text())
        pretrained_cfg = config.setdefault("pretrained_cfg", {})
        pretrained_cfg.update({k: list(v) if isinstance(v, tuple) else v for k, v in data_cfg.items()})
        if "input_size" in data_cfg:   # the source weights' test-time size no longer applies
            pretrained_cfg.pop("test_input_size", None)
            pretrained_cfg.pop("test_pool_size", None)
        if "crop_pct" in data_cfg:
            pretrained_cfg.pop("test_crop_pct", None)
        config_path.write_text(json.dumps(config, indent=4))
    return out_dir
