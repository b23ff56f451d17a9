"""MoCo v2's two views of an image, batched on the training device and seeded like every view.

MoCo v2 (and MoCo-EMAN) augment each view with torchvision's RandomResizedCrop(scale 0.2-1),
ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8 (the four adjustments in a random order),
RandomGrayscale(0.2), GaussianBlur(sigma 0.1-2.0) with p 0.5 and a horizontal flip. Here
they run on a batch at once, each sample with its own choices (the ops follow torchvision's
tensor functions; tested against them), and every choice comes from the counter-hash plan of
:mod:`dpl_zoo.augment` (``(seed, epoch, draw, view)``): a resumed epoch replays the same
views. The crop and flip are :class:`~dpl_zoo.augment.BatchViews`' (for image folders the
loader workers crop with PIL from the same plan and the device does the rest).

Flip commutes with the colour ops and with the (symmetric) blur, so doing it with the crop,
first, gives what torchvision's order (flip last) gives.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .augment import _RA_START, BatchViews, normalize_images, plan_uniforms
from .data import Batch, ViewSpec

# plan slots after the crop and flip: colour jitter applied, its 4 factors, 4 keys of its random
# order, grayscale applied, blur applied, blur sigma
_JITTER, _FACTORS, _ORDER, _GRAY, _BLUR, _SIGMA = 0, 1, 5, 9, 10, 11
MOCO_SLOTS = 12
_GRAY_WEIGHTS = (0.2989, 0.587, 0.114)   # torchvision's rgb_to_grayscale


@dataclass(frozen=True)
class MoCoViewSpec:
    size: int
    scale: tuple = (0.2, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    hflip: float = 0.5
    color_jitter: tuple = (0.4, 0.4, 0.4, 0.1)
    color_jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple = (0.1, 2.0)
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"

    @property
    def plan_size(self) -> int:
        return _RA_START + MOCO_SLOTS

    def crop_spec(self) -> ViewSpec:
        """The crop and flip alone, for loader workers that crop image files (``ViewDataset``)."""
        return ViewSpec(self.size, tuple(self.scale), tuple(self.ratio), self.hflip, None, tuple(self.mean),
                        tuple(self.std), self.interpolation)


# --- the ops, per sample, on float images holding 0..255 (C = 1 or 3) ------------------------------

def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (r * _GRAY_WEIGHTS[0] + g * _GRAY_WEIGHTS[1] + b * _GRAY_WEIGHTS[2]).unsqueeze(1)


def _per_sample(f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return f.to(x.device, x.dtype, non_blocking=True).view(-1, 1, 1, 1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * _per_sample(factor, x)).clamp_(0, 255)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    f = _per_sample(factor, x)
    return (f * x + (1 - f) * mean).clamp_(0, 255)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    f = _per_sample(factor, x)
    return (f * x + (1 - f) * _gray(x)).clamp_(0, 255)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    same = maxc == minc
    span = maxc - minc
    ones = torch.ones_like(maxc)
    s = span / torch.where(same, ones, maxc)
    span = torch.where(same, ones, span)
    rc, gc, bc = (maxc - r) / span, (maxc - g) / span, (maxc - b) / span
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.fmod(h / 6.0 + 1.0, 1.0)
    return torch.stack([h, s, maxc], 1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.long() % 6
    p = (v * (1 - s)).clamp(0, 1)
    q = (v * (1 - s * f)).clamp(0, 1)
    t = (v * (1 - s * (1 - f))).clamp(0, 1)
    table = torch.stack([torch.stack(c, 1) for c in ((v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q))], 1)
    return table.gather(2, i.unsqueeze(1).unsqueeze(2).expand(-1, 3, 1, -1, -1)).squeeze(2)


def adjust_hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by ``factor`` (a fraction of the colour circle, -0.5..0.5)."""
    if x.shape[1] == 1:
        return x
    hsv = _rgb_to_hsv(x / 255.0)
    hsv[:, 0] = torch.remainder(hsv[:, 0] + factor.to(x.device, x.dtype, non_blocking=True).view(-1, 1, 1), 1.0)
    return _hsv_to_rgb(hsv) * 255.0


def grayscale(x: torch.Tensor) -> torch.Tensor:
    return _gray(x).expand_as(x).contiguous()


