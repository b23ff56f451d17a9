"""Zero-shot teacher predictions (CLIP through open_clip), computed once before training.

``dpl-zoo pseudo-label --teacher clip:RN50/openai --data DIR --out preds.safetensors``
writes, for every image of a dataset in its sample order, the teacher's top-k classes
and probabilities. File format (safetensors, no pickle):

- tensors ``indices`` (N x k, int64) and ``probs`` (N x k, float32), row i = sample i;
- metadata ``fingerprint`` (sha256 of the dataset's sample list and labels),
  ``num_samples``, ``num_classes``, ``teacher``, ``templates``, ``class_names`` (JSON).

Training (``data.teacher_predictions``) checks size, fingerprint and class count
against its dataset before using a file. Work is saved in parts next to the output,
so an interrupted run continues where it stopped. The authors' released prediction
files use a layout that is not documented here; convert them to this format first.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from .data import DataError

SIMPLE_TEMPLATES = ("a photo of a {}.",)


@dataclass
class Predictions:
    indices: torch.Tensor       # N x k class ids, best first
    probs: torch.Tensor         # N x k probabilities
    fingerprint: str
    num_classes: int
    teacher: str = ""
    class_names: Optional[list[str]] = None
    templates: int = 0
    _digest: Optional[str] = field(default=None, init=False, repr=False, compare=False)

    @property
    def labels(self) -> torch.Tensor:
        return self.indices[:, 0]

    @property
    def confidence(self) -> torch.Tensor:
        return self.probs[:, 0]

    def digest(self) -> str:
        """sha256 of what training reads (classes, probabilities): a run's checkpoints record it, so
        a resume with other predictions under the same or a moved path is caught."""
        if self._digest is not None:
            return self._digest
        h = hashlib.sha256(f"{self.num_classes}:{tuple(self.indices.shape)}".encode())
        for t in (self.indices, self.probs):
            h.update(str(t.dtype).encode())
            h.update(t.contiguous().numpy().tobytes())
        self._digest = h.hexdigest()
        return self._digest

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"fingerprint": self.fingerprint, "num_samples": str(len(self.indices)),
                "num_classes": str(self.num_classes), "teacher": self.teacher, "templates": str(self.templates),
                "class_names": json.dumps(self.class_names), "format": "dpl-zoo-teacher-predictions/1"}
        tmp = path.with_name(f".{path.name}.tmp")
        save_file({"indices": self.indices.contiguous(), "probs": self.probs.contiguous()}, str(tmp), metadata=meta)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Predictions":
        from safetensors import safe_open
        path = Path(path)
        if not path.is_file():
            raise DataError(f"teacher predictions {path} do not exist; make them with `dpl-zoo pseudo-label`")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                indices, probs = f.get_tensor("indices"), f.get_tensor("probs")
        except Exception as e:  # noqa: BLE001 - re-raised with what to do
            raise DataError(f"{path} is not a teacher predictions file ({e}); make it with `dpl-zoo pseudo-label`") from e
        if "fingerprint" not in meta:
            raise DataError(f"{path} has no dataset fingerprint; make it with `dpl-zoo pseudo-label`")
        return cls(indices, probs, meta["fingerprint"], int(meta["num_classes"]), meta.get("teacher", ""),
                   json.loads(meta.get("class_names", "null")), int(meta.get("templates", 0)))

    def check_matches(self, dataset: Dataset, num_classes: int, path: str = "") -> None:
        """A predictions file made for another dataset is refused before training starts."""
        where = f" ({path})" if path else ""
        if len(self.indices) != len(dataset):
            raise DataError(f"teacher predictions{where} cover {len(self.indices)} images, the dataset has "
                            f"{len(dataset)}: they were made for another dataset; run `dpl-zoo pseudo-label` again")
        if self.num_classes != num_classes:
            raise DataError(f"teacher predictions{where} have {self.num_classes} classes, the dataset {num_classes}")
        fp = dataset_fingerprint(dataset)
        if self.fingerprint != fp:
            raise DataError(f"teacher predictions{where} were made for another dataset (fingerprint "
                            f"{self.fingerprint[:12]}..., this dataset {fp[:12]}...); run `dpl-zoo pseudo-label` again")


def dataset_fingerprint(dataset: Dataset) -> str:
    """sha256 of the sample list (file names relative to the root, when known) and the labels."""
    h = hashlib.sha256()
    h.update(str(len(dataset)).encode())
    samples = getattr(dataset, "samples", None)
    if samples:
        root = Path(samples[0][0]).parents[1] if len(Path(samples[0][0]).parents) > 1 else Path("")
        for path, target in samples:
            h.update(f"{Path(path).relative_to(root) if root else path}\t{target}\n".encode())
    else:
        h.update(",".join(str(int(t)) for t in dataset.targets).encode())
    return h.hexdigest()


def parse_teacher(spec: str) -> tuple[str, Optional[str]]:
    """``clip:RN50/openai`` -> ("RN50", "openai"); ``clip:NAME`` -> (NAME, None): untrained weights."""
    if not spec.startswith("clip:"):
        raise DataError(f"unknown teacher {spec!r}; use clip:ARCH/PRETRAINED, e.g. clip:RN50/openai")
    arch, _, pretrained = spec[len("clip:"):].partition("/")
    return arch, pretrained or None


def build_clip(spec: str, device: torch.device):
    try:
        import open_clip
    except ImportError as e:
        raise DataError("CLIP teachers need open_clip: pip install 'dpl-zoo[clip]'") from e
    arch, pretrained = parse_teacher(spec)
    if arch not in open_clip.list_models():
        raise DataError(f"open_clip has no model {arch!r}; see open_clip.list_models()")
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained, device=device)
    return model.eval(), preprocess, open_clip.get_tokenizer(arch)


def imagenet_templates() -> list[str]:
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
    return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]


@torch.no_grad()
def text_classifier(model, tokenizer, class_names: Sequence[str], templates: Sequence[str],
                    device: torch.device) -> torch.Tensor:
    """Prompt ensembling: per class, the normalised mean of its normalised template embeddings (C x D)."""
    weights = []
    for name in class_names:
        emb = model.encode_text(tokenizer([t.format(name) for t in templates]).to(device)).float()
        emb = emb / emb.norm(dim=-1, keepdim=True)
        mean = emb.mean(0)
        weights.append(mean / mean.norm())
    return torch.stack(weights)


class _Preprocessed(Dataset):
    """Images ``start..stop`` of a dataset through the teacher's preprocessing; an unreadable
    image (listed in the dataset's ``bad_indices``) is never opened and yields ``valid=False``."""

    def __init__(self, base: Dataset, transform, start: int, stop: int, size: int):
        self.base, self.transform, self.start, self.stop, self.size = base, transform, start, stop, size
        self.bad = set(getattr(base, "bad_indices", []))

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int):
        if self.start + i in self.bad:
            return torch.zeros(3, self.size, self.size), False
        img, _ = self.base[self.start + i]
        return self.transform(img), True


