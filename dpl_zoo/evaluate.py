"""Evaluation: predictions, accuracy, the paper's pseudo-label diagnostics, and
``evaluate_model`` behind ``dpl-zoo eval`` (a checkpoint, an exported folder or a zoo name)."""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn

from .data import EvalDataset, eval_loader
from .datasets import class_balance
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


def accuracy_counts(logits: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[top1 correct, top5 correct, total, per-class correct..., per-class total...]``: sums
    over shards give the exact global numbers."""
    k = min(5, num_classes)
    topk = logits.topk(k, dim=1).indices
    top1 = (topk[:, 0] == targets).double()
    top5 = (topk == targets.unsqueeze(1)).any(dim=1).double()
    per_correct = torch.bincount(targets, weights=top1, minlength=num_classes)
    per_total = torch.bincount(targets, minlength=num_classes).double()
    return torch.cat([torch.stack([top1.sum(), top5.sum(), torch.tensor(float(len(targets)), dtype=torch.float64)]),
                      per_correct, per_total])


def accuracy_from_counts(counts: torch.Tensor, num_classes: int) -> dict:
    """Top-1/top-5 (percent) and per-class top-1 from :func:`accuracy_counts`."""
    c = counts.double().tolist()
    total = max(c[2], 1.0)
    correct, seen = c[3:3 + num_classes], c[3 + num_classes:]
    recalls = [100 * a / b for a, b in zip(correct, seen) if b]
    return {"top1": 100 * c[0] / total, "top5": 100 * c[1] / total, "images": int(c[2]),
            # mean per-class recall: what top-1 hides on imbalanced test sets
            "balanced_top1": sum(recalls) / len(recalls) if recalls else float("nan"),
            "per_class_top1": [100 * a / b if b else float("nan") for a, b in zip(correct, seen)]}


def accuracy_report(logits: torch.Tensor, targets: torch.Tensor, num_classes: int) -> dict:
    return accuracy_from_counts(accuracy_counts(logits, targets, num_classes), num_classes)


def pseudo_label_counts(logits: torch.Tensor, targets: torch.Tensor, log_ratio: torch.Tensor,
                        tau: float, threshold: float | torch.Tensor) -> torch.Tensor:
    """``[accepted, accepted correct, correct, total, histogram...]`` of the pseudo-labels the
    method would make now (debiased with the current prior, ``log qhat - log p*``), summable over shards."""
    _, pl, mask = debiased_pseudo_labels(logits, log_ratio.cpu(), tau, threshold)
    right = (pl == targets).double()
    m = mask.double()
    head = torch.stack([m.sum(), (right * m).sum(), right.sum(), torch.tensor(float(len(pl)), dtype=torch.float64)])
    return torch.cat([head, torch.bincount(pl, minlength=logits.shape[1]).double()])


def pseudo_label_from_counts(counts: torch.Tensor, target=None) -> dict:
    """The paper's pseudo-label diagnostics: accuracy of accepted pseudo-labels, mask rate,
    class histogram and its imbalance (max/min ratio, KL divergence from uniform and from the
    target distribution ``p*`` the method debiased towards)."""
    c = counts.double().tolist()
    accepted, accepted_right, right, total, hist = c[0], c[1], c[2], max(c[3], 1.0), [int(h) for h in c[4:]]
    return {"pl_acc": 100 * accepted_right / accepted if accepted else float("nan"),
            "pl_acc_all": 100 * right / total, "mask_rate": accepted / total, "pl_hist": hist,
            **{f"pl_{k}": v for k, v in class_balance(hist, target).items()}}


def load_for_eval(ref: str) -> tuple[nn.Module, list[str] | None]:
    """A model from a run checkpoint (``.pth.tar``), an exported timm folder (``local-dir:DIR``
    or an explicit path), ``hf-hub:ORG/NAME`` or a zoo name; a registry name always means the
    registry, never a folder that happens to share it."""
    from .zoo import ZooError, is_registered, load
    path = Path(ref).expanduser()
    if not is_registered(ref) and path.is_file():
        from . import checkpoint as ckpt
        state = ckpt.load(path)
        if "arch" not in state or "state_dict" not in state:
            raise ckpt.CheckpointError(f"{path} is not a dpl-zoo run checkpoint; convert authors' checkpoints with "
                                       f"`dpl-zoo convert` first")
        from .layouts import is_pretrain_checkpoint
        if is_pretrain_checkpoint(state["state_dict"]):
            raise ckpt.CheckpointError(f"{path} is a dpl-zoo pretrain checkpoint (a backbone without a classifier): "
                                       f"nothing to evaluate on classes; fine-tune from its export first "
                                       f"(--set initial_checkpoint={path.parent / 'export'}) and evaluate that run")
        from .models import model_from_checkpoint
        model, _ = model_from_checkpoint(state)
        return model.eval(), list(state["classes"])
    if ref.endswith((".tar", ".pth", ".safetensors")):
        raise ZooError(f"{ref} does not exist (expected a run checkpoint, an exported folder or a zoo name)")
    model = load(ref)
    return model, model.pretrained_cfg.get("label_names")


def evaluate_model(ref: str, data: str, batch_size: int = 128, workers: int = 2,
                   device: str | torch.device | None = None) -> dict:
    """Top-1/top-5 and per-class accuracy of a model on ``mnist`` (embedded test split) or a class
    folder, on ``device`` (default: CUDA when available)."""
    from timm.data import create_transform, resolve_data_config
    from .datasets import DataError, ImageFolderDataset, load_mnist
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, label_names = load_for_eval(ref)
    if data == "mnist":
        _, dataset = load_mnist(0.2)
    else:
        dataset = ImageFolderDataset(data, setting="--data")
    if model.num_classes != len(dataset.classes):
        raise DataError(f"the model has {model.num_classes} classes but {data} has {len(dataset.classes)}; "
                        f"evaluate on data with the model's classes")
    if label_names and list(label_names) != list(dataset.classes):
        raise DataError(f"class names differ: model {list(label_names)[:5]}..., data {dataset.classes[:5]}...")
    tf = create_transform(**resolve_data_config(model=model))
    bad = set(getattr(dataset, "bad_indices", []))
    loader = eval_loader(EvalDataset(dataset, [i for i in range(len(dataset)) if i not in bad], tf), batch_size,
                         workers, pin_memory=device.type == "cuda")
    logits, targets = predict(model.to(device), loader, device)
    report = accuracy_report(logits, targets, model.num_classes)
    return {"model": ref, "data": data, "images": len(targets), "skipped_images": len(bad),
            "classes": list(dataset.classes), "device": str(device), **report}
