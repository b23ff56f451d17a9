"""Evaluation: predictions, accuracy, the paper's pseudo-label diagnostics, and
``evaluate_model`` behind ``dpl-zoo eval`` (a checkpoint, an exported folder or a zoo name)."""
from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn

from .data import ViewDataset, class_balance, eval_loader
from .method import debiased_pseudo_labels

@torch.no_grad()
def predict(model: nn.Module, loader, device: torch.device, autocast=nullcontext) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (float32, CPU) and targets over a loader of ``(image, target, index)``."""
    was_training = model.training
    model.eval()
    logits, targets = [], []
    for x, y, _ in loader:
        with autocast():
            logits.append(model(x.to(device)).float().cpu())
        targets.append(torch.as_tensor(y))
    model.train(was_training)
    return torch.cat(logits), torch.cat(targets)


def accuracy_report(logits: torch.Tensor, targets: torch.Tensor, num_classes: int) -> dict:
    """Top-1/top-5 (percent) and per-class top-1."""
    k = min(5, num_classes)
    topk = logits.topk(k, dim=1).indices
    top1 = (topk[:, 0] == targets)
    top5 = (topk == targets.unsqueeze(1)).any(dim=1)
    per_class = [float(top1[targets == c].float().mean() * 100) if (targets == c).any() else float("nan")
                 for c in range(num_classes)]
    return {"top1": float(top1.float().mean() * 100), "top5": float(top5.float().mean() * 100),
            "per_class_top1": per_class}


def pseudo_label_report(logits: torch.Tensor, targets: torch.Tensor, log_prior: torch.Tensor,
                        tau: float, threshold: float) -> dict:
    """The paper's pseudo-label diagnostics on unlabeled images: the pseudo-labels the
    method would make now (debiased with the current prior), their accuracy when
    accepted, the mask rate, and the class imbalance of the pseudo-labels."""
    _, pl, mask = debiased_pseudo_labels(logits, log_prior.cpu(), tau, threshold)
    mask = mask.bool()
    hist = torch.bincount(pl, minlength=logits.shape[1])
    return {"pl_acc": float((pl[mask] == targets[mask]).float().mean() * 100) if mask.any() else float("nan"),
            "pl_acc_all": float((pl == targets).float().mean() * 100), "mask_rate": float(mask.float().mean()),
            "pl_hist": hist.tolist(), **{f"pl_{k}": v for k, v in class_balance(hist.tolist()).items()}}


def load_for_eval(ref: str) -> tuple[nn.Module, list[str] | None]:
    """A model from a run checkpoint (``.pth.tar``), an exported timm folder, or a zoo name."""
    import timm
    path = Path(ref)
    if path.is_file():
        from . import checkpoint as ckpt
        state = ckpt.load(path)
        if "arch" not in state or "state_dict" not in state:
            raise ckpt.CheckpointError(f"{path} is not a dpl-zoo run checkpoint; convert authors' checkpoints with "
                                       f"`dpl-zoo convert` first")
        from .config import config_from_dict
        from .models import build_model, resolve_data_config
        cfg = dataclasses.replace(config_from_dict(state["config"]), pretrained=False, initial_checkpoint=None)
        model = build_model(cfg, len(state["classes"]))
        model.load_state_dict(state["state_dict"])
        model.pretrained_cfg = {**model.pretrained_cfg, **resolve_data_config(cfg, model)}
        return model.eval(), list(state["classes"])
    if path.is_dir():
        model = timm.create_model(f"local-dir:{path}")
        return model.eval(), model.pretrained_cfg.get("label_names")
    from .zoo import load
    model = load(ref)
    return model, model.pretrained_cfg.get("label_names")


def evaluate_model(ref: str, data: str, batch_size: int = 128, workers: int = 2) -> dict:
    """Top-1/top-5 and per-class accuracy of a model on ``mnist`` (embedded test split) or a class folder."""
    from timm.data import create_transform, resolve_data_config
    from .data import DataError, ImageFolderDataset, load_mnist
    model, label_names = load_for_eval(ref)
    if data == "mnist":
        _, dataset = load_mnist(0.2)
    else:
        dataset = ImageFolderDataset(data)
    if model.num_classes != len(dataset.classes):
        raise DataError(f"the model has {model.num_classes} classes but {data} has {len(dataset.classes)}; "
                        f"evaluate on data with the model's classes")
    if label_names and list(label_names) != list(dataset.classes):
        raise DataError(f"class names differ: model {list(label_names)[:5]}..., data {dataset.classes[:5]}...")
    tf = create_transform(**resolve_data_config(model=model))
    bad = set(getattr(dataset, "bad_indices", []))
    loader = eval_loader(ViewDataset(dataset, [i for i in range(len(dataset)) if i not in bad], [tf]), batch_size,
                         workers, pin_memory=False)
    logits, targets = predict(model, loader, torch.device("cpu"))
    report = accuracy_report(logits, targets, model.num_classes)
    return {"model": ref, "data": data, "images": len(targets), "skipped_images": len(bad),
            "classes": list(dataset.classes), **report}
