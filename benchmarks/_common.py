"""What every benchmark records next to its numbers: the machine and the versions."""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable


def machine_facts() -> dict:
    import huggingface_hub
    import timm
    import torch
    facts = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
             "processor": platform.processor() or platform.machine(), "torch": torch.__version__,
             "torch_threads": torch.get_num_threads(), "timm": timm.__version__,
             "huggingface_hub": huggingface_hub.__version__, "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name(0)
    return facts


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 2, sync: Callable[[], None] = lambda: None) -> dict:
    """Median wall time of ``fn`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": repeats}
