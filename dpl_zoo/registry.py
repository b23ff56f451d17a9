"""The zoo registry's data: what an entry is, where its weights live, and the errors.

Types only, as timm's ``PretrainedCfg``: this module imports none of the modules that use
it (``zoo`` registers and loads entries, ``sources`` fetches their weights, ``timm_tags``
makes them timm pretrained tags), so each of those imports it without a cycle.
"""
from __future__ import annotations

import functools
import re
from dataclasses import asdict, dataclass, field
from typing import Optional

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

# Weights that start from the MoCo-EMAN ResNet-50 carry its licence, the stricter one, in every
# machine-readable field (timm's pretrained cfg, the Hub card's `license`, which Hub filters read)
MOCO_EMAN_LICENSE = "cc-by-nc-4.0"
MOCO_EMAN_NOTE = ("These weights start from the MoCo-EMAN ResNet-50 (amazon-research/exponential-moving-average-"
                  "normalization), licensed CC-BY-NC-4.0, whose non-commercial terms may carry over to them, while "
                  "the code that trained them is MIT; their licence metadata is therefore the stricter one, "
                  "CC-BY-NC-4.0.")

_COMMIT = re.compile(r"[0-9a-f]{40}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class ZooError(ValueError):
    """A model that cannot be loaded as asked; the message says what to do."""


@dataclass(frozen=True)
class Metric:
    top1: float
    top5: Optional[float] = None
    provenance: str = "reported"        # "reported" (paper / authors) or "measured" (dpl-zoo eval here)
    source: str = ""                    # the citation, or the command that measured it


@dataclass(frozen=True)
class HubWeights:
    """Converted weights on the Hub, pinned: a commit hash (no moving branch) and the
    sha256 of its ``model.safetensors``. ``dpl-zoo publish-zoo`` prints these lines."""
    repo_id: str
    revision: str
    sha256: str

    def __post_init__(self):
        if not _COMMIT.fullmatch(self.revision):
            raise ZooError(f"{self.repo_id}: revision {self.revision!r} is not a 40-hex commit hash; pin the "
                           f"commit (a branch such as main can move and would change the weights silently)")
        if not _SHA256.fullmatch(self.sha256):
            raise ZooError(f"{self.repo_id}: sha256 {self.sha256!r} is not 64 lowercase hex digits")


@dataclass(frozen=True)
class Release:
    """The authors' original checkpoint (a ``.pth.tar`` in their layout) on Google Drive."""
    drive_id: str
    epochs: int
    sha256: Optional[str] = None        # of the .pth.tar; the authors publish none, so unknown until pinned here

    def __post_init__(self):
        if self.sha256 is not None and not _SHA256.fullmatch(self.sha256):
            raise ZooError(f"release {self.drive_id}: sha256 {self.sha256!r} is not 64 lowercase hex digits")

    @property
    def url(self) -> str:
        return f"https://drive.google.com/file/d/{self.drive_id}/view"


@dataclass(frozen=True)
class ZooEntry:
    name: str
    architecture: str                   # timm architecture
    num_classes: int
    label_set: str                      # e.g. "imagenet-1k", "mnist"
    dataset: str                        # what it was trained and evaluated on
    label_budget: str                   # e.g. "1% labels", "2 labels per class"
    recipe: str                         # shipped recipe name in recipes/
    method: str = "DebiasPL"
    metrics: Optional[Metric] = None    # of the weights this entry delivers
    paper: Optional[Metric] = None      # the paper's table, where it differs from the delivered file
    baseline_method: str = "FixMatch w/ EMAN"
    baseline: Optional[Metric] = None
    hub: Optional[HubWeights] = None    # source 1: the Hub, pinned
    release: Optional[Release] = None   # source 2: the authors' release (or DPL_ZOO_MIRROR)
    timm_tag: Optional[str] = None      # "dpl_1pct" -> timm.create_model("resnet50.dpl_1pct", pretrained=True)
    repo_id: str = ""                   # where `dpl-zoo publish-zoo` pushes (default dpl-zoo/NAME)
    input_size: tuple = (3, 224, 224)
    interpolation: str = "bilinear"     # the authors' evaluation: resize 256, centre crop 224, bilinear
    crop_pct: float = 0.875
    mean: tuple = IMAGENET_DEFAULT_MEAN
    std: tuple = IMAGENET_DEFAULT_STD
    label_names: Optional[tuple] = None  # None: ImageNet synsets for imagenet-1k, else unnamed
    license: str = "mit"
    license_note: str = ""
    origin: str = ""                    # where the weights come from before conversion
    reproduce: str = ""                 # how to make the weights when no source delivers them
    notes: str = ""
    tags: tuple = field(default=())

    def __post_init__(self):
        if (self.hub or self.release) and not self.timm_tag:
            raise ZooError(f"{self.name}: an entry with weights needs a timm_tag (its name in timm)")
        if self.timm_tag and "." in self.timm_tag:
            raise ZooError(f"{self.name}: timm_tag {self.timm_tag!r} must not contain '.'")
        if not self.repo_id:
            object.__setattr__(self, "repo_id", f"dpl-zoo/{self.name}")

    @property
    def gain(self) -> Optional[float]:
        if self.metrics is None or self.baseline is None:
            return None
        return round(self.metrics.top1 - self.baseline.top1, 2)

    @property
    def published(self) -> bool:
        return self.hub is not None

    @property
    def source(self) -> str:
        """Where ``load`` takes the weights from: the first source the entry has (timm's order)."""
        return "hub" if self.hub else "authors' release" if self.release else "none"

    @property
    def timm_name(self) -> Optional[str]:
        return f"{self.architecture}.{self.timm_tag}" if self.timm_tag else None

    def resolved_label_names(self) -> Optional[tuple]:
        if self.label_names is not None:
            return tuple(self.label_names)
        if self.label_set == "imagenet-1k" and self.num_classes == 1000:
            return _imagenet_synsets()
        return None

    def data_config(self) -> dict:
        """The preprocessing the weights were evaluated with (timm's data-config keys)."""
        return dict(input_size=tuple(self.input_size), interpolation=self.interpolation, crop_pct=self.crop_pct,
                    mean=tuple(self.mean), std=tuple(self.std))

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(gain=self.gain, source=self.source, timm_name=self.timm_name)
        return out


@functools.lru_cache(maxsize=1)
def _imagenet_synsets() -> tuple:
    """timm's ImageNet-1k class ids (n01440764, ...): read once, 50 ms a read."""
    from timm.data import ImageNetInfo
    return tuple(ImageNetInfo().label_names())
