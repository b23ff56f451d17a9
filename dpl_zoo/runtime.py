"""Process and device settings of a run: seeding, the device, autocast, deterministic kernels."""
from __future__ import annotations

import os
import random
from contextlib import contextmanager, nullcontext

import numpy as np
import torch

from . import distributed as dist_utils


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def resolve_device(cfg) -> torch.device:
    """The configured device, else CUDA when present; under torchrun, this process's GPU."""
    kind = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(kind)
    return dist_utils.local_device(device.type) if device.index is None else device


def autocast_dtype(cfg, device: torch.device):
    """The precision autocast computes in (None: no autocast): ``amp_dtype`` on CUDA, bfloat16 on a CPU."""
    if not cfg.amp:
        return None
    return getattr(torch, cfg.amp_dtype) if device.type == "cuda" else torch.bfloat16


def autocast_for(cfg, device: torch.device):
    dtype = autocast_dtype(cfg, device)
    if dtype is None:
        return nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


@contextmanager
def deterministic_mode(enabled: bool, device: torch.device):
    """``deterministic: true`` for the duration of one run only: deterministic kernels (errors
    where none exists), no cuDNN autotuning; the process's previous settings come back after
    (except ``CUBLAS_WORKSPACE_CONFIG``: cuBLAS reads it once per process, so it stays set)."""
    if not enabled:
        yield
        return
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    if device.type == "cuda" and not os.environ.get("CUBLAS_WORKSPACE_CONFIG"):
        # cuBLAS is deterministic only with a fixed workspace (read when its handle is first made)
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2], saved[3]