@torch.no_grad()
def _encode_chunk(model, classifier, images: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    feats = model.encode_image(images).float()
    feats = feats / feats.norm(dim=-1, keepdim=True)
    probs = (100.0 * feats @ classifier.t()).softmax(dim=-1)
    top = probs.topk(topk, dim=-1)
    return top.indices.cpu(), top.values.cpu()


def predict_zero_shot(spec: str, dataset: Dataset, class_names: Sequence[str], out: str | Path,
                      templates: Sequence[str] = SIMPLE_TEMPLATES, batch_size: int = 64, topk: int = 5,
                      workers: int = 2, chunk: int = 10_000, device: Optional[str] = None,
                      show_progress: bool = True) -> Predictions:
    """Zero-shot top-k predictions for every image of ``dataset``, saved to ``out``; resumable."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if len(class_names) != len(getattr(dataset, "classes", class_names)):
        raise DataError(f"{len(class_names)} class names for a dataset of {len(dataset.classes)} classes")
    out = Path(out)
    fingerprint = dataset_fingerprint(dataset)
    parts = out.with_name(out.name + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    # parts may only be reused by the same dataset, teacher, prompts, classes and top-k
    settings = {"fingerprint": fingerprint, "teacher": spec, "topk": int(topk), "chunk": int(chunk),
                "templates": hashlib.sha256("\n".join(templates).encode()).hexdigest(),
                "class_names": hashlib.sha256("\n".join(class_names).encode()).hexdigest()}
    marker = parts / "settings.json"
    if not marker.exists():
        if any(parts.iterdir()):  # chunks of unknown settings: never mix them into these predictions
            raise DataError(f"{parts} holds partial predictions without a record of their settings; remove that "
                            f"folder to start over")
        marker.write_text(json.dumps(settings, sort_keys=True))
    previous = json.loads(marker.read_text())
    if previous != settings:
        changed = ", ".join(k for k in settings if previous.get(k) != settings[k])
        raise DataError(f"{parts} holds partial predictions made with other settings ({changed} differ); "
                        f"remove that folder to start over, or run again with the same settings")
    model, preprocess, tokenizer = build_clip(spec, device)
    classifier = text_classifier(model, tokenizer, class_names, templates, device)
    size = getattr(model.visual, "image_size", 224)
    image_size = size[0] if isinstance(size, (tuple, list)) else int(size)
    topk = min(topk, len(class_names))
    n = len(dataset)
    starts = list(range(0, n, chunk))
    from safetensors.torch import load_file, save_file
    with Progress(TextColumn("pseudo-labels"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  disable=not show_progress) as progress:
        task = progress.add_task("images", total=n)
        for start in starts:
            part = parts / f"{start:012d}.safetensors"
            stop = min(start + chunk, n)
            if part.exists():  # done before an interruption
                progress.advance(task, stop - start)
                continue
            idx, prob = [], []
            loader = DataLoader(_Preprocessed(dataset, preprocess, start, stop, image_size),
                                batch_size=batch_size,
                                num_workers=workers)
            for images, valid in loader:
                i, p = _encode_chunk(model, classifier, images.to(device), topk)
                p[~valid] = 0.0  # unreadable: no prediction, confidence 0 (never a label, never a backup)
                idx.append(i)
                prob.append(p)
                progress.advance(task, len(images))
            tmp = part.with_suffix(".tmp")
            save_file({"indices": torch.cat(idx), "probs": torch.cat(prob)}, str(tmp))
            tmp.replace(part)
    pieces = [load_file(str(parts / f"{s:012d}.safetensors")) for s in starts]
    preds = Predictions(torch.cat([p["indices"] for p in pieces]), torch.cat([p["probs"] for p in pieces]),
                        fingerprint, len(class_names), spec, list(class_names), len(templates))
    preds.save(out)
    shutil.rmtree(parts)
    return preds


def zero_shot_accuracy(preds: Predictions, targets: Sequence[int]) -> dict:
    """Top-1/top-5 of the teacher alone: the "CLIP alone" baseline of a model card."""
    t = torch.as_tensor(list(targets))
    top1 = (preds.labels == t).double().mean().item() * 100
    top5 = (preds.indices == t.unsqueeze(1)).any(dim=1).double().mean().item() * 100
    return {"top1": top1, "top5": top5, "images": len(t), "teacher": preds.teacher}
