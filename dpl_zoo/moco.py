"""MoCo v2 with EMAN, the self-supervised start of the paper's ImageNet runs: the pure pieces.

Momentum Contrast (He et al. 2020; v2: Chen et al. 2020) trains a *query* encoder to pick
the *key* of another view of the same image out of a queue of keys of other images
(InfoNCE). The key encoder is a moving average of the query encoder. EMAN (Cai et al.,
CVPR 2021, the backbone DebiasPL starts from) averages the BatchNorm statistics too and runs
the key encoder in eval mode, so its keys never depend on the batch they were computed in
(no shuffled BatchNorm needed). The moving average itself is timm's ``ModelEmaV3`` over
parameters *and* buffers (:class:`dpl_zoo.task.MoCoTask`); here are the tensor pieces, with
no I/O and no config, usable in any loop:

- :class:`MoCoEncoder`: a timm backbone (``num_classes=0``) + the MoCo v2 projection MLP,
  L2-normalised output;
- :func:`info_nce_logits` / :func:`moco_loss`: the contrastive loss against a queue;
- :class:`KeyQueue`: the queue of negatives, first in first out, saved with ``state_dict``;
- :func:`weighted_knn`: the kNN monitor of InstDisc / MoCo (cosine similarity, the k
  nearest labeled features vote with weight ``exp(sim / T)``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def projection_head(in_features: int, hidden: int, dim: int) -> nn.Sequential:
    """MoCo v2's MLP: Linear, ReLU, Linear (no BatchNorm in the head)."""
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))


class MoCoEncoder(nn.Module):
    """``backbone`` (pooled features, e.g. a timm model with ``num_classes=0``) and the projection
    head; ``forward`` gives L2-normalised embeddings, :meth:`features` the backbone's features."""

    def __init__(self, backbone: nn.Module, dim: int = 128, hidden: Optional[int] = None):
        super().__init__()
        width = getattr(backbone, "num_features", None)
        if not isinstance(width, int):
            raise ValueError(f"{type(backbone).__name__} has no num_features; pass a timm model built with "
                             f"num_classes=0")
        self.backbone = backbone
        self.head = projection_head(width, hidden or width, dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.backbone(x)).float(), dim=1)


def info_nce_logits(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """``N x (1 + K)`` logits: column 0 the positive ``q . k`` of each row, then ``q`` against
    every queued key, all divided by ``temperature`` (q, k, queue: L2-normalised rows)."""
    q, k = q.float(), k.float().detach()
    positive = (q * k).sum(1, keepdim=True)
    negative = q @ queue.float().detach().t()
    return torch.cat([positive, negative], dim=1) / temperature


def moco_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
    """InfoNCE: cross-entropy of :func:`info_nce_logits` with the positive as the class; returns
    ``(loss, logits)``."""
    logits = info_nce_logits(q, k, queue, temperature)
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device)), logits


class KeyQueue(nn.Module):
    """The queue of negative keys (``size x dim``, L2-normalised rows). :meth:`enqueue` writes a
    batch over the oldest keys (wrapping around the end), as MoCo does; the keys and the write
    position are buffers, so a checkpoint of the module resumes the queue exactly."""

    def __init__(self, size: int, dim: int, generator: Optional[torch.Generator] = None):
        super().__init__()
        self.register_buffer("keys", F.normalize(torch.randn(size, dim, generator=generator), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def enqueue(self, k: torch.Tensor) -> None:
        """Replace the ``len(k)`` oldest keys by ``k``, as writing them one by one would (a batch
        longer than the queue leaves its last ``size`` keys)."""
        n = len(k)
        k = k.detach().to(self.keys.dtype)[-self.size:]
        rows = (self.ptr + (n - len(k)) + torch.arange(len(k), device=self.keys.device)) % self.size
        self.keys[rows] = k
        self.ptr.copy_((self.ptr + n) % self.size)

    def snapshot(self) -> torch.Tensor:
        """The keys as the loss must see them: a copy, so enqueueing cannot touch a saved tensor."""
        return self.keys.clone()


@torch.no_grad()
def weighted_knn(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
                 k: int = 200, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Predicted classes of ``queries`` by the weighted kNN of InstDisc (Wu et al. 2018), the
    monitor of MoCo's code: cosine similarity to the ``bank`` features, the ``k`` most similar
    vote for their label with weight ``exp(sim / temperature)``."""
    bank = F.normalize(bank.float(), dim=1)
    k = min(k, len(bank))
    out = []
    for start in range(0, len(queries), chunk):
        q = F.normalize(queries[start:start + chunk].float(), dim=1)
        sim, idx = (q @ bank.t()).topk(k, dim=1)
        votes = torch.zeros(len(q), num_classes, device=q.device, dtype=sim.dtype)
        votes.scatter_add_(1, bank_labels.to(q.device)[idx], (sim / temperature).exp())
        out.append(votes.argmax(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)
