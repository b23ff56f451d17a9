"""Long-run stability at toy size: no memory growth, no file-handle leak (python -m pytest -m slow)."""
import os

import pytest

from dpl_zoo.progress import Reporter
from dpl_zoo.train import fit


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


class Sampler(Reporter):
    def __init__(self):
        super().__init__(quiet=True)
        self.samples = []

    def start_epoch(self, epoch, steps):
        self.samples.append((epoch, _rss_mb(), len(os.listdir("/proc/self/fd"))))
        super().start_epoch(epoch, steps)


@pytest.mark.slow
def test_soak_no_memory_growth_no_fd_leak(tiny_config):
    sampler = Sampler()
    # 3,000 steps in 30 epochs: loaders, checkpoints and evaluations are rebuilt every epoch
    fit(tiny_config(epochs=30, steps_per_epoch=100, workers=1), reporter=sampler)
    warm = sampler.samples[5:]  # after allocator and thread pools have settled
    rss = [s[1] for s in warm]
    fds = [s[2] for s in warm]
    print(f"RSS MB from epoch 5 to 29: {rss[0]:.1f} -> {rss[-1]:.1f} (max {max(rss):.1f}); fds {fds[0]} -> {fds[-1]}")
    assert rss[-1] - rss[0] < 50, f"RSS grew {rss[-1] - rss[0]:.1f} MB over {len(rss)} epochs"
    assert max(fds) - min(fds) <= 2, f"file handles went from {min(fds)} to {max(fds)}"
