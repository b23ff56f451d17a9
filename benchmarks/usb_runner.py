"""One USB (PyPI ``semilearn`` 0.3.2) training run on given images and positions, scored the way
dpl-zoo scores its own runs. Runs in USB's own environment (a folder with semilearn on the path,
see ``usb_peer.install``); never imported by the package.

The network is the caller's (built by a function, e.g. dpl-zoo's ``build_model`` after the same
seeding as a dpl-zoo run, so backbone and initialisation are identical); USB wraps it, trains it
with its own algorithm, augmentation, optimiser and schedule, and the EMA weights it evaluates
are then scored here with dpl-zoo's own counters: test top-1 and per-class top-1, and the
pseudo-labels the algorithm would make now on given unlabeled positions (class histogram and
its KL divergence from the target distribution).

USB trains only on CUDA; ``cpu_emulate`` runs its CUDA calls on the CPU instead. Modules USB
imports at start but none of the algorithms run here use are stubs that fail if ever called.
"""
from __future__ import annotations

import functools
import sys
import time
from typing import Callable, Optional, Sequence

# imported by semilearn at start, used by none of the algorithms run here
STUBBED = ("transformers", "torchaudio", "skimage", "wandb", "aim", "torch.utils.tensorboard")
IMBALANCED = ("debiaspl", "abc", "daso", "darp", "crest")   # USB's "imbalanced algorithms" run here


def install_stubs(names=STUBBED) -> None:
    """Modules named in ``names`` (and their submodules) import as stubs whose every attribute is a
    class that raises ImportError when used."""
    import importlib.abc
    import importlib.machinery
    import types

    class Absent:
        def __new__(cls, *a, **k):
            raise ImportError(f"{cls.__qualname__} is stubbed out by benchmarks/usb_runner.py (not used here)")

    class StubModule(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return type(name, (Absent,), {"__qualname__": f"{self.__name__}.{name}"})

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path=None, target=None):
            if any(name == s or name.startswith(s + ".") for s in names):
                return importlib.machinery.ModuleSpec(name, self, is_package=True)
            return None

        def create_module(self, spec):
            module = StubModule(spec.name)
            module.__path__ = []
            return module

        def exec_module(self, module):
            pass

    if not any(type(f).__name__ == "Finder" and getattr(f, "_usb_stubs", False) for f in sys.meta_path):
        finder = Finder()
        finder._usb_stubs = True
        sys.meta_path.insert(0, finder)


def emulate_cuda_on_cpu() -> None:
    """USB's ``.cuda()`` calls, CUDA events and synchronisations run on the CPU, so its training
    loop runs without a GPU (it refuses otherwise)."""
    import torch
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.cuda.synchronize = lambda *a, **k: None

    class Event:
        def __init__(self, *a, **k):
            self.t = None

        def record(self, *a, **k):
            self.t = time.perf_counter()

        def elapsed_time(self, other):
            return 1e3 * (other.t - self.t)
    torch.cuda.Event = Event


def _to_rgb(img):
    return img.convert("RGB")


