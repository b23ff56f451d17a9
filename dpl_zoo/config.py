"""Typed recipe config: YAML + ``--set`` overrides -> one validated ``TrainConfig`` (fine-tuning)
or ``PretrainConfig`` (self-supervised pretraining).

Top-level keys use timm train.py's names where one exists (model, lr, opt, sched,
epochs, ...); the method lives under ``dpl`` and the data under ``data``. A key
that is not a field is an error naming the closest valid key, so a typo never
silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .threshold import THRESHOLD_MODES

METHODS = ("debiaspl", "fixmatch", "supervised")
AUGMENT_ON = ("workers", "device")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message says what to change."""


@dataclass
class DPLConfig:
    """The method: DebiasPL on FixMatch, with the names of the paper and its reference code."""
    method: str = "debiaspl"           # debiaspl | fixmatch (tau = 0) | supervised (labeled data only)
    tau: float = 0.4                   # debiasing strength (tau x log qhat in pseudo-labels and margin); 0 = FixMatch
    tau_pl: Optional[float] = None     # counterfactual pseudo-labels; defaults to tau
    tau_margin: Optional[float] = None  # adaptive margin; defaults to tau
    debias: bool = True                # ablation switch for the counterfactual pseudo-labels
    margin: bool = True                # ablation switch for the adaptive margin
    threshold: float = 0.95            # confidence a pseudo-label needs to be used (threshold_mode fixed)
    # fixed (threshold, the paper) | self_adaptive (FreeMatch's per-class thresholds that follow the
    # debiased pseudo-labels' confidence: dpl_zoo.threshold; threshold is then unused)
    threshold_mode: str = "fixed"
    threshold_momentum: float = 0.999  # threshold_mode self_adaptive: EMA momentum of the thresholds (FreeMatch's)
    mu: int = 5                        # unlabeled batch = mu x labeled batch
    lambda_u: float = 1.0              # weight of the unlabeled loss
    qhat_momentum: float = 0.999       # EMA momentum of the class prior qhat (short runs: 0.99)
    masked_qhat: bool = False          # update qhat from accepted pseudo-labels only
    multiviews: bool = False           # two weak and two strong views per unlabeled image
    lambda_cld: float = 0.0            # weight of the CLD term (0: off)
    ema_teacher: bool = True           # EMAN: the EMA model makes the pseudo-labels
    clip_threshold: float = 0.4        # CLIP confidence that lets CLIP's label back up a rejected pseudo-label
    # the class distribution pseudo-labels are debiased towards: uniform (the paper), labeled
    # (the labeled split's class frequencies; 1/2 for a class without labels), estimated (the
    # unlabeled data's, estimated while training: dpl_zoo.prior_estimate), or C numbers (a list or a file)
    target_prior: Any = "uniform"
    estimate_start: str = "uniform"    # target_prior estimated: the prior used until the estimate is formed (uniform | labeled)
    estimate_momentum: float = 0.99    # target_prior estimated: momentum of the online EM step
    estimate_warmup: int = 100         # target_prior estimated: steps the probe trains before EM moves the estimate
    estimate_min_accepted: Optional[int] = None  # target_prior estimated: accepted pseudo-labels before use (default 20 x classes)


