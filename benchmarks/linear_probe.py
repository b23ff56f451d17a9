"""How much a start point's features know about a dataset before any fine-tuning.

A linear probe: the frozen backbone's pooled features of the labeled images, standardised, a
multinomial logistic regression on them (L-BFGS, L2), top-1 on the test images. Comparing the
pretrained start point with the same architecture at random initialisation says whether the
pretrained features carry over at the resolution the benchmark trains at, which is what
"pretrained beats from scratch" rests on.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


@torch.no_grad()
def pooled_features(model: torch.nn.Module, images: torch.Tensor, img_size: int, mean: Sequence[float],
                    std: Sequence[float], batch: int = 250) -> torch.Tensor:
    """Pre-logit features of uint8 N x C x H x W ``images`` (grey expanded to RGB), resized to
    ``img_size``, computed on the model's device, returned on the host."""
    model.eval()
    device = next(model.parameters()).device
    mean_t = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, -1, 1, 1)
    out = []
    for i in range(0, len(images), batch):
        x = images[i:i + batch].to(device).float().div(255)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
        out.append(model.forward_head(model.forward_features((x - mean_t) / std_t), pre_logits=True).float().cpu())
    return torch.cat(out).flatten(1)


def fit_and_score(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                  num_classes: int, weight_decay: float = 1e-2, iterations: int = 200) -> float:
    """Test top-1 (percent) of a logistic regression fitted on standardised ``train_x``."""
    mu, sd = train_x.mean(0, keepdim=True), train_x.std(0, keepdim=True).clamp_min(1e-6)
    a, b = (train_x - mu) / sd, (test_x - mu) / sd
    linear = torch.nn.Linear(a.shape[1], num_classes)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    opt = torch.optim.LBFGS(linear.parameters(), max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(linear(a), train_y) + weight_decay * linear.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (linear(b).argmax(1) == test_y).float().mean().item() * 100