class USBNet:
    """USB's ``net_builder``: ``build()`` (the caller's network, num_classes outputs) wrapped so its
    forward returns USB's ``{'logits', 'feat'}``. Every call builds it afresh, so USB's model and
    its EMA copy start from the same weights."""

    def __init__(self, build: Callable[[int], object]):
        self.build = build

    def __call__(self, num_classes: int, pretrained: bool = False, pretrained_path=None, **kwargs):
        import torch.nn as nn
        model = self.build(num_classes)

        class Net(nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m
                self.num_features = m.num_features   # ABC and DASO size their extra heads by it

            def forward(self, x, only_fc=False, only_feat=False, **kw):
                if only_fc:
                    return self.m.get_classifier()(x)
                feat = self.m.forward_head(self.m.forward_features(x), pre_logits=True)
                if only_feat:
                    return feat
                return {"logits": self.m.get_classifier()(feat), "feat": feat}
        return Net(model)


def transforms_for(img_size: int, mean, std, crop_ratio: float = 0.875, hflip: bool = True):
    """USB's augmentation for its CV datasets: weak (random crop with reflect padding, flip), strong
    (weak + RandAugment(3, 5)), and the evaluation view (resize only)."""
    from semilearn.datasets.augmentation import RandAugment
    from torchvision import transforms
    s, pad = img_size, int(img_size * (1 - crop_ratio))
    norm = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    flip = [transforms.RandomHorizontalFlip()] if hflip else []
    base = [transforms.Lambda(_to_rgb), transforms.Resize(s), transforms.RandomCrop(s, padding=pad,
                                                                                        padding_mode="reflect"), *flip]
    return (transforms.Compose([*base, *norm]), transforms.Compose([*base, RandAugment(3, 5), *norm]),
            transforms.Compose([transforms.Lambda(_to_rgb), transforms.Resize(s), *norm]))


def _replace_in_semilearn(name: str, value) -> None:
    """``name`` as every loaded semilearn module sees it (each imported it into its own namespace)."""
    for module in [m for k, m in list(sys.modules.items()) if k.startswith("semilearn") and m is not None]:
        if hasattr(module, name):
            setattr(module, name, value)


def _serve_datasets(sets: dict) -> None:
    """USB's ``get_dataset`` returns a fresh copy of ``sets``: the algorithm then builds its loaders
    (and CReST its later generations) as it does with its own datasets, from ours."""
    import copy
    _replace_in_semilearn("get_dataset", lambda *a, **k: copy.deepcopy(sets))


def _send_model_cpu(args, model, clip_batch=True):
    """USB's ``send_model_cuda`` for one process without CUDA: its single-device branches, on the CPU
    (``gpu`` None: wrapped in DataParallel, a pass-through without devices, as ABC expects)."""
    import torch
    return model if args.gpu is not None else torch.nn.DataParallel(model)


def _logits(model, images, view, batch: int = 256):
    import torch
    from PIL import Image
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = torch.stack([view(Image.fromarray(im)) for im in images[i:i + batch]])
            out.append(model(x)["logits"].float())
    return torch.cat(out)


def mask_rates(per_step: Sequence[float], interval: int) -> dict:
    """``mask_rate_mean`` over training and ``mask_curve``, the mean of each whole ``interval`` of steps
    (as dpl-zoo's metrics.jsonl logs them), for the pseudo-label use of two libraries side by side."""
    per_step = list(per_step)
    if not per_step:
        return {"mask_rate_mean": None, "mask_curve": []}
    chunks = [per_step[i:i + interval] for i in range(0, len(per_step) - interval + 1, interval)]
    return {"mask_rate_mean": sum(per_step) / len(per_step), "mask_curve": [sum(c) / len(c) for c in chunks]}


def train_usb(config: dict, build: Callable[[int], object], images, targets: Sequence[int],
              labeled: Sequence[int], unlabeled: Sequence[int], test_images, test_targets: Sequence[int],
              diag: Sequence[int] = (), target_prior: Optional[Sequence[float]] = None,
              img_size: int = 32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), hflip: bool = True,
              cpu_emulate: bool = False) -> dict:
    """Train USB's algorithm ``config['algorithm']`` (with ``config['imb_algorithm']`` on top: one
    of ``IMBALANCED``, or None) on ``images[labeled]`` with labels and ``images[unlabeled]`` without,
    for ``config['num_train_iter']`` steps, and score its EMA weights.

    ``config`` is USB's argument namespace as a dict (``semilearn.lighting.config.get_config``
    adds each algorithm's own defaults); ``build(num_classes)`` makes the network. Images are
    uint8 arrays (N x H x W or N x H x W x C). The imbalanced algorithms read the labeled
    split's class counts from the data, as USB's own datasets give them.

    Returns ``top1`` and ``per_class_top1`` on the test images; ``pl_hist`` (the pseudo-labels the
    algorithm would make on ``images[diag]``, before its threshold), ``pl_kl_target`` (its KL
    divergence from ``target_prior``, default uniform) and ``pl_acc_all``; ``img_per_s`` (labeled
    + weak + strong images per second of training, evaluation and checkpoints excluded),
    ``seconds`` and ``train_seconds``; ``mask_rate_mean`` and ``mask_curve`` (:func:`mask_rates`); ``usb_top1`` (USB's own evaluation of the same weights).
    """
    import random

    import numpy as np
    import torch

    if not cpu_emulate and not torch.cuda.is_available():
        raise RuntimeError("USB: 'ONLY GPU TRAINING IS SUPPORTED' (no CUDA device; cpu_emulate runs it on the CPU)")
    install_stubs()
    if not hasattr(np, "math"):   # CReST calls np.math.ceil, gone in NumPy 2
        import math
        np.math = math
    if cpu_emulate:
        emulate_cuda_on_cpu()
    from semilearn.algorithms import get_algorithm
    import semilearn.imb_algorithms.crest.crest  # noqa: F401 - CReST's own get_dataset is served too
    from semilearn.datasets.cv_datasets.datasetbase import BasicDataset
    from semilearn.imb_algorithms import get_imb_algorithm
    from semilearn.lighting.config import get_config

    from dpl_zoo.datasets import class_balance
    from dpl_zoo.evaluate import accuracy_report
    if config.get("imb_algorithm") not in (None, *IMBALANCED):
        raise ValueError(f"imb_algorithm {config['imb_algorithm']!r}: one of {', '.join(IMBALANCED)} or None")
    cfg = get_config(config)
    seed = cfg.seed
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    labeled, unlabeled = list(labeled), list(unlabeled)
    y = np.asarray(targets)
    n = cfg.num_classes
    # what USB's own dataset code sets before the algorithm is built (FlexMatch, DARP, CReST read it)
    cfg.ulb_dest_len, cfg.lb_dest_len = len(unlabeled), len(labeled)
    weak, strong, plain = transforms_for(img_size, mean, std, cfg.crop_ratio, hflip)
    name = cfg.algorithm
    # targets as arrays, as USB's own datasets hold them (CReST indexes them with arrays of positions)
    sets = {"train_lb": BasicDataset(name, images[labeled], y[labeled], n, weak, False, None),
            "train_ulb": BasicDataset(name, images[unlabeled], y[unlabeled], n, weak, True, strong),
            "eval": BasicDataset(name, test_images, np.asarray(test_targets), n, plain, False, None), "test": None}
    _serve_datasets(sets)
    if cpu_emulate:
        _replace_in_semilearn("send_model_cuda", _send_model_cpu)
    from semilearn.core.utils import send_model_cuda
    alg = (get_imb_algorithm if cfg.imb_algorithm else get_algorithm)(cfg, USBNet(build), None, None)
    alg.model, alg.ema_model = send_model_cuda(cfg, alg.model), send_model_cuda(cfg, alg.ema_model)   # as train.py
    # evaluation and checkpoint writing are timed apart, so images/s counts training only
    aside, evals = [0.0], []
    real_eval, real_save = alg.evaluate, alg.save_model

    def timed_eval(*a, **k):
        t = time.perf_counter()
        result = real_eval(*a, **k)
        aside[0] += time.perf_counter() - t
        evals.append(result)
        return result

    def timed_save(*a, **k):
        t = time.perf_counter()
        real_save(*a, **k)
        aside[0] += time.perf_counter() - t
    alg.evaluate, alg.save_model = timed_eval, timed_save
    # the share of unlabeled images each step's loss used (USB's util_ratio: its mask's mean; SoftMatch's
    # mask is a weight); functools.wraps keeps the signature USB reads to choose train_step's arguments
    used, real_step = [], alg.train_step

    @functools.wraps(real_step)
    def logged_step(*a, **k):
        out, log = real_step(*a, **k)
        used.append(float(log["train/util_ratio"]))
        return out, log
    alg.train_step = logged_step
    t0 = time.perf_counter()
    alg.train()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    images_seen = cfg.num_train_iter * cfg.batch_size * (1 + 2 * cfg.uratio)
    # the EMA weights USB evaluates (its evaluate swaps them into the student): scored with our counters
    alg.ema.apply_shadow()
    try:
        test_logits = _logits(alg.model, test_images, plain)
        acc = accuracy_report(test_logits, torch.as_tensor(list(test_targets)), n)
        result = {"top1": acc["top1"], "per_class_top1": acc["per_class_top1"]}
        if diag:
            diag = list(diag)
            logits = _logits(alg.model, images[diag], plain)
            if hasattr(alg, "p_hat"):   # USB's DebiasPL: its pseudo-labels from debiased logits
                logits = logits - alg.tau * torch.log(torch.as_tensor(alg.p_hat).float().cpu())
            pl = logits.argmax(1)
            hist = torch.bincount(pl, minlength=n).tolist()
            balance = class_balance(hist, list(target_prior) if target_prior is not None else [1.0 / n] * n)
            result.update(pl_hist=hist, pl_kl_target=balance["kl_target"], pl_kl_uniform=balance["kl_uniform"],
                          pl_acc_all=100.0 * float((pl == torch.as_tensor(y[diag])).double().mean()))
    finally:
        alg.ema.restore()
    own = [e["eval/top-1-acc"] for e in evals if isinstance(e, dict) and "eval/top-1-acc" in e]   # CReST also
    result.update(usb_top1=100.0 * own[-1] if own else None, seconds=seconds,   # evaluates its unlabeled set
                  train_seconds=seconds - aside[0], img_per_s=images_seen / max(seconds - aside[0], 1e-9),
                  steps=cfg.num_train_iter, **mask_rates(used, cfg.num_log_iter))
    if hasattr(alg, "p_hat"):   # USB DebiasPL's class prior after training: its shape and values
        result["usb_p_hat"] = torch.as_tensor(alg.p_hat).detach().float().cpu().flatten().tolist()
    return result
