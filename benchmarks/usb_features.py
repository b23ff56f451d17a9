"""USB 0.3.2's imbalanced-SSL algorithms (ABC, DASO, DARP, CReST; FixMatch as their base) trained as
a linear head on cached backbone features, for the benchmarks whose backbone is frozen.

USB's own algorithm objects run: ``semilearn``'s ``get_imb_algorithm`` / ``get_algorithm`` build
them from a USB argument namespace, and USB's own ``train()`` loop runs them with all their hooks
(parameter update, EMA, distribution alignment, DASO's and DARP's pseudo-labelling hooks, CReST's
generations and re-labelling). What is replaced is what touches images: USB's ``get_dataset`` and
``get_data_loader`` (in the modules that call them) give datasets and loaders over the cached
features, and USB's network is a linear head. Checkpoint writing is switched off.

The features file (``.npz``):

    labeled_x        float32 (n_l, K, D)   K cached weak views of each labeled image
    labeled_y        int64   (n_l,)
    unlabeled_weak   float32 (n_u, K, D)   K cached weak views of each unlabeled image
    unlabeled_strong float32 (n_u, K, D)   K cached strong views (K may differ from the weak K)
    unlabeled_y      int64   (n_u,)        diagnostics only (pseudo-label accuracy); never trained on
    test_x           float32 (n_t, D)
    test_y           int64   (n_t,)
    num_classes      int

Each training step draws, for each image of the batch, one of its cached views at random (weak and
strong independently); images are drawn as USB's RandomSampler does (concatenated permutations of
the set), from a generator seeded with the run's seed. Evaluation loaders use view 0.

The net: ``nn.Linear(D, C)`` with PyTorch's default initialisation (kaiming-uniform weight with
a = sqrt(5), uniform bias in +-1/sqrt(D)) after ``torch.manual_seed(seed)``; its forward returns
USB's ``{'logits', 'feat'}`` with ``feat`` the input features (the feature extractor is the
identity), and honours USB's ``only_fc`` / ``only_feat``; ``num_features`` = D (ABC's auxiliary
head and DASO's prototype queue read it). It is wrapped in ``nn.DataParallel`` as USB's
``send_model_cuda`` does with ``gpu: None`` (USB's CIFAR-LT configs; ABC reaches its auxiliary
head through ``model.module``); on the CPU DataParallel calls the module directly.

Run in USB's environment (the wheels ``usb_peer.py --prepare`` downloads, installed into a site
folder that only this process puts on its path; USB's unneeded imports stubbed and its CUDA calls
run on the CPU, as in ``usb_peer.py``):

    python benchmarks/usb_features.py --features F.npz --algorithm abc --seed 0 --out R.json
    python benchmarks/usb_features.py --synthetic F.npz          # a synthetic features file

:func:`command` builds that command line for a benchmark.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SITE = ROOT / ".gpu" / "usb" / "site-features"
ALGORITHMS = ("abc", "daso", "darp", "crest", "crest+", "fixmatch")
# settings the benchmark shares with this project's arms (CLI flags with these defaults)
SHARED = dict(steps=1000, batch=32, mu=7, lr=0.03, weight_decay=0.05, momentum=0.9, ema=0.99, threshold=0.7)
# USB's CIFAR-10-LT configs (config/classic_cv_imb/fixmatch_<alg>/..._cifar10_lb1500_100_ulb3000_100_0.yaml):
# their schedule, which the iteration- and epoch-counted settings below are scaled from
USB_ITERS, USB_EPOCHS = 262144, 256              # ABC, DASO, DARP
CREST_ITERS_PER_GEN, CREST_EPOCHS_PER_GEN = 65536, 128
DEFAULTS = {  # each algorithm's own settings, from those configs
    "abc": dict(abc_p_cutoff=0.95, abc_loss_ratio=1.0),
    "daso": dict(daso_queue_len=256, daso_T_proto=0.05, daso_T_dist=1.5, daso_interp_alpha=0.5,
                 daso_with_dist_aware=True, daso_assign_loss_ratio=1.0,
                 daso_num_pl_dist_iter=100, daso_num_pretrain_iter=5120),   # the last two scaled, see below
    "darp": dict(darp_warmup_epochs=200, darp_alpha=2.0, darp_iter_T=10, darp_num_refine_iter=10),
    "crest": dict(crest_num_gens=6, crest_pro_dist_align=False, crest_alpha=3.0, crest_dist_align_t=0.5),
    "crest+": dict(crest_num_gens=6, crest_pro_dist_align=True, crest_alpha=3.0, crest_dist_align_t=0.5),
    "fixmatch": {},
}
KEYS = ("labeled_x", "labeled_y", "unlabeled_weak", "unlabeled_strong", "unlabeled_y", "test_x", "test_y",
        "num_classes")


def command(features, algorithm: str, seed: int, out, *, steps: int = SHARED["steps"], batch: int = SHARED["batch"],
            mu: int = SHARED["mu"], lr: float = SHARED["lr"], weight_decay: float = SHARED["weight_decay"],
            momentum: float = SHARED["momentum"], ema: float = SHARED["ema"],
            threshold: float = SHARED["threshold"], schedule: str = "usb", threads: int = 1, site=None,
            wheels=None, python: str | None = None, extra: tuple = ()) -> list[str]:
    """The command line that trains USB's ``algorithm`` (abc, daso, darp, crest, crest+ or
    fixmatch) as a linear head on the features file ``features`` with ``seed`` and writes its
    result JSON to ``out``. Keyword arguments are the shared settings (this project's arms use the
    same defaults); ``schedule`` 'usb' keeps USB's (constant learning rate for its imbalanced
    algorithms, cosine for plain FixMatch), 'cosine' or 'constant' force one; ``site`` and
    ``wheels`` locate USB's environment (defaults: ``.gpu/usb/site-features`` and
    ``usb_peer.py``'s wheel folder); ``extra`` adds raw flags (e.g. ``('--daso-pretrain-iter',
    '50')``). Run it with ``subprocess.run(cmd, cwd=<repository root>)``; the process sets up USB's
    environment itself (installing the wheels into ``site`` once, under a lock, so side-by-side
    processes may share one site)."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm {algorithm!r}: one of {', '.join(ALGORITHMS)}")
    cmd = [python or sys.executable, str(Path(__file__).resolve()), "--features", str(features),
           "--algorithm", algorithm, "--seed", str(seed), "--out", str(out), "--steps", str(steps),
           "--batch", str(batch), "--mu", str(mu), "--lr", repr(lr), "--weight-decay", repr(weight_decay),
           "--momentum", repr(momentum), "--ema", repr(ema), "--threshold", repr(threshold),
           "--schedule", schedule, "--threads", str(threads)]
    if site is not None:
        cmd += ["--site", str(site)]
    if wheels is not None:
        cmd += ["--wheels", str(wheels)]
    return cmd + [str(e) for e in extra]