@dataclass
class DataConfig:
    """Where the images come from and how they are split and augmented."""
    dataset: str = "mnist"             # mnist (embedded) | folder | any timm create_dataset name
    root: Optional[str] = None         # folder (class/image) or file the dataset is read from
    train_split: str = "train"         # timm datasets: the training split's name
    val_split: str = "validation"      # timm datasets: the evaluation split's name
    val_root: Optional[str] = None     # folder datasets: a separate evaluation folder
    labels_per_class: Optional[int] = None  # labeled images per class
    label_fraction: Optional[float] = None  # share of each class that is labeled (at least one image)
    split_seed: int = 0                # seed of the labeled/unlabeled split
    # a long-tailed training set from a balanced one: class c keeps long_tail_max x ratio^(-c/(C-1))
    # images (seeded), before the labeled split; labeled and unlabeled then share that profile
    long_tail_ratio: Optional[float] = None
    long_tail_max: Optional[int] = None  # images kept of the most frequent class (with long_tail_ratio)
    labeled_csv: Optional[str] = None  # authors' split format: a column `Index`
    # the unlabeled images: positions in a CSV of the same format (default: every image not labeled);
    # a label budget then draws its labels from outside this pool
    unlabeled_csv: Optional[str] = None
    val_fraction: float = 0.2          # embedded MNIST: held-out test share
    scale: tuple = (0.08, 1.0)         # weak view: RandomResizedCrop scale
    ratio: tuple = (3 / 4, 4 / 3)      # weak view: RandomResizedCrop aspect ratio range
    hflip: float = 0.5                 # probability of a horizontal flip
    strong_aa: str = "rand-m10-n2"     # timm auto_augment spec of the strong view
    # where the random augmentation runs: "workers" (per image, PIL, in the loader processes) or
    # "device" (batched tensors on the training device; the workers only decode and crop)
    augment_on: str = "workers"
    verify_images: bool = True         # scan folder images at start, skip unreadable ones
    strict: bool = False               # an unreadable image is an error instead of skipped
    eval_unlabeled_max: int = 10000    # cap on the unlabeled subset used for pseudo-label diagnostics
    val_max: Optional[int] = None      # evaluate on a fixed random subset of this size (default: all)
    teacher_predictions: Optional[str] = None  # `dpl-zoo pseudo-label` output: enables the CLIP-assisted term
    labels_from: str = "human"         # human | teacher (zero-shot: labeled = confident teacher predictions)
    teacher_label_threshold: float = 0.95  # zero-shot: teacher confidence that makes an image "labeled"
    # with `freeze`: each training image's K weak and K strong views go through the frozen part once
    # (cached in the dpl-zoo cache); steps sample among them and run only the trainable rest
    cached_views: Optional[int] = None
    # at most this many unlabeled images: the first N of one fixed order of the dataset (the same pool
    # for every split seed), e.g. to bound the cost of data.cached_views
    unlabeled_max: Optional[int] = None


