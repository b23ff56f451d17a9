"""``dpl-zoo predict``: a trained model applied to a folder of new images, written as a CSV of each
image's top-k classes and confidences (the columns of timm's ``inference.py`` with
``--results-separate-col``: ``filename``, ``index_0..``, ``label_0..``, ``prob_0..``).

The model is what ``dpl-zoo eval`` takes: a run's checkpoint, an export folder or a zoo name. Its
own preprocessing (the data config saved with it) and class names are used. The folder may hold
class sub-folders or not: every image below it is predicted, none of its labels is read. An image
that cannot be decoded is skipped and listed (console and ``OUT.skipped.csv``), never a reason to
lose the others' predictions.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from .datasets import DataError, UnlabeledFolder

if TYPE_CHECKING:
    from rich.console import Console


class _Decoded(Dataset):
    """``(tensor, position, problem)`` per image: an image that cannot be decoded gives a zero
    tensor and the reason, so one bad file never stops the batch it is in."""

    def __init__(self, images: UnlabeledFolder, transform, input_size: tuple):
        self.images, self.transform, self.input_size = images, transform, tuple(input_size)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        try:
            img, _ = self.images[i]
            return self.transform(img), i, ""
        except Exception as e:  # noqa: BLE001 - any decoder error: this image is listed as skipped, with why
            cause = e.__cause__ if isinstance(e, DataError) and e.__cause__ else e
            return torch.zeros(self.input_size), i, f"{type(cause).__name__}: {cause}"


def _columns(topk: int) -> list[str]:
    return ["filename", *(f"{kind}_{r}" for kind in ("index", "label", "prob") for r in range(topk))]


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    """Written next to ``path`` and renamed over it: an interrupted run leaves an earlier file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    tmp.replace(path)


@torch.no_grad()
def predict_folder(model: str, data: str | Path, out: str | Path = "predictions.csv", topk: int = 5,
                   batch_size: int = 64, workers: int = 2, device: Optional[str | torch.device] = None,
                   console: Optional["Console"] = None) -> dict:
    """Top-``topk`` classes of every image below ``data`` by ``model``, written to the CSV ``out``.

    Args:
        model: a run's checkpoint (``runs/NAME/last.pth.tar``), an export folder
            (``runs/NAME/export``, ``local-dir:DIR``), ``hf-hub:ORG/NAME`` or a zoo name.
        data: a folder of images, with class sub-folders or without (labels are not read).
        out: the CSV to write; unreadable images are listed in ``OUT.skipped.csv``.
        topk: classes per image (at most the model's class count).
        batch_size: images per forward pass.
        workers: loader processes that decode and preprocess.
        device: ``cpu``, ``cuda``, ... (default: CUDA when available).
        console: a rich ``Console`` for the progress bar (default: a new one).

    Returns:
        ``{"out", "images" (predicted), "skipped" ([(filename, problem)]), "skipped_file", "topk",
        "device", "label_names" (whether the model carries class names; if not, labels are indices)}``.

    Raises:
        DataError: ``data`` is not a folder or holds no images; ``topk`` < 1.
        ZooError, CheckpointError: ``model`` cannot be loaded.

    Example:
        ```python
        result = predict_folder("runs/NAME-debiaspl/export", "new_images", out="predictions.csv")
        print(result["images"], result["skipped"])
        ```
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from timm.data import create_transform, resolve_data_config
    from .evaluate import load_for_eval
    if topk < 1:
        raise DataError(f"--topk must be >= 1, got {topk}")
    images = UnlabeledFolder(data, verify=False)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net, label_names = load_for_eval(model)
    net = net.to(device).eval()
    data_config = resolve_data_config(model=net)   # the checkpoint's own preprocessing
    k = min(topk, net.num_classes)
    names = list(label_names) if label_names else [str(i) for i in range(net.num_classes)]
    loader = DataLoader(_Decoded(images, create_transform(**data_config), data_config["input_size"]),
                        batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda")
    rows, skipped = [], []
    console = console or Console()
    with Progress(TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console) as progress:
        task = progress.add_task("images", total=len(images))
        for x, positions, problems in loader:
            probs = net(x.to(device)).float().softmax(dim=-1)
            top = probs.topk(k, dim=-1)
            values, indices = top.values.cpu().tolist(), top.indices.cpu().tolist()
            for row, (pos, problem) in enumerate(zip(positions.tolist(), problems)):
                name = Path(os.path.relpath(images.samples[pos][0], images.root)).as_posix()
                if problem:
                    skipped.append((name, problem))
                    continue
                rows.append([name, *indices[row], *(names[i] for i in indices[row]),
                             *(f"{v:.6f}" for v in values[row])])
            progress.advance(task, len(positions))
    if not rows:
        raise DataError(f"none of the {len(skipped)} images below {data} could be read (first: {skipped[0][0]}: "
                        f"{skipped[0][1]})")
    out = Path(out)
    _write_csv(out, _columns(k), rows)
    skipped_file = out.with_name(out.stem + ".skipped.csv")
    if skipped:
        _write_csv(skipped_file, ["filename", "problem"], [list(s) for s in skipped])
    elif skipped_file.exists():   # from an earlier run over other images: it no longer describes this CSV
        skipped_file.unlink()
    return {"out": str(out), "images": len(rows), "skipped": skipped, "skipped_file": str(skipped_file) if skipped
            else None, "topk": k, "device": str(device), "label_names": bool(label_names)}