def jobs_command(jobs_file, *, threads: int = 1, site=None, wheels=None, python: str | None = None) -> list[str]:
    """The command line that runs several runs one after the other in one process (USB's import,
    about 5-10 s, paid once). ``jobs_file`` is a JSON list of objects, one a run, whose keys are
    :func:`command`'s argument names: ``features``, ``algorithm``, ``seed``, ``out`` and any of
    the shared settings or other flags (dashes as underscores, e.g. ``daso_pretrain_iter``);
    a run whose ``out`` already holds an ``ok`` result made with the same settings and features file
    (:func:`request`) is not run again."""
    cmd = [python or sys.executable, str(Path(__file__).resolve()), "--jobs", str(jobs_file), "--threads", str(threads)]
    if site is not None:
        cmd += ["--site", str(site)]
    if wheels is not None:
        cmd += ["--wheels", str(wheels)]
    return cmd


# --- the features file -----------------------------------------------------------------------------

def load_features(path) -> dict:
    """The features file, checked against the contract above."""
    import numpy as np
    with np.load(path) as z:
        missing = [k for k in KEYS if k not in z.files]
        if missing:
            raise ValueError(f"{path}: missing {', '.join(missing)}")
        d = {k: z[k] for k in KEYS}
    d["num_classes"] = int(d["num_classes"])
    for k in ("labeled_x", "unlabeled_weak", "unlabeled_strong"):
        if d[k].ndim != 3:
            raise ValueError(f"{path}: {k} must be (n, K, D), is {d[k].shape}")
        d[k] = np.ascontiguousarray(d[k], dtype=np.float32)
    if d["test_x"].ndim != 2:
        raise ValueError(f"{path}: test_x must be (n, D), is {d['test_x'].shape}")
    d["test_x"] = np.ascontiguousarray(d["test_x"], dtype=np.float32)
    dims = {d[k].shape[-1] for k in ("labeled_x", "unlabeled_weak", "unlabeled_strong", "test_x")}
    if len(dims) != 1:
        raise ValueError(f"{path}: feature widths differ: {sorted(dims)}")
    for x, y in (("labeled_x", "labeled_y"), ("unlabeled_weak", "unlabeled_y"), ("unlabeled_strong", "unlabeled_y"),
                 ("test_x", "test_y")):
        if len(d[x]) != len(d[y]):
            raise ValueError(f"{path}: {x} has {len(d[x])} rows, {y} {len(d[y])}")
    for y in ("labeled_y", "unlabeled_y", "test_y"):
        d[y] = d[y].astype(np.int64)
        if len(d[y]) and (d[y].min() < 0 or d[y].max() >= d["num_classes"]):
            raise ValueError(f"{path}: {y} outside 0..{d['num_classes'] - 1}")
    return d