def blur_kernel_size(sigma_max: float, height: int, width: int) -> int:
    """An odd kernel covering +-3 sigma, no wider than reflection padding allows."""
    half = min(math.ceil(3 * sigma_max), min(height, width) - 1)
    return 2 * max(half, 0) + 1


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur, each sample its own sigma, reflected borders (torchvision's)."""
    n, c, h, w = x.shape
    half = kernel_size // 2
    if half == 0:
        return x
    pos = torch.linspace(-half, half, kernel_size, device=x.device, dtype=x.dtype)
    sig = sigma.to(x.device, x.dtype, non_blocking=True).view(-1, 1)
    kernel = torch.exp(-0.5 * (pos / sig) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)     # n*c x k
    y = F.pad(x.reshape(1, n * c, h, w), (half, half, half, half), mode="reflect")
    y = F.conv2d(y, kernel.view(n * c, 1, kernel_size, 1), groups=n * c)
    y = F.conv2d(y, kernel.view(n * c, 1, 1, kernel_size), groups=n * c)
    return y.view(n, c, h, w)


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def jitter_factors(u: torch.Tensor, strength: tuple) -> torch.Tensor:
    """Factors of torchvision's ColorJitter from uniforms (B x 4): brightness, contrast and
    saturation in ``[max(0, 1 - s), 1 + s]``, hue in ``[-s, s]``."""
    out = []
    for j, s in enumerate(strength):
        lo, hi = (-s, s) if j == 3 else (max(0.0, 1 - s), 1 + s)
        out.append(lo + (hi - lo) * u[:, j].double())
    return torch.stack(out, 1).float()


class MoCoViews:
    """The two views (query, key) of a :class:`~dpl_zoo.data.Batch` on ``device``: view ``v`` of a
    sample is drawn from the plan of ``(seed, epoch, draw, v)``."""

    def __init__(self, spec: MoCoViewSpec, seed: int, device: torch.device, channels_last: bool = False):
        self.spec, self.seed, self.device, self.channels_last = spec, seed, device, channels_last
        self.crop = BatchViews(spec.size, spec.scale, spec.ratio, spec.hflip, None, spec.mean, spec.std,
                               spec.interpolation)
        self.epoch = 0

    def __call__(self, batch: Batch) -> list[torch.Tensor]:
        out = []
        for v in (0, 1):
            src = batch.images[0] if batch.stage == "source" else batch.images[v]
            u = plan_uniforms(self.seed, self.epoch, batch.draws, v, self.spec.plan_size)
            out.append(self.view(src.to(self.device, non_blocking=True), u, crop=batch.stage == "source"))
        return out

    def view(self, images: torch.Tensor, u: torch.Tensor, crop: bool = True) -> torch.Tensor:
        """uint8 B x C x H x W (uncropped with ``crop``, else already cropped to size) -> the
        normalised 3-channel view."""
        s = self.spec
        x = self.crop(images, u, crop=crop, augment=False, normalize=False, keep_channels=True)
        extra = u[:, _RA_START:].cpu()
        rows = lambda keep: keep.nonzero().flatten().to(x.device, non_blocking=True)  # noqa: E731
        jitter = extra[:, _JITTER] < s.color_jitter_p
        if jitter.any():
            factors = jitter_factors(extra[:, _FACTORS:_FACTORS + 4], tuple(s.color_jitter))
            order = extra[:, _ORDER:_ORDER + 4].argsort(1)      # each sample's own order of the four
            for position in range(4):
                for op, fn in enumerate(_JITTER_OPS):
                    keep = jitter & (order[:, position] == op)
                    if keep.any():
                        idx = rows(keep)
                        x[idx] = fn(x[idx], factors[keep, op])
        gray = extra[:, _GRAY] < s.grayscale_p
        if gray.any() and x.shape[1] == 3:
            idx = rows(gray)
            x[idx] = grayscale(x[idx])
        blur = extra[:, _BLUR] < s.blur_p
        kernel = blur_kernel_size(s.blur_sigma[1], x.shape[2], x.shape[3])
        if blur.any() and kernel > 1:
            lo, hi = s.blur_sigma
            sigma = lo + (hi - lo) * extra[blur, _SIGMA]
            idx = rows(blur)
            x[idx] = gaussian_blur(x[idx], sigma, kernel)
        return normalize_images(x, s.mean, s.std, self.channels_last)


def moco_view_spec(data_cfg, data_config: dict, size: Optional[int] = None) -> MoCoViewSpec:
    """The views of a ``PretrainDataConfig`` at the model's input size and normalisation."""
    return MoCoViewSpec(size=size or data_config["input_size"][-1], scale=tuple(data_cfg.scale),
                        ratio=tuple(data_cfg.ratio), hflip=data_cfg.hflip, color_jitter=tuple(data_cfg.color_jitter),
                        color_jitter_p=data_cfg.color_jitter_p, grayscale_p=data_cfg.grayscale_p,
                        blur_p=data_cfg.blur_p, blur_sigma=tuple(data_cfg.blur_sigma),
                        mean=tuple(data_config["mean"]), std=tuple(data_config["std"]),
                        interpolation=data_config.get("interpolation") or "bilinear")