@dataclass
class TrainConfig:
    """Everything a run needs; saved resolved next to its outputs."""
    model: str = "test_resnet"         # timm model name, optionally with a pretrained tag (convnext_tiny.fb_in22k)
    pretrained: bool = False           # start from timm's weights for `model` (the head is replaced for your classes)
    initial_checkpoint: Optional[str] = None   # path or http(s) URL; the layout is detected (dpl_zoo.layouts)
    initial_checkpoint_sha256: Optional[str] = None  # its sha256, checked after download (a mismatch is removed)
    # recipes whose method needs a (self-supervised) start refuse to run without one...
    initial_checkpoint_required: bool = False
    from_scratch: bool = False         # ...unless training from random weights is asked for explicitly
    num_classes: Optional[int] = None  # default: from the data
    img_size: Optional[int] = None     # default: the model's pretrained_cfg
    model_kwargs: dict = field(default_factory=dict)  # extra timm.create_model arguments (e.g. {drop_path_rate: 0.1})
    # transfer: `backbone` (everything but the classifier) or N (the first N of timm's coarse parameter
    # groups: the stem, then stages), frozen with timm's freeze (BatchNorm statistics fixed too)
    freeze: Any = None
    # the new head: a linear classifier (default), or an MLP with one hidden layer of this width
    # (Linear, ReLU, Linear)
    head_hidden_size: Optional[int] = None
    mean: Optional[tuple] = None       # input normalisation mean; default: the weights' or the start point's
    std: Optional[tuple] = None        # input normalisation std; default: the weights' or the start point's
    crop_pct: Optional[float] = None   # evaluation: resize to img_size / crop_pct, centre crop img_size
    interpolation: Optional[str] = None  # bilinear | bicubic | ...
    batch_size: int = 64               # labeled images per step (global)
    lr: float = 0.03                   # learning rate of the new head (backbone_lr_scale scales the rest)
    opt: str = "momentum"              # timm optimiser name (momentum = SGD with Nesterov off, adamw, ...)
    weight_decay: float = 5e-4         # L2 weight decay (see filter_bias_and_bn)
    momentum: float = 0.9              # SGD momentum
    layer_decay: Optional[float] = None  # layer-wise lr decay (timm create_optimizer_v2), for ViTs
    # lr of every parameter outside the new classifier, as a fraction of lr (0.1: the pretrained
    # backbone learns 10x slower than the new head, as in TLlib's transfer recipes)
    backbone_lr_scale: Optional[float] = None
    filter_bias_and_bn: bool = True    # no weight decay on biases and norm layers (timm's default)
    sched: str = "cosine"              # timm lr schedule (cosine, step, ...), stepped every optimiser step
    epochs: int = 10                   # length of the run, in epochs of steps_per_epoch steps
    steps_per_epoch: Optional[int] = None  # default: one pass over the unlabeled set
    warmup_epochs: int = 0             # linear lr warm-up from warmup_lr
    warmup_lr: float = 1e-5            # lr at the start of the warm-up
    min_lr: float = 0.0                # lr the schedule ends at
    model_ema_decay: float = 0.999     # EMA (EMAN) teacher decay
    model_ema_warmup: bool = False     # timm's EMA warm-up: the decay ramps up to model_ema_decay (short runs)
    # with dpl.ema_teacher false: keep the EMA all the same, evaluated beside the student while the student
    # makes the pseudo-labels (FixMatch's and USB's way)
    model_ema_eval: bool = False
    clip_grad: Optional[float] = None  # clip the gradient norm to this value (default: no clipping)
    amp: bool = False                  # mixed precision autocast (amp_dtype)
    amp_dtype: str = "float16"         # on CUDA: float16 (with a gradient scaler) or bfloat16; CPU uses bfloat16
    channels_last: bool = False        # NHWC memory format (faster convolutions on many CPUs and GPUs)
    sync_bn: bool = False              # SyncBatchNorm under torchrun
    compile: bool = False              # torch.compile the student and the criterion
    workers: int = 2                   # data loader processes
    pin_memory: bool = False           # pinned host memory for loader batches (CUDA)
    seed: int = 0                      # seed of the run: initialisation, sampling order and random views
    deterministic: bool = False        # deterministic torch algorithms, for this run only
    eval_interval: int = 1             # epochs between evaluations
    log_interval: int = 20             # steps between metric rows
    output: str = "runs"               # folder that holds the run folders
    experiment: Optional[str] = None   # run folder name (default: recipe name and time); fixed for --resume auto
    device: Optional[str] = None       # cpu, cuda, cuda:1 ... (default: cuda when available; torchrun: its rank's GPU)
    dpl: DPLConfig = field(default_factory=DPLConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class MoCoConfig:
    """MoCo v2 with EMAN (the start the paper's ImageNet runs use): names of the MoCo code."""
    dim: int = 128                     # embedding size (the projection head's output)
    hidden: Optional[int] = None       # the projection MLP's hidden width; default: the backbone's feature size
    queue_size: int = 65536            # negatives kept from past batches (MoCo's K)
    temperature: float = 0.2           # MoCo v2's T
    momentum: float = 0.999            # EMAN key encoder: parameters and BatchNorm statistics averaged


@dataclass
class PretrainDataConfig:
    """The unlabeled images and the MoCo v2 augmentation (two views of each image)."""
    dataset: str = "folder"            # folder (any image files below root) | mnist | fashion_mnist | a timm name
    root: Optional[str] = None         # folder of images (any nesting) or the dataset's file
    train_split: str = "train"         # timm datasets: the split to pretrain on
    val_fraction: float = 0.2          # embedded MNIST: held-out test share
    unlabeled_max: Optional[int] = None  # at most this many images (a seeded subset)
    scale: tuple = (0.2, 1.0)          # RandomResizedCrop scale (MoCo v2: 0.2)
    ratio: tuple = (3 / 4, 4 / 3)      # RandomResizedCrop aspect ratio range
    hflip: float = 0.5                 # probability of a horizontal flip
    color_jitter: tuple = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue (torchvision ColorJitter)
    color_jitter_p: float = 0.8        # probability of the colour jitter
    grayscale_p: float = 0.2           # probability of RandomGrayscale
    blur_p: float = 0.5                # probability of the Gaussian blur
    blur_sigma: tuple = (0.1, 2.0)     # Gaussian blur sigma range in pixels of the training size (MoCo v2 at 224 px)
    verify_images: bool = True         # scan folder images at start, skip unreadable ones
    strict: bool = False               # an unreadable image is an error instead of skipped


@dataclass
class KNNConfig:
    """The kNN monitor: weighted kNN (InstDisc/MoCo) of the backbone's features on a labeled split."""
    enabled: bool = True               # built-in datasets use their labels; a folder needs knn.root
    root: Optional[str] = None         # a labeled class folder (root/<class>/<image>): the memory bank
    val_root: Optional[str] = None     # the labeled images to classify; default: a sibling val/validation/test
    val_split: str = "validation"      # timm datasets: the split to classify
    k: int = 200                       # neighbours that vote
    temperature: float = 0.07          # vote weight exp(similarity / temperature)
    bank_max: Optional[int] = 10000    # at most this many bank images (seeded subset)
    val_max: Optional[int] = 2000      # at most this many images classified (seeded subset)
    interval: int = 1                  # epochs between kNN evaluations


@dataclass
class PretrainConfig:
    """A self-supervised pretraining run (``dpl-zoo pretrain``); keys as in :class:`TrainConfig`."""
    model: str = "resnet50"            # timm backbone to pretrain (its classifier is dropped)
    pretrained: bool = False           # continue from timm's weights instead of random ones
    model_kwargs: dict = field(default_factory=dict)  # extra timm.create_model arguments
    img_size: Optional[int] = None     # default: the model's pretrained_cfg
    mean: Optional[tuple] = None       # input normalisation mean; default: the model's
    std: Optional[tuple] = None        # input normalisation std; default: the model's
    crop_pct: Optional[float] = None   # evaluation (kNN monitor, and the export's preprocessing)
    interpolation: Optional[str] = None  # bilinear | bicubic | ... (evaluation and export)
    batch_size: int = 256              # images per step (two views each)
    lr: float = 0.03                   # learning rate
    opt: str = "momentum"              # timm optimiser name
    weight_decay: float = 1e-4         # L2 weight decay
    momentum: float = 0.9              # SGD momentum
    filter_bias_and_bn: bool = False   # MoCo decays every parameter
    sched: str = "cosine"              # timm lr schedule, stepped every optimiser step
    epochs: int = 200                  # length of the run, in epochs of steps_per_epoch steps
    steps_per_epoch: Optional[int] = None  # default: one pass over the images
    warmup_epochs: int = 0             # linear lr warm-up from warmup_lr
    warmup_lr: float = 1e-5            # lr at the start of the warm-up
    min_lr: float = 0.0                # lr the schedule ends at
    clip_grad: Optional[float] = None  # clip the gradient norm to this value (default: no clipping)
    amp: bool = False                  # mixed precision autocast (amp_dtype)
    amp_dtype: str = "float16"         # on CUDA: float16 (with a gradient scaler) or bfloat16; CPU uses bfloat16
    channels_last: bool = False        # NHWC memory format
    workers: int = 2                   # data loader processes
    pin_memory: bool = False           # pinned host memory for loader batches (CUDA)
    seed: int = 0                      # seed of the run: initialisation, sampling order and random views
    deterministic: bool = False        # deterministic torch algorithms, for this run only
    log_interval: int = 20             # steps between metric rows
    output: str = "runs"               # folder that holds the run folders
    experiment: Optional[str] = None   # run folder name (default: recipe name and time); fixed for --resume auto
    device: Optional[str] = None       # cpu, cuda, cuda:1 ... (default: cuda when available)
    moco: MoCoConfig = field(default_factory=MoCoConfig)
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    knn: KNNConfig = field(default_factory=KNNConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _closest(key: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else f"; valid keys: {', '.join(sorted(valid))}"


def _coerce(path: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against a field type; ints are accepted for floats, lists for tuples."""
    if hint is Any:  # checked by validate()
        return value
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(path, value, args[0])
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # YAML 1.1 (PyYAML) reads 1e-4 as a string: it needs a dot (1.0e-4). Accept the usual spelling.
        try:
            return float(value)
        except ValueError:
            pass
    if hint is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    if hint in (bool, int, str, dict) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{path} must be {getattr(hint, '__name__', hint)}, got {value!r} ({type(value).__name__})")


def _build(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'recipe'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"unknown recipe key {prefix + str(key)!r}{_closest(str(key), names)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value or {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(prefix + key, value, hint)
    return cls(**kwargs)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {p!r} is not a section")
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``dpl.tau=0.5`` -> ``("dpl.tau", 0.5)``; the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. dpl.tau=0.5")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def validate(cfg: TrainConfig) -> TrainConfig:
    """Cross-field checks that types alone cannot express."""
    d = cfg.dpl
    if d.method not in METHODS:
        raise ConfigError(f"dpl.method must be one of {', '.join(METHODS)}, got {d.method!r}{_closest(d.method, list(METHODS))}")
    checks = [
        ("dpl.tau", d.tau >= 0), ("dpl.threshold", 0 <= d.threshold <= 1), ("dpl.mu", d.mu >= 1),
        ("dpl.qhat_momentum", 0 <= d.qhat_momentum < 1), ("dpl.lambda_u", d.lambda_u >= 0),
        ("dpl.threshold_momentum", 0 <= d.threshold_momentum < 1),
        ("dpl.lambda_cld", d.lambda_cld >= 0), ("dpl.clip_threshold", 0 <= d.clip_threshold <= 1),
        ("batch_size", cfg.batch_size >= 1), ("epochs", cfg.epochs >= 1), ("lr", cfg.lr > 0),
        ("model_ema_decay", 0 <= cfg.model_ema_decay < 1), ("workers", cfg.workers >= 0),
        ("eval_interval", cfg.eval_interval >= 1), ("log_interval", cfg.log_interval >= 1),
        ("warmup_epochs", 0 <= cfg.warmup_epochs < cfg.epochs or cfg.warmup_epochs == 0),
        ("data.val_fraction", 0 < cfg.data.val_fraction < 1),
    ]
    for name, ok in checks:
        if not ok:
            raise ConfigError(f"{name} is out of range ({_lookup(cfg, name)!r}); see the comments in dpl_zoo/config.py")
    for name in ("tau_pl", "tau_margin"):
        value = getattr(d, name)
        if value is not None and value < 0:
            raise ConfigError(f"dpl.{name} must be >= 0, got {value}")
    _validate_start(cfg)
    _validate_transfer(cfg)
    _validate_target_prior(d.target_prior)
    if d.threshold_mode not in THRESHOLD_MODES:
        raise ConfigError(f"dpl.threshold_mode must be one of {', '.join(THRESHOLD_MODES)}, got "
                          f"{d.threshold_mode!r}{_closest(d.threshold_mode, list(THRESHOLD_MODES))}")
    if d.estimate_start not in ("uniform", "labeled"):
        raise ConfigError(f"dpl.estimate_start must be uniform or labeled, got {d.estimate_start!r}")
    if not 0.0 <= d.estimate_momentum < 1.0:
        raise ConfigError(f"dpl.estimate_momentum must be in [0, 1), got {d.estimate_momentum!r}")
    if d.estimate_warmup < 0 or (d.estimate_min_accepted is not None and d.estimate_min_accepted < 0):
        raise ConfigError("dpl.estimate_warmup and dpl.estimate_min_accepted must be >= 0")
    if cfg.data.augment_on not in AUGMENT_ON:
        raise ConfigError(f"data.augment_on must be one of {', '.join(AUGMENT_ON)}, got {cfg.data.augment_on!r}")
    if cfg.amp_dtype not in ("float16", "bfloat16"):
        raise ConfigError(f"amp_dtype must be float16 or bfloat16, got {cfg.amp_dtype!r}")
    if cfg.layer_decay is not None and not 0 < cfg.layer_decay <= 1:
        raise ConfigError(f"layer_decay must be in (0, 1] (e.g. 0.75 for a ViT), got {cfg.layer_decay}")
    if cfg.crop_pct is not None and not 0 < cfg.crop_pct <= 1:
        raise ConfigError(f"crop_pct must be in (0, 1] (0.875: resize 256, crop 224), got {cfg.crop_pct}")
    if cfg.interpolation is not None and cfg.interpolation not in INTERPOLATIONS:
        raise ConfigError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {cfg.interpolation!r}")
    if cfg.steps_per_epoch is not None and cfg.steps_per_epoch < 1:
        raise ConfigError(f"steps_per_epoch must be >= 1, got {cfg.steps_per_epoch}")
    data = cfg.data
    if data.labels_from not in ("human", "teacher"):
        raise ConfigError(f"data.labels_from must be human or teacher, got {data.labels_from!r}")
    if data.labels_from == "teacher" and not data.teacher_predictions:
        raise ConfigError("data.labels_from: teacher needs data.teacher_predictions (see `dpl-zoo pseudo-label`)")
    budgets = [data.labels_per_class is not None, data.label_fraction is not None, data.labeled_csv is not None]
    if data.labels_from == "teacher" and any(budgets):
        raise ConfigError("zero-shot (data.labels_from: teacher) takes no human label budget; remove "
                          "data.labels_per_class / label_fraction / labeled_csv")
    if sum(budgets) > 1:
        raise ConfigError("give one of data.labels_per_class, data.label_fraction, data.labeled_csv, not several")
    if data.long_tail_ratio is not None and (data.long_tail_ratio < 1 or not data.long_tail_max
                                             or data.long_tail_max < 1):
        raise ConfigError("data.long_tail_ratio must be >= 1 and comes with data.long_tail_max (the head class size)")
    if data.label_fraction is not None and not 0 < data.label_fraction <= 1:
        raise ConfigError(f"data.label_fraction must be in (0, 1], got {data.label_fraction}")
    if data.labels_per_class is not None and data.labels_per_class < 1:
        raise ConfigError(f"data.labels_per_class must be >= 1, got {data.labels_per_class}")
    if cfg.dpl.method == "fixmatch" and (d.tau, d.tau_pl, d.tau_margin) != (0.0, None, None):
        # FixMatch is DebiasPL at tau = 0: one code path, so baselines are fair by construction
        cfg.dpl.tau, cfg.dpl.tau_pl, cfg.dpl.tau_margin = 0.0, None, None
    return cfg


# where the reference ResNet-50 recipes start from (the authors' scripts, METHOD.md). Its sha256 is not
# pinned (initial_checkpoint_sha256): no copy could be downloaded where dpl-zoo was written (no network) and
# none is published; a cached download is still removed when it cannot be read.
MOCO_EMAN_URL = "https://eman-cvpr.s3.amazonaws.com/models/res50_moco_eman_800ep.pth.tar"


def _validate_start(cfg: TrainConfig) -> None:
    pinned = cfg.initial_checkpoint_sha256
    if pinned is not None and not re.fullmatch(r"[0-9a-f]{64}", str(pinned)):
        raise ConfigError(f"initial_checkpoint_sha256 {pinned!r} is not a sha256: 64 lowercase hex digits "
                          f"(sha256sum FILE prints it)")
    if pinned is not None and not cfg.initial_checkpoint:
        raise ConfigError("initial_checkpoint_sha256 is set without an initial_checkpoint to check")
    if not cfg.initial_checkpoint_required or cfg.initial_checkpoint or cfg.pretrained or cfg.from_scratch:
        return
    raise ConfigError(
        f"this recipe fine-tunes from a self-supervised start and has no initial_checkpoint. For ResNet-50 the "
        f"reference start is MoCo-EMAN (800 epochs, licence CC-BY-NC-4.0): --set initial_checkpoint={MOCO_EMAN_URL} "
        f"(downloaded once into the dpl-zoo cache) or a local copy of that file (its module.encoder_q.* keys are "
        f"mapped onto timm's resnet50). To train from random weights instead, --set from_scratch=true")


def _validate_transfer(cfg: TrainConfig) -> None:
    f = cfg.freeze
    if f == 0:
        cfg.freeze = f = None
    if not (f is None or f == "backbone" or (isinstance(f, int) and not isinstance(f, bool) and f > 0)):
        raise ConfigError(f"freeze must be backbone or a number of leading stages (1 = the stem), got {f!r}")
    if cfg.backbone_lr_scale is not None and not cfg.backbone_lr_scale > 0:
        raise ConfigError(f"backbone_lr_scale must be > 0 (e.g. 0.1), got {cfg.backbone_lr_scale}")
    if cfg.head_hidden_size is not None and cfg.head_hidden_size < 1:
        raise ConfigError(f"head_hidden_size must be >= 1, got {cfg.head_hidden_size}")
    k = cfg.data.cached_views
    if k is not None:
        if k < 1:
            raise ConfigError(f"data.cached_views must be >= 1, got {k}")
        if f is None:
            raise ConfigError("data.cached_views caches the output of frozen layers: set freeze (backbone, or a "
                              "number of stages) too")
        if cfg.dpl.multiviews and k < 2:
            raise ConfigError("dpl.multiviews draws two weak and two strong views: data.cached_views must be >= 2")
    if cfg.data.unlabeled_max is not None and cfg.data.unlabeled_max < 1:
        raise ConfigError(f"data.unlabeled_max must be >= 1, got {cfg.data.unlabeled_max}")


def _validate_target_prior(value: Any) -> None:
    if value in ("uniform", "labeled", "estimated"):
        return
    if isinstance(value, (list, tuple)):
        if not value or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value):
            raise ConfigError(f"dpl.target_prior as a list must hold one positive number per class, got {value!r}")
        return
    if isinstance(value, str):
        if not Path(value).is_file():
            raise ConfigError(f"dpl.target_prior {value!r} is neither uniform, labeled, estimated nor an existing file of "
                              f"class weights (one number per class, whitespace or comma separated)")
        return
    raise ConfigError(f"dpl.target_prior must be uniform, labeled, estimated, a list of numbers or a file, "
                      f"got {value!r}")


def _lookup(cfg: TrainConfig, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def validate_pretrain(cfg: PretrainConfig) -> PretrainConfig:
    """Cross-field checks of a pretraining config."""
    m, d, k = cfg.moco, cfg.data, cfg.knn
    checks = [
        ("moco.dim", m.dim >= 1), ("moco.hidden", m.hidden is None or m.hidden >= 1),
        ("moco.queue_size", m.queue_size >= 1), ("moco.temperature", m.temperature > 0),
        ("moco.momentum", 0 <= m.momentum < 1), ("batch_size", cfg.batch_size >= 1), ("epochs", cfg.epochs >= 1),
        ("lr", cfg.lr > 0), ("workers", cfg.workers >= 0), ("log_interval", cfg.log_interval >= 1),
        ("warmup_epochs", 0 <= cfg.warmup_epochs < cfg.epochs or cfg.warmup_epochs == 0),
        ("steps_per_epoch", cfg.steps_per_epoch is None or cfg.steps_per_epoch >= 1),
        ("data.val_fraction", 0 < d.val_fraction < 1),
        ("data.unlabeled_max", d.unlabeled_max is None or d.unlabeled_max >= 1),
        ("data.hflip", 0 <= d.hflip <= 1), ("data.color_jitter_p", 0 <= d.color_jitter_p <= 1),
        ("data.grayscale_p", 0 <= d.grayscale_p <= 1), ("data.blur_p", 0 <= d.blur_p <= 1),
        ("data.scale", len(d.scale) == 2 and 0 < d.scale[0] <= d.scale[1] <= 1),
        ("data.ratio", len(d.ratio) == 2 and 0 < d.ratio[0] <= d.ratio[1]),
        ("data.color_jitter", len(d.color_jitter) == 4 and all(v >= 0 for v in d.color_jitter)
         and d.color_jitter[3] <= 0.5),
        ("data.blur_sigma", len(d.blur_sigma) == 2 and 0 < d.blur_sigma[0] <= d.blur_sigma[1]),
        ("knn.k", k.k >= 1), ("knn.temperature", k.temperature > 0), ("knn.interval", k.interval >= 1),
        ("knn.bank_max", k.bank_max is None or k.bank_max >= 1), ("knn.val_max", k.val_max is None or k.val_max >= 1),
    ]
    for name, ok in checks:
        if not ok:
            raise ConfigError(f"{name} is out of range ({_lookup(cfg, name)!r}); see the comments in dpl_zoo/config.py")
    if cfg.amp_dtype not in ("float16", "bfloat16"):
        raise ConfigError(f"amp_dtype must be float16 or bfloat16, got {cfg.amp_dtype!r}")
    if cfg.crop_pct is not None and not 0 < cfg.crop_pct <= 1:
        raise ConfigError(f"crop_pct must be in (0, 1] (0.875: resize 256, crop 224), got {cfg.crop_pct}")
    if cfg.interpolation is not None and cfg.interpolation not in INTERPOLATIONS:
        raise ConfigError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {cfg.interpolation!r}")
    return cfg


def load_pretrain_config(recipe: Optional[str] = None, overrides: Optional[list[str]] = None) -> PretrainConfig:
    """A pretraining recipe (None: the defaults, e.g. ``pretrain_moco``) plus ``key=value`` overrides."""
    return validate_pretrain(_build(PretrainConfig, _recipe_tree(recipe, overrides)))


def pretrain_config_from_dict(tree: dict) -> PretrainConfig:
    return validate_pretrain(_build(PretrainConfig, tree))


def recipe_dir() -> Path:
    """The shipped recipes (the top-level ``recipes/`` folder, installed as ``dpl_zoo.recipes``)."""
    from . import recipes
    return Path(recipes.__path__[0])


def resolve_recipe_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = recipe_dir() / (name_or_path if name_or_path.endswith(".yaml") else f"{name_or_path}.yaml")
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in recipe_dir().glob("*.yaml"))
    raise ConfigError(f"no recipe file {name_or_path!r} and no shipped recipe of that name{_closest(path.stem, names)} "
                      f"(shipped: {', '.join(names)})")


def _recipe_tree(recipe: Optional[str], overrides: Optional[list[str]]) -> dict:
    """A recipe file or shipped recipe name (None: empty) with ``key=value`` overrides applied."""
    tree: dict = {}
    if recipe is not None:
        path = resolve_recipe_path(recipe)
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from e
        if not isinstance(tree, dict):
            raise ConfigError(f"{path} must hold a mapping of recipe keys, got {type(tree).__name__}")
    for item in overrides or []:
        key, value = parse_override(item)
        _set_path(tree, key, value)
    return tree


def load_config(recipe: Optional[str] = None, overrides: Optional[list[str]] = None) -> TrainConfig:
    """Recipe file or shipped recipe name (None: the built-in defaults) plus ``key=value`` overrides."""
    tree = _recipe_tree(recipe, overrides)
    if "moco" in tree:
        raise ConfigError(f"{recipe} is a pretraining recipe (it has a moco section): run it with "
                          f"`dpl-zoo pretrain {recipe}`, and fine-tune from its export with `dpl-zoo train`")
    return validate(_build(TrainConfig, tree))


def config_from_dict(tree: dict) -> TrainConfig:
    """A config saved with a run (``config.yaml`` or a checkpoint's ``config``), validated again."""
    return validate(_build(TrainConfig, tree))


def save_config(cfg, path: Path) -> None:
    path.write_text(yaml.safe_dump(_plain(cfg.to_dict()), sort_keys=False))


# the config sections (dataclasses) whose keys are compared one by one; other dicts (model_kwargs) whole
SECTIONS = ("dpl", "data", "moco", "knn")


def flatten(tree: dict, prefix: str = "") -> dict:
    """A config dict with dotted keys (``dpl.tau``, ``data.root``): what resume rules and run
    comparisons name."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key in SECTIONS:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