_LAST = {}


def _cached_features(path) -> dict:
    """load_features, the last file kept (a jobs file runs several algorithms on one file)."""
    key = (str(Path(path).resolve()), Path(path).stat().st_mtime_ns)
    if key not in _LAST:
        _LAST.clear()
        _LAST[key] = load_features(path)
    return _LAST[key]


def synthetic_features(path, n_l: int = 60, n_u: int = 200, n_t: int = 90, dim: int = 16, classes: int = 3,
                       views: int = 2, imbalance: float = 10.0, seed: int = 0) -> Path:
    """A features file of Gaussian blobs: labeled and unlabeled long-tailed (class 0 the most
    frequent, ratio ``imbalance``; as in USB's CIFAR-LT, whose CReST relies on that order), test
    balanced; views are the class mean plus noise (strong views noisier)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 1, (classes, dim)).astype(np.float32) * 1.5
    share = imbalance ** (-np.arange(classes) / max(classes - 1, 1))
    share = share / share.sum()

    def labels(n, p):
        counts = np.maximum(1, np.floor(p * n)).astype(int)
        counts[0] += n - counts.sum()
        return rng.permutation(np.repeat(np.arange(classes), counts))

    def feats(y, k, noise):
        base = means[y] + rng.normal(0, 1, (len(y), dim)).astype(np.float32)   # the image
        if k is None:
            return base.astype(np.float32)
        return (base[:, None, :] + noise * rng.normal(0, 1, (len(y), k, dim))).astype(np.float32)

    yl, yu, yt = labels(n_l, share), labels(n_u, share), np.repeat(np.arange(classes), n_t // classes)
    base_u = means[yu] + rng.normal(0, 1, (n_u, dim))
    weak = (base_u[:, None, :] + 0.3 * rng.normal(0, 1, (n_u, views, dim))).astype(np.float32)
    strong = (base_u[:, None, :] + 1.0 * rng.normal(0, 1, (n_u, views, dim))).astype(np.float32)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, labeled_x=feats(yl, views, 0.3), labeled_y=yl.astype(np.int64), unlabeled_weak=weak,
             unlabeled_strong=strong, unlabeled_y=yu.astype(np.int64), test_x=feats(yt, None, 0),
             test_y=yt.astype(np.int64), num_classes=np.int64(classes))
    return path


# --- USB's settings ----------------------------------------------------------------------------------

def _closest_divisor(n: int, target: int) -> int:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return min(divisors, key=lambda d: (abs(d - target), -d))


def usb_settings(args, data: dict) -> dict:
    """USB's argument namespace (``semilearn.lighting.config.get_config`` adds the defaults of
    everything not named). Iteration- and epoch-counted settings are scaled from USB's
    CIFAR-10-LT schedule to this budget, keeping their share of training."""
    import numpy as np
    alg = args.algorithm
    crest = alg.startswith("crest")
    own = dict(DEFAULTS[alg])
    if crest:
        gens = int(args.crest_gens if getattr(args, "crest_gens", None) is not None else own["crest_num_gens"])
        iters = args.steps // gens               # the budget shared by the generations
        if iters < 1:
            raise ValueError(f"CReST: {args.steps} steps cannot feed {gens} generations")
        epochs = _closest_divisor(iters, CREST_EPOCHS_PER_GEN)
    else:
        iters = args.steps
        epochs = _closest_divisor(iters, USB_EPOCHS)
    if alg == "darp":
        own["darp_warmup_epochs"] = int(round(own["darp_warmup_epochs"] * epochs / USB_EPOCHS))
    if alg == "daso":
        pretrain = max(2, int(round(own["daso_num_pretrain_iter"] * iters / USB_ITERS)))
        own["daso_num_pretrain_iter"] = pretrain
        # USB's pseudo-label histogram window (100 iterations) holds 51 windows before DASO starts;
        # here the window is half the scaled warm-up, so the histogram exists when DASO starts
        own["daso_num_pl_dist_iter"] = max(1, pretrain // 2)
    for flag, key in (("daso_pretrain_iter", "daso_num_pretrain_iter"), ("daso_pl_dist_iter", "daso_num_pl_dist_iter"),
                      ("darp_warmup_epochs", "darp_warmup_epochs"), ("abc_p_cutoff", "abc_p_cutoff"),
                      ("crest_gens", "crest_num_gens")):
        if getattr(args, flag, None) is not None and key in own:
            own[key] = getattr(args, flag)
    if crest and own["crest_num_gens"] != DEFAULTS[alg]["crest_num_gens"]:
        iters = args.steps // int(own["crest_num_gens"])
        epochs = _closest_divisor(iters, CREST_EPOCHS_PER_GEN)
    counts = np.bincount(data["labeled_y"], minlength=data["num_classes"])
    ucounts = np.bincount(data["unlabeled_y"], minlength=data["num_classes"])
    return {
        "algorithm": "fixmatch", "imb_algorithm": None if alg == "fixmatch" else alg,
        "net": "linear_head", "use_pretrain": False, "pretrain_path": "", "dataset": "cached_features",
        "num_classes": data["num_classes"], "num_labels": len(data["labeled_y"]),
        "batch_size": args.batch, "uratio": args.mu, "eval_batch_size": 1024,
        "epoch": epochs, "num_train_iter": iters, "num_eval_iter": iters, "num_log_iter": iters,
        "num_warmup_iter": 0, "optim": "SGD", "lr": args.lr, "momentum": args.momentum,
        "weight_decay": args.weight_decay, "layer_decay": 1.0, "ema_m": args.ema, "ulb_loss_ratio": 1.0,
        "p_cutoff": args.threshold, "hard_label": True, "T": 0.5, "amp": False, "use_cat": True,
        "clip_grad": 0.0, "num_workers": 0, "train_sampler": "RandomSampler", "seed": args.seed, "gpu": None,
        "distributed": False, "world_size": 1, "rank": 0, "multiprocessing_distributed": False,
        "include_lb_to_ulb": False, "save_dir": "unused", "save_name": f"usb_features-{alg}-s{args.seed}",
        "resume": False, "overwrite": True, "use_tensorboard": False, "use_wandb": False, "use_aim": False,
        "lb_imb_ratio": int(round(counts.max() / max(counts.min(), 1))),
        "ulb_imb_ratio": int(round(ucounts.max() / max(ucounts.min(), 1))), "ulb_num_labels": len(ucounts),
        **own,
    }


# --- USB's environment -------------------------------------------------------------------------------

_ENVIRONMENT = None


def usb_environment(site: Path, wheels: Path) -> None:
    """As usb_peer's worker: USB's wheels installed into ``site`` (once, under a lock), put first
    on the path, USB's unneeded imports stubbed and its CUDA calls run on the CPU."""
    import fcntl

    import numpy as np
    import torch
    global _ENVIRONMENT
    if _ENVIRONMENT is not None:
        if _ENVIRONMENT != (site, wheels):
            raise RuntimeError(f"USB's environment is already {_ENVIRONMENT} in this process")
        return
    _ENVIRONMENT = (site, wheels)
    sys.path.insert(0, str(HERE))
    from usb_peer import install
    from usb_runner import emulate_cuda_on_cpu, install_stubs
    site.mkdir(parents=True, exist_ok=True)
    with open(site.parent / f".{site.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        install(wheels, site)
    sys.path.insert(0, str(site))
    install_stubs()
    emulate_cuda_on_cpu()
    # also on a machine with a GPU: USB's DataParallel must see no CUDA device, or it would scatter
    # the batch to GPUs while the model stays on the CPU
    torch.cuda.is_available = lambda: False
    if not hasattr(np, "math"):   # CReST's get_split calls np.math.pow, gone in NumPy 2
        np.math = math


class FeatureSet:
    """What USB reads from a dataset: ``data`` (weak views, (n, K, D)), ``targets``, ``is_ulb``,
    plus ``strong`` for the unlabeled set. Copies share the arrays (CReST deep-copies the
    unlabeled set and assigns new arrays; it never writes into them)."""

    def __init__(self, data, targets, strong=None, is_ulb=False):
        self.data, self.targets, self.strong, self.is_ulb = data, targets, strong, is_ulb

    def __len__(self):
        return len(self.data)

    def __deepcopy__(self, memo):
        return copy.copy(self)


class FeatureLoader:
    """One epoch of batches per iteration, like USB's loaders: training loaders draw
    ``steps_per_epoch`` batches of concatenated permutations of the set, each image one random
    cached view (weak and strong independently); evaluation loaders go through the set in order
    with view 0."""

    def __init__(self, dset: FeatureSet, batch_size: int, rng, steps_per_epoch: int | None):
        self.dset, self.batch_size, self.rng, self.steps = dset, batch_size, rng, steps_per_epoch

    def __len__(self):
        return self.steps if self.steps is not None else math.ceil(len(self.dset) / self.batch_size)

    def _views(self, x, idx, random):
        import numpy as np
        import torch
        if random:
            v = self.rng.integers(0, x.shape[1], size=len(idx))
        else:
            v = np.zeros(len(idx), dtype=np.int64)
        return torch.from_numpy(x[idx, v])

    def __iter__(self):
        import numpy as np
        import torch
        d = self.dset
        if self.steps is None:
            for s in range(0, len(d), self.batch_size):
                idx = np.arange(s, min(s + self.batch_size, len(d)))
                yield {"idx_lb": torch.from_numpy(idx), "x_lb": self._views(d.data, idx, False),
                       "y_lb": torch.from_numpy(np.asarray(d.targets)[idx].astype(np.int64))}
            return
        total, n = self.steps * self.batch_size, len(d)
        order = np.concatenate([self.rng.permutation(n) for _ in range(total // n)]
                               + [self.rng.permutation(n)[:total % n]])
        for s in range(self.steps):
            idx = order[s * self.batch_size:(s + 1) * self.batch_size]
            if d.is_ulb:
                yield {"idx_ulb": torch.from_numpy(idx), "x_ulb_w": self._views(d.data, idx, True),
                       "x_ulb_s": self._views(d.strong, idx, True)}
            else:
                yield {"idx_lb": torch.from_numpy(idx), "x_lb": self._views(d.data, idx, True),
                       "y_lb": torch.from_numpy(np.asarray(d.targets)[idx].astype(np.int64))}


def linear_head_builder(dim: int):
    """USB's ``net_builder``: a linear head whose forward returns ``{'logits', 'feat'}``."""
    import torch.nn as nn

    class LinearHead(nn.Module):
        def __init__(self, num_classes):
            super().__init__()
            self.num_features = dim
            self.fc = nn.Linear(dim, num_classes)   # PyTorch's default (kaiming-uniform) init

        def forward(self, x, only_fc=False, only_feat=False, **kwargs):
            if only_fc:
                return self.fc(x)
            if only_feat:
                return x
            return {"logits": self.fc(x), "feat": x}

        def group_matcher(self, coarse=False, prefix=""):
            return dict(stem=r"^{}fc".format(prefix), blocks=[])

    def build(num_classes, pretrained=False, pretrained_path=None, **kwargs):
        return LinearHead(num_classes)
    return build


class FastCosine:
    """``nn.CosineSimilarity(dim=2)`` between (B, 1, D) features and (1, K, D) prototypes as one
    matrix product of normalised rows (equal to 1e-7; PyTorch's broadcast version takes ~70 ms a
    call on one CPU thread for B=224, K=10, D=1280); other shapes go to the original."""

    def __init__(self, original):
        self.original = original

    def __call__(self, a, b):
        import torch.nn.functional as F
        if a.dim() == 3 and b.dim() == 3 and a.shape[1] == 1 and b.shape[0] == 1 and self.original.dim == 2:
            eps = max(self.original.eps, 1e-12)
            return F.normalize(a[:, 0], dim=-1, eps=eps) @ F.normalize(b[0], dim=-1, eps=eps).T
        return self.original(a, b)


# --- one run -----------------------------------------------------------------------------------------

def run(args) -> dict:
    """Train USB's algorithm on the features; the result as a dict."""
    import logging
    import random
    import warnings

    import numpy as np
    import torch
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    t_start, cpu_start = time.perf_counter(), time.process_time()
    data = _cached_features(args.features)
    if args.algorithm.startswith("crest") and data["labeled_x"].shape[1] != data["unlabeled_weak"].shape[1]:
        raise ValueError("CReST moves pseudo-labeled unlabeled images into the labeled set: labeled_x and "
                         "unlabeled_weak must hold the same number of views")
    usb_environment(Path(args.site), Path(args.wheels))
    import semilearn.core.algorithmbase as algorithmbase
    import semilearn.imb_algorithms.crest.crest as crest_module
    from semilearn.algorithms import get_algorithm
    from semilearn.core.utils import get_cosine_schedule_with_warmup
    from semilearn.imb_algorithms import get_imb_algorithm
    from semilearn.lighting.config import get_config

    settings = usb_settings(args, data)
    cfg = get_config(settings)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    def get_dataset(args_, alg, dataset, num_labels, num_classes, data_dir="./data", include_lb_to_ulb=True):
        return {"train_lb": FeatureSet(data["labeled_x"], data["labeled_y"]),
                "train_ulb": FeatureSet(data["unlabeled_weak"], data["unlabeled_y"], data["unlabeled_strong"], True),
                "eval": FeatureSet(data["test_x"][:, None, :], data["test_y"]), "test": None}

    def get_data_loader(args_, dset, batch_size=None, shuffle=False, num_workers=4, pin_memory=False,
                        data_sampler="RandomSampler", num_epochs=None, num_iters=None, generator=None,
                        drop_last=True, distributed=False):
        if data_sampler is None:
            return FeatureLoader(dset, batch_size, rng, None)
        num_epochs = num_epochs or args_.epoch
        num_iters = num_iters or args_.num_train_iter
        return FeatureLoader(dset, batch_size, rng, num_iters // num_epochs)

    def send_model(args_, model, clip_batch=True):   # USB's send_model_cuda with gpu None, on the CPU
        return torch.nn.DataParallel(model)

    for module in (algorithmbase, crest_module):
        module.get_dataset, module.get_data_loader = get_dataset, get_data_loader
    crest_module.send_model_cuda = send_model

    logger = logging.getLogger("usb_features")
    logger.setLevel(logging.INFO if args.verbose else logging.WARNING)
    if args.verbose and not logger.handlers:
        logger.addHandler(logging.StreamHandler(sys.stderr))
    net = linear_head_builder(data["test_x"].shape[1])
    build = get_imb_algorithm if cfg.imb_algorithm else get_algorithm
    quiet = contextlib.ExitStack()
    devnull = quiet.enter_context(open(os.devnull, "w"))
    chatter = sys.stderr if args.verbose else devnull     # USB prints to stdout
    with contextlib.redirect_stdout(chatter):
        alg = build(cfg, net, None, logger)
    alg.model, alg.ema_model = send_model(cfg, alg.model), send_model(cfg, alg.ema_model)   # as USB's train.py
    if hasattr(alg, "similarity_fn"):   # DASO: the same cosine similarities, 10x faster on the CPU
        alg.similarity_fn = FastCosine(alg.similarity_fn)

    real_set_optimizer = alg.set_optimizer

    def set_optimizer():
        optimizer, scheduler = real_set_optimizer()
        if args.schedule == "cosine" and scheduler is None:
            scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.num_train_iter, num_warmup_steps=0)
        elif args.schedule == "constant":
            scheduler = None
        return optimizer, scheduler
    if args.schedule != "usb":
        alg.optimizer, alg.scheduler = set_optimizer()
        alg.set_optimizer = set_optimizer            # CReST builds a new optimizer each generation
    schedule = "cosine (USB's, 7/16 of a cycle)" if alg.scheduler is not None else "constant"
    alg.save_model = lambda *a, **k: None            # no checkpoints
    aside = [0.0]
    real_evaluate = alg.evaluate

    def evaluate(eval_dest="eval", *a, **k):          # test-set evaluations are not training time
        t = time.perf_counter()
        result = real_evaluate(eval_dest, *a, **k)
        if eval_dest == "eval":
            aside[0] += time.perf_counter() - t
        return result
    alg.evaluate = evaluate

    t0, cpu0 = time.perf_counter(), time.process_time()
    with contextlib.redirect_stdout(chatter):
        alg.train()
    seconds, train_cpu = time.perf_counter() - t0, time.process_time() - cpu0
    train_seconds = seconds - aside[0]

    # final evaluation: USB's evaluate (the EMA weights; ABC: its auxiliary, balanced head)
    alg.loader_dict["pl"] = FeatureLoader(FeatureSet(data["unlabeled_weak"], data["unlabeled_y"]), 1024, rng, None)
    with quiet, contextlib.redirect_stdout(devnull):
        test_logits = torch.from_numpy(real_evaluate("eval", return_logits=True)["eval/logits"])
        ulb_logits = torch.from_numpy(real_evaluate("pl", return_logits=True)["pl/logits"])
    C = data["num_classes"]
    pred, y = test_logits.argmax(1).numpy(), data["test_y"]
    per_class = [float(100.0 * (pred[y == c] == c).mean()) if (y == c).any() else None for c in range(C)]
    recalls = [r for r in per_class if r is not None]
    prob = ulb_logits.softmax(1)
    conf, pl = prob.max(1)
    pl = pl.numpy()
    gens = int(settings["crest_num_gens"]) if args.algorithm.startswith("crest") else 1
    steps_total = cfg.num_train_iter * gens
    rows = steps_total * cfg.batch_size * (1 + 2 * cfg.uratio)
    state = {"last_log": {k: float(v) for k, v in (getattr(alg, "log_dict", None) or {}).items()
                          if isinstance(v, (int, float))}}
    if args.algorithm.startswith("crest"):   # the labeled set of the last generation (pseudo-labels added)
        state["crest_last_labeled_hist"] = np.bincount(np.asarray(alg.dataset_dict["train_lb"].targets, dtype=np.int64),
                                                       minlength=C).tolist()
    if args.algorithm == "darp":
        hook = alg.hooks_dict["PseudoLabelingHook"]
        state["darp_refined"] = bool((hook.pseudo_refine != 1.0 / C).any())
        state["darp_refined_hist"] = np.bincount(hook.pseudo_refine.argmax(1).numpy(), minlength=C).tolist()
    if args.algorithm == "daso":
        state["daso_pl_dist"] = [float(v) for v in alg.hooks_dict["PseudoLabelingHook"].get_pl_dist()]
    return {
        "algorithm": args.algorithm, "library": "usb", "usb_algorithm": cfg.imb_algorithm or cfg.algorithm,
        "usb_base": cfg.algorithm, "seed": args.seed, "status": "ok", "features": str(args.features),
        "evaluated": "EMA weights" + (", auxiliary (balanced) classifier" if args.algorithm == "abc" else ""),
        "top1": float(100.0 * (pred == y).mean()), "balanced_top1": float(np.mean(recalls)),
        "per_class_top1": per_class,
        "pl_hist": np.bincount(pl, minlength=C).tolist(),
        "pl_top1": float(100.0 * (pl == data["unlabeled_y"]).mean()),
        "pl_confident_hist": np.bincount(pl[(conf >= args.threshold).numpy()], minlength=C).tolist(),
        "unlabeled_hist": np.bincount(data["unlabeled_y"], minlength=C).tolist(),
        "labeled_hist": np.bincount(data["labeled_y"], minlength=C).tolist(),
        "img_per_s": rows / max(train_seconds, 1e-9), "rows_per_step": cfg.batch_size * (1 + 2 * cfg.uratio),
        "seconds": time.perf_counter() - t_start, "train_seconds": train_seconds, "steps": steps_total,
        "train_cpu_seconds": train_cpu, "cpu_seconds": time.process_time() - cpu_start,
        "schedule": schedule, "nesterov": True, "threads": args.threads,
        "init": "torch.manual_seed(seed); nn.Linear default (kaiming-uniform a=sqrt(5), bias U(+-1/sqrt(D)))",
        "algorithm_state": state,
        "usb_settings": {k: v for k, v in sorted(vars(cfg).items())
                         if isinstance(v, (int, float, str, bool)) or v is None},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--features", help="the .npz features file")
    p.add_argument("--algorithm", choices=ALGORITHMS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="the result JSON")
    p.add_argument("--steps", type=int, default=SHARED["steps"],
                   help="training steps (CReST: shared by its generations)")
    p.add_argument("--batch", type=int, default=SHARED["batch"], help="labeled batch")
    p.add_argument("--mu", type=int, default=SHARED["mu"], help="unlabeled / labeled batch ratio (USB's uratio)")
    p.add_argument("--lr", type=float, default=SHARED["lr"])
    p.add_argument("--weight-decay", type=float, default=SHARED["weight_decay"])
    p.add_argument("--momentum", type=float, default=SHARED["momentum"], help="SGD momentum (USB's nesterov=True kept)")
    p.add_argument("--ema", type=float, default=SHARED["ema"], help="USB's ema_m")
    p.add_argument("--threshold", type=float, default=SHARED["threshold"], help="USB's p_cutoff")
    p.add_argument("--schedule", choices=("usb", "cosine", "constant"), default="usb",
                   help="usb: USB's own (its imbalanced algorithms: constant; FixMatch: cosine)")
    p.add_argument("--abc-p-cutoff", type=float, help="ABC's own threshold (default USB's 0.95)")
    p.add_argument("--daso-pretrain-iter", type=int, help="DASO's warm-up (default: USB's 5120 / 262144 of the steps)")
    p.add_argument("--daso-pl-dist-iter", type=int, help="DASO's pseudo-label histogram window (default: warm-up / 2)")
    p.add_argument("--darp-warmup-epochs", type=int, help="DARP's warm-up (default: USB's 200 / 256 of the epochs)")
    p.add_argument("--crest-gens", type=int, help="CReST's generations (default USB's 6)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--site", default=str(SITE), help="where USB's wheels are installed (made if absent)")
    p.add_argument("--wheels", default=None, help="USB's wheels (default: usb_peer.py's --prepare folder)")
    p.add_argument("--verbose", action="store_true", help="USB's own log on stderr")
    p.add_argument("--jobs", help="a JSON list of runs to run one after the other (see jobs_command)")
    p.add_argument("--synthetic", metavar="NPZ", help="write a synthetic features file and exit")
    p.add_argument("--synthetic-shape", default="60,200,90,16,3,2",
                   help="n_l,n_u,n_t,D,classes,K for --synthetic")
    args = p.parse_args(argv)
    if args.synthetic:
        n_l, n_u, n_t, dim, classes, views = map(int, args.synthetic_shape.split(","))
        synthetic_features(args.synthetic, n_l, n_u, n_t, dim, classes, views, seed=args.seed)
        return 0
    if args.wheels is None:
        sys.path.insert(0, str(HERE))
        from usb_peer import WHEELS
        args.wheels = str(WHEELS)
    if args.jobs:
        failed = 0
        for job in json.loads(Path(args.jobs).read_text()):
            unknown = set(job) - set(vars(args))
            if unknown:
                raise SystemExit(f"{args.jobs}: unknown keys {sorted(unknown)}")
            out = Path(job["out"])
            run_args = argparse.Namespace(**{**vars(args), "jobs": None, **job})
            if out.is_file():
                saved = json.loads(out.read_text())
                if saved.get("status") == "ok" and saved.get("request") == request(run_args):
                    continue   # the same settings and features: reused; anything else runs again
            failed += one_run(run_args)
        return 1 if failed else 0
    if not (args.features and args.algorithm and args.out):
        p.error("--features, --algorithm and --out are needed (or --jobs)")
    return one_run(args)


# what decides a run's result: a saved result is reused only when all of these match
REQUEST_KEYS = ("algorithm", "seed", "steps", "batch", "mu", "lr", "weight_decay", "momentum", "ema", "threshold",
                "schedule", "abc_p_cutoff", "daso_pretrain_iter", "daso_pl_dist_iter", "darp_warmup_epochs",
                "crest_gens")


def request(args) -> dict:
    """The run's settings and its features file's identity (path, size, modification time)."""
    features = Path(args.features)
    st = features.stat()
    return {**{k: getattr(args, k, None) for k in REQUEST_KEYS}, "features": str(features),
            "features_size": st.st_size, "features_mtime_ns": st.st_mtime_ns}


def one_run(args) -> int:
    """One run, its result (or its failure) written to ``args.out``."""
    if args.algorithm not in ALGORITHMS:
        raise SystemExit(f"algorithm {args.algorithm!r}: one of {', '.join(ALGORITHMS)}")
    t = time.perf_counter()
    try:
        result = run(args)
    except Exception as e:  # noqa: BLE001 - reported in the result file
        import traceback
        traceback.print_exc()
        result = {"algorithm": args.algorithm, "library": "usb", "seed": args.seed, "status": "failed",
                  "detail": f"{type(e).__name__}: {e}"[:400]}
    result["wall_seconds"] = time.perf_counter() - t
    result["request"] = request(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"usb {args.algorithm} seed {args.seed}: {result['status']}"
          + (f", top-1 {result['top1']:.2f}, balanced {result['balanced_top1']:.2f}, {result['train_seconds']:.1f} s"
             if result["status"] == "ok" else f": {result.get('detail', '')}"))
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
