"""Seeded weak and strong views: one augmentation plan per sample, two ways to draw it.

Every random choice of a view (the RandomResizedCrop box, the flip, the RandAugment ops,
their signs and whether each is applied) comes from a *plan*: a row of uniforms computed
by a counter-based hash of ``(seed, epoch, draw, view)``, where ``draw`` is the sample's
place in the global sample stream. A view therefore depends on where the sample sits in
that stream, not on the process, worker or batch that computes it: 1 process and N
processes see the same images, and a resumed epoch replays exactly. No global RNG is
touched.

The plan is drawn either

- per image with PIL (:class:`PILViews`, in the loader workers; timm's RandAugment op
  functions), or
- batched on the training device (:class:`BatchViews`; per-sample ops and magnitudes, the
  workers only decode and crop).

Both implement timm's ``rand-mM-nN[-pP][-inc1]`` RandAugment (``_RAND_TRANSFORMS`` or the
increasing set) after RandomResizedCrop + horizontal flip. The crop + resize + flip of the
batched path is PIL's ``Image.resize(box=...)`` arithmetic (Pillow's separable, antialiased
filters with 22-bit fixed-point coefficients and a rounded horizontal pass), done as two
per-sample matrix products in float64, where integer sums are exact: the two paths give the
same pixels, bit for bit, downscaling (antialiased) or upscaling, for every PIL filter. The
RandAugment ops match op by op up to the interpolation rounding of the geometric ones (tested).
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9
_CROP_ATTEMPTS = 10
_CROP_SLOTS = 2 * _CROP_ATTEMPTS + 2   # (area, log ratio) per attempt, then the box position
_FLIP_SLOT = _CROP_SLOTS
_RA_START = _FLIP_SLOT + 1
_RA_SLOTS = 3                          # per layer: which op, whether it applies, its sign


# --- the plan ----------------------------------------------------------------------------------

def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for uint32 values held in int64, without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32): every output bit depends on every input bit."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def plan_uniforms(seed: int, epoch: int, draws: torch.Tensor, view: int, size: int) -> torch.Tensor:
    """``len(draws) x size`` uniforms in [0, 1), a pure function of (seed, epoch, draw, view, slot)."""
    draws = torch.as_tensor(draws, dtype=torch.int64).reshape(-1, 1)
    h = _mix(torch.full_like(draws, (seed & _M32) ^ _GOLDEN))
    for part in (epoch & _M32, None, view & _M32):
        h = _mix(h ^ (draws & _M32) if part is None else h ^ part)
    slots = (torch.arange(size, dtype=torch.int64) * _GOLDEN & _M32).unsqueeze(0)
    x = _mix(_mix(h ^ slots) + 1)
    return (x >> 8).to(torch.float32) / float(1 << 24)


@dataclass(frozen=True)
class RandAugmentSpec:
    """timm's RandAugment string (``rand-m10-n2``, ``-p0.5``, ``-inc1``, ``-mmax``), parsed."""
    ops: tuple
    num_layers: int = 2
    magnitude: float = 10.0
    prob: float = 0.5

    @classmethod
    def parse(cls, spec: Optional[str]) -> Optional["RandAugmentSpec"]:
        if not spec:
            return None
        parts = spec.split("-")
        if parts[0] != "rand":
            raise ValueError(f"strong augmentation {spec!r}: only timm's RandAugment (rand-m10-n2 ...) is supported")
        magnitude, layers, prob, increasing, mmax = 10.0, 2, 0.5, False, 10.0
        for part in parts[1:]:
            key, value = (re.split(r"(\d.*)", part) + ["", ""])[:2]
            if key == "m":
                magnitude = float(value)
            elif key == "n":
                layers = int(value)
            elif key == "p":
                prob = float(value)
            elif key == "inc":
                increasing = bool(int(value))
            elif key == "mmax":
                mmax = float(value)
            else:
                raise ValueError(f"strong augmentation {spec!r}: section {part!r} is not supported by the seeded "
                                 f"views (supported: m, n, p, inc, mmax; a random magnitude 'mstd' is not)")
        return cls(tuple(INCREASING_OPS if increasing else RAND_OPS), layers, max(0.0, min(magnitude, mmax)), prob)


RAND_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
            "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                  "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                  "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


def op_argument(name: str, magnitude: float, negate: bool) -> Optional[float]:
    """The argument timm's level functions give an op (its ``_randomly_negate`` choice taken
    from the plan instead of the global ``random``)."""
    level = magnitude / 10.0
    sign = -1.0 if negate else 1.0
    if name in ("AutoContrast", "Equalize", "Invert"):
        return None
    if name == "Rotate":
        return sign * level * 30.0
    if name in ("ShearX", "ShearY"):
        return sign * level * 0.3
    if name in ("TranslateXRel", "TranslateYRel"):
        return sign * level * 0.45
    if name == "Posterize":
        return int(level * 4)
    if name == "PosterizeIncreasing":
        return 4 - int(level * 4)
    if name == "Solarize":
        return min(256, int(level * 256))
    if name == "SolarizeIncreasing":
        return 256 - min(256, int(level * 256))
    if name == "SolarizeAdd":
        return min(128, int(level * 110))
    if name.endswith("Increasing"):
        return max(0.1, 1.0 + sign * level * 0.9)
    return level * 1.8 + 0.1   # Color, Contrast, Brightness, Sharpness


@dataclass
class Plan:
    """Per-sample choices for one view of a batch (CPU tensors)."""
    boxes: Optional[torch.Tensor]   # B x 4 (top, left, height, width) in source pixels, or None
    flip: torch.Tensor              # B bool
    ops: torch.Tensor               # B x layers: op index, -1 where the layer is not applied
    negate: torch.Tensor            # B x layers bool


def plan_size(strong: Optional[RandAugmentSpec]) -> int:
    return _RA_START + _RA_SLOTS * (strong.num_layers if strong else 0)


def crop_boxes(u: torch.Tensor, heights: torch.Tensor, widths: torch.Tensor, scale: Sequence[float],
               ratio: Sequence[float]) -> torch.Tensor:
    """torchvision's RandomResizedCrop.get_params, vectorised: the first of 10 attempts whose
    box fits, else the centre crop with the ratio clamped; returns B x 4 (top, left, h, w)."""
    heights, widths = heights.double(), widths.double()
    area = heights * widths
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    u = u.double()
    target = area.unsqueeze(1) * (scale[0] + (scale[1] - scale[0]) * u[:, 0:2 * _CROP_ATTEMPTS:2])
    aspect = torch.exp(log_r[0] + (log_r[1] - log_r[0]) * u[:, 1:2 * _CROP_ATTEMPTS:2])
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (h > 0) & (w <= widths.unsqueeze(1)) & (h <= heights.unsqueeze(1))
    first = torch.where(ok.any(1), ok.double().argmax(1), torch.full_like(heights, -1).long())
    rows = torch.arange(len(u))
    pick_w, pick_h = w[rows, first.clamp(min=0)], h[rows, first.clamp(min=0)]
    # fallback: the whole image cropped to the ratio range, centred
    in_ratio = widths / heights
    fw = torch.where(in_ratio < ratio[0], widths, torch.where(in_ratio > ratio[1], torch.round(heights * ratio[1]),
                                                                widths))
    fh = torch.where(in_ratio < ratio[0], torch.round(widths / ratio[0]), heights)
    fallback = first < 0
    pick_w, pick_h = torch.where(fallback, fw, pick_w), torch.where(fallback, fh, pick_h)
    top = torch.floor(u[:, 2 * _CROP_ATTEMPTS] * (heights - pick_h + 1))
    left = torch.floor(u[:, 2 * _CROP_ATTEMPTS + 1] * (widths - pick_w + 1))
    top = torch.where(fallback, torch.div(heights - pick_h, 2, rounding_mode="floor"), top)
    left = torch.where(fallback, torch.div(widths - pick_w, 2, rounding_mode="floor"), left)
    return torch.stack([top, left, pick_h, pick_w], 1).long()


def make_plan(u: torch.Tensor, sizes: Optional[torch.Tensor], scale, ratio, hflip: float,
              strong: Optional[RandAugmentSpec]) -> Plan:
    """The choices of one view for a batch; ``sizes`` (B x 2: height, width) of the source
    images, or None when the crop is not part of this view (already done)."""
    boxes = crop_boxes(u, sizes[:, 0], sizes[:, 1], scale, ratio) if sizes is not None else None
    flip = u[:, _FLIP_SLOT] < hflip
    if strong is None:
        empty = torch.zeros(len(u), 0, dtype=torch.int64)
        return Plan(boxes, flip, empty, empty.bool())
    slots = u[:, _RA_START:_RA_START + _RA_SLOTS * strong.num_layers].reshape(len(u), strong.num_layers, _RA_SLOTS)
    ops = torch.clamp((slots[..., 0] * len(strong.ops)).long(), max=len(strong.ops) - 1)
    applied = slots[..., 1] < strong.prob
    return Plan(boxes, flip, torch.where(applied, ops, -1), slots[..., 2] > 0.5)


# --- per image, with PIL (loader workers) --------------------------------------------------------

def pil_interpolation(name: str) -> int:
    from timm.data.transforms import str_to_pil_interp
    return str_to_pil_interp(name)


def fill_color(mean: Sequence[float]) -> tuple:
    """RandAugment's fill for pixels moved in from outside: the dataset mean, as timm uses."""
    return tuple(min(255, round(255 * m)) for m in mean)


class PILViews:
    """Draws plans for PIL images: crop + flip (+ RandAugment) with timm's op functions."""

    def __init__(self, size: int, scale, ratio, hflip: float, strong: Optional[RandAugmentSpec],
                 interpolation: str = "bilinear", mean=(0.5, 0.5, 0.5)):
        self.size, self.scale, self.ratio, self.hflip, self.strong = size, tuple(scale), tuple(ratio), hflip, strong
        self.resample = pil_interpolation(interpolation)
        self.fill = fill_color(mean)

    def plans(self, u: torch.Tensor, images: Sequence[Image.Image], crop: bool = True) -> Plan:
        sizes = torch.tensor([[im.height, im.width] for im in images]) if crop else None
        return make_plan(u, sizes, self.scale, self.ratio, self.hflip, self.strong)

    def apply(self, img: Image.Image, plan: Plan, k: int, crop: bool = True, flip: bool = True,
              augment: bool = True) -> Image.Image:
        """The ``k``-th sample of ``plan`` on ``img``; ``flip``/``augment`` False leave those steps
        to the device."""
        if crop:
            top, left, h, w = plan.boxes[k].tolist()
            img = img.resize((self.size, self.size), self.resample, box=(left, top, left + w, top + h))
        if flip and plan.flip[k]:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if augment and self.strong is not None:
            from timm.data.auto_augment import NAME_TO_OP
            kwargs = dict(fillcolor=self.fill, resample=self.resample)
            for op, negate in zip(plan.ops[k].tolist(), plan.negate[k].tolist()):
                if op < 0:
                    continue
                name = self.strong.ops[op]
                arg = op_argument(name, self.strong.magnitude, negate)
                img = NAME_TO_OP[name](img, *(() if arg is None else (arg,)), **kwargs)
        return img


def pil_to_uint8(img: Image.Image) -> torch.Tensor:
    """C x H x W uint8, no copy of the pixel data beyond one numpy view."""
    arr = np.asarray(img, dtype=np.uint8)
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


# --- batched, on the training device ---------------------------------------------------------------

_GRAY = (0.299, 0.587, 0.114)


@functools.lru_cache(maxsize=256)
def _constant(values: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A small constant on ``device``, made once: made per call it is a blocking host-to-device
    copy, which on a GPU stalls the host on every view of every step. Never modified in place."""
    return torch.tensor(values, dtype=dtype, device=device)


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    w = _constant(tuple(_GRAY), x.device, x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _quantize(x: torch.Tensor) -> torch.Tensor:
    return x.round_().clamp_(0, 255)


def _blend(x: torch.Tensor, degenerate: torch.Tensor, factor: float) -> torch.Tensor:
    return degenerate + factor * (x - degenerate)


def _sharpen_degenerate(x: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH filter ([[1,1,1],[1,5,1],[1,1,1]] / 13) inside, the border kept: as a 3 x 3 mean
    plus the centre, much cheaper than a convolution on small images."""
    inner = (9.0 * F.avg_pool2d(x, 3, stride=1) + 4.0 * x[:, :, 1:-1, 1:-1]) / 13.0
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = _quantize(inner)
    return out


def color_op(name: str, x: torch.Tensor, arg: Optional[float]) -> torch.Tensor:
    """One non-geometric RandAugment op on a float batch holding 0..255 integers (AutoContrast,
    Equalize and Contrast depend on image statistics: ``_lut`` builds them per image)."""
    base = name.replace("Increasing", "")
    if base == "Invert":
        return 255.0 - x
    if base == "Posterize":
        shift = 8 - int(arg)
        return x if shift <= 0 else torch.floor(x / 2 ** shift) * 2 ** shift
    if base == "Solarize":
        return torch.where(x >= arg, 255.0 - x, x)
    if base == "SolarizeAdd":
        return torch.where(x < 128, (x + arg).clamp(max=255), x)
    if base == "Color":
        return _blend(x, _quantize(_gray(x)).expand_as(x), arg)
    if base == "Brightness":
        return _blend(x, torch.zeros_like(x), arg)
    if base == "Sharpness":
        return _blend(x, _sharpen_degenerate(x), arg)
    raise ValueError(f"unknown RandAugment op {name}")


def _geometric_matrix(name: str, arg: float, h: int, w: int) -> list[list[float]]:
    """Output -> input pixel-coordinate map of a PIL geometric op (3 x 3)."""
    if name == "ShearX":
        return [[1, arg, 0], [0, 1, 0], [0, 0, 1]]
    if name == "ShearY":
        return [[1, 0, 0], [arg, 1, 0], [0, 0, 1]]
    if name == "TranslateXRel":
        return [[1, 0, arg * w], [0, 1, 0], [0, 0, 1]]
    if name == "TranslateYRel":
        return [[1, 0, 0], [0, 1, arg * h], [0, 0, 1]]
    # PIL rotate: counter-clockwise by arg degrees about the centre
    a = -math.radians(arg)
    cx, cy = w / 2.0, h / 2.0
    cos, sin = math.cos(a), math.sin(a)
    return [[cos, sin, cx - cos * cx - sin * cy], [-sin, cos, cy + sin * cx - cos * cy], [0, 0, 1]]


def _sample(x: torch.Tensor, maps: torch.Tensor, out_hw: tuple, fill: torch.Tensor, mode: str) -> torch.Tensor:
    """Resample each image of ``x`` through its output -> input pixel map (B x 3 x 3); pixels
    mapped from outside the image take ``fill``."""
    b, _, h_in, w_in = x.shape
    h, w = out_hw
    # pixel-coordinate maps -> the normalised maps grid_sample takes (align_corners=False)
    to_norm = _constant(((2.0 / w_in, 0, -1), (0, 2.0 / h_in, -1), (0, 0, 1)), x.device, x.dtype)
    from_norm = _constant(((w / 2.0, 0, w / 2.0), (0, h / 2.0, h / 2.0), (0, 0, 1)), x.device, x.dtype)
    theta = (to_norm @ maps.to(x) @ from_norm)[:, :2]
    grid = F.affine_grid(theta, [b, 1, h, w], align_corners=False)
    f = fill.view(1, -1, 1, 1)
    return F.grid_sample(x - f, grid, mode=mode, padding_mode="zeros", align_corners=False) + f


class BatchViews:
    """Draws plans for a batch of uint8 images on their device, per-sample ops and magnitudes."""

    def __init__(self, size: int, scale, ratio, hflip: float, strong: Optional[RandAugmentSpec],
                 mean, std, interpolation: str = "bilinear"):
        if interpolation not in PIL_FILTERS and interpolation != "nearest":
            raise ValueError(f"interpolation {interpolation!r}: use one of nearest, {', '.join(PIL_FILTERS)}")
        self.size, self.scale, self.ratio, self.hflip, self.strong = size, tuple(scale), tuple(ratio), hflip, strong
        self.interpolation = interpolation
        # RandAugment's geometric ops sample through grid_sample, which has these two modes
        self.mode = "bicubic" if interpolation == "bicubic" else "bilinear"
        self.mean, self.std = tuple(mean), tuple(std)
        self.fill = tuple(float(v) for v in fill_color(mean))

    def __call__(self, images: torch.Tensor, u: torch.Tensor, crop: bool = True, augment: bool = True,
                 normalize: bool = True, channels_last: bool = False, keep_channels: bool = False) -> torch.Tensor:
        """``images``: B x C x H x W uint8 (C = 1 or 3); returns B x 3 x size x size float,
        normalised (or 0..255 with ``normalize=False``, grey kept as one channel with
        ``keep_channels``, for more augmentation before :func:`normalize_images`)."""
        b, c, h, w = images.shape
        sizes = torch.tensor([[h, w]]).expand(b, 2) if crop else None
        plan = make_plan(u.cpu(), sizes, self.scale, self.ratio, self.hflip, self.strong if augment else None)
        x = images.float()
        fill = _constant(self.fill[:c] if c <= 3 else self.fill, x.device, torch.float32)
        if crop:  # crop, resize and flip as PIL's resize(box=...) + transpose compute them
            x = resize_boxes(images, plan.boxes, plan.flip, self.size, self.interpolation)
        elif plan.flip.any():
            idx = plan.flip.nonzero().flatten().to(x.device, non_blocking=True)
            x[idx] = x[idx].flip(3)
        if augment and self.strong is not None:
            x = self._rand_augment(x, plan, fill)
        if not normalize:
            return x if keep_channels else x.expand(-1, 3, -1, -1).contiguous()
        return normalize_images(x, self.mean, self.std, channels_last)

    def _rand_augment(self, x: torch.Tensor, plan: Plan, fill: torch.Tensor) -> torch.Tensor:
        """Layer by layer, each sample its own op: the pointwise ops of a layer as one per-sample
        lookup table (one gather for the batch), the others on their samples."""
        spec = self.strong
        c, h, w = x.shape[1:]
        identity = torch.arange(256, device=x.device, dtype=x.dtype)
        for layer in range(spec.num_layers):
            ops, negate = plan.ops[:, layer], plan.negate[:, layer]
            geo_rows, geo_maps, lut = [], [], None
            for op in ops.unique().tolist():
                if op < 0:
                    continue
                name = spec.ops[op]
                base = name.replace("Increasing", "")
                rows = (ops == op).nonzero().flatten()
                if name in GEOMETRIC:
                    for r in rows.tolist():
                        geo_rows.append(r)
                        geo_maps.append(_geometric_matrix(name, op_argument(name, spec.magnitude, bool(negate[r])),
                                                          h, w))
                    continue
                if base == "Color" and c == 1:
                    continue  # saturation of a grey image: unchanged
                for neg in ((False, True) if name.endswith("Increasing") else (None,)):
                    sub = rows if neg is None else rows[negate[rows] == neg]
                    if len(sub) == 0:
                        continue
                    arg = op_argument(name, spec.magnitude, bool(neg))
                    idx = sub.to(x.device, non_blocking=True)  # plans live on the host: no device sync
                    if base in LUT_OPS:
                        if lut is None:
                            lut = identity.expand(len(x), c, 256).clone()
                        lut[idx] = _lut(base, x[idx], arg, identity)
                    else:
                        x[idx] = _quantize(color_op(name, x[idx], arg))
            if lut is not None:
                x = lut.gather(2, x.long().flatten(2)).view_as(x)
            if geo_rows:
                idx = torch.tensor(geo_rows).to(x.device, non_blocking=True)
                maps = torch.tensor(geo_maps, dtype=torch.float32).to(x.device, non_blocking=True)
                x[idx] = _quantize(_sample(x[idx], maps, (h, w), fill, self.mode))
        return x


LUT_OPS = ("AutoContrast", "Equalize", "Invert", "Posterize", "Solarize", "SolarizeAdd", "Brightness", "Contrast")


def _lut(base: str, x: torch.Tensor, arg, v: torch.Tensor) -> torch.Tensor:
    """The op as a lookup table per image and channel (n x C x 256), rounded as PIL's uint8 output."""
    n, c = x.shape[:2]
    if base == "Equalize":
        v_ = x.long().flatten(2)
        hist = torch.zeros(n, c, 256, dtype=torch.long, device=x.device).scatter_add_(2, v_, torch.ones_like(v_))
        last = 255 - torch.argmax(hist.flip(2).gt(0).long(), dim=2)
        step = (hist.sum(2) - hist.gather(2, last.unsqueeze(2)).squeeze(2)) // 255
        lut = ((step // 2).unsqueeze(2) + torch.cumsum(hist, 2) - hist) // step.clamp(min=1).unsqueeze(2)
        return torch.where(step.unsqueeze(2) > 0, lut.clamp(max=255).to(x.dtype), v.expand(n, c, 256))
    if base == "AutoContrast":
        lo = x.amin(dim=(2, 3)).unsqueeze(2)
        hi = x.amax(dim=(2, 3)).unsqueeze(2)
        out = torch.floor((v - lo) * (255.0 / (hi - lo).clamp(min=1.0))).clamp(0, 255)
        return torch.where(hi > lo, out, v.expand(n, c, 256))
    if base == "Contrast":
        mean = torch.floor(_quantize(_gray(x)).mean(dim=(1, 2, 3)) + 0.5).view(n, 1, 1)
        return _quantize(mean + arg * (v - mean)).expand(n, c, 256)
    return color_op(base, v.view(1, 1, 1, 256), arg).round().clamp(0, 255).view(1, 1, 256).expand(n, c, 256)


def normalize_images(x: torch.Tensor, mean, std, channels_last: bool = False) -> torch.Tensor:
    """0..255 images (grey or colour, any dtype) to the normalised 3-channel float input in one
    op, in the model's memory format."""
    x = x.float()
    std_t = _constant(tuple(std), x.device, x.dtype).view(1, 3, 1, 1)
    scale = 1.0 / (255.0 * std_t)
    shift = -_constant(tuple(mean), x.device, x.dtype).view(1, 3, 1, 1) / std_t
    out = torch.empty((x.shape[0], 3, *x.shape[2:]), device=x.device, dtype=x.dtype,
                      memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return torch.addcmul(shift, x, scale, out=out)


# --- crop + resize with PIL's arithmetic ----------------------------------------------------------
# Pillow's resize (libImaging/Resample.c) is separable: per output pixel, a filter centred on
# in0 + (i + 0.5) * scale, widened by the downscaling factor (antialiasing), cut to the image,
# normalised to sum 1 and rounded to 22-bit fixed point; a horizontal pass rounded to uint8, then a
# vertical one. Below, the same coefficients for every sample of a batch, summed a tap at a time
# in int32 as Pillow sums them: integer arithmetic, so the result is PIL's to the bit on any
# device, and a sample's pixels never depend on the rest of the batch. The cost grows with the
# taps: 3 per pass when upscaling with bilinear (the embedded default: 28 -> 32 px), 2 x the
# downscaling factor + 1 when downscaling (7 at 96 -> 32 px), where the antialiasing is.

_PRECISION = float(1 << 22)          # Pillow's PRECISION_BITS (22) for 8-bit images
_HAMMING_A, _HAMMING_B = float(np.float32(0.54)), float(np.float32(0.46))   # float literals in Pillow's C


def _box_filter(x: torch.Tensor) -> torch.Tensor:
    return ((x > -0.5) & (x <= 0.5)).to(x.dtype)


def _bilinear_filter(x: torch.Tensor) -> torch.Tensor:
    return (1.0 - x.abs()).clamp(min=0.0)


def _hamming_filter(x: torch.Tensor) -> torch.Tensor:
    a = x.abs()
    t = a * math.pi
    out = torch.sin(t) / t * (_HAMMING_A + _HAMMING_B * torch.cos(t))
    return torch.where(a == 0, 1.0, torch.where(a >= 1, 0.0, out))


def _bicubic_filter(x: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    x = x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, 0.0))


def _sinc(x: torch.Tensor) -> torch.Tensor:
    t = x * math.pi
    return torch.where(x == 0, 1.0, torch.sin(t) / t)


def _lanczos_filter(x: torch.Tensor) -> torch.Tensor:
    return torch.where((x >= -3.0) & (x < 3.0), _sinc(x) * _sinc(x / 3), 0.0)


# name -> (kernel, support at scale 1), as Pillow defines them
PIL_FILTERS = {"box": (_box_filter, 0.5), "bilinear": (_bilinear_filter, 1.0), "hamming": (_hamming_filter, 1.0),
               "bicubic": (_bicubic_filter, 2.0), "lanczos": (_lanczos_filter, 3.0)}


def _taps(longest: float, out_size: int, name: str) -> int:
    """Pillow's ``ksize``: how many source pixels one output pixel reads at most, resizing spans
    of at most ``longest`` pixels."""
    return int(math.ceil(PIL_FILTERS[name][1] * max(1.0, longest / out_size))) * 2 + 1


def _resize_taps(start: torch.Tensor, length: torch.Tensor, in_size: torch.Tensor, out_size: int, name: str,
                 taps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pillow's resize of ``[start, start + length)`` out of ``in_size`` pixels, for each row of a
    batch (B, float64): per output pixel the ``taps`` source positions it reads (B x out x taps,
    kept inside the image) and their int32 fixed-point coefficients (0 outside its window)."""
    kernel, support = PIL_FILTERS[name]
    scale = (length / out_size).unsqueeze(1)
    filterscale = scale.clamp(min=1.0)                     # downscaling widens the filter: antialiasing
    reach = support * filterscale
    center = start.unsqueeze(1) + (torch.arange(out_size, dtype=torch.float64, device=start.device) + 0.5) * scale
    lo = (center - reach + 0.5).long().clamp_(min=0)      # C's (int) truncation, as Pillow rounds the window
    hi = (center + reach + 0.5).long().minimum(in_size.long().unsqueeze(1))
    pos = lo.unsqueeze(2) + torch.arange(taps, device=start.device)
    w = kernel((pos - center.unsqueeze(2) + 0.5) * (1.0 / filterscale).unsqueeze(2))
    w = w.masked_fill_(pos >= hi.unsqueeze(2), 0.0)
    total = w.sum(2, keepdim=True)
    w = w / total.masked_fill_(total == 0, 1.0)
    fixed = (w * _PRECISION + torch.where(w < 0, -0.5, 0.5)).int()
    return pos.minimum(in_size.long().view(-1, 1, 1) - 1), fixed


_TABLE_ENTRIES = 1 << 20   # largest span table kept (8 bytes an entry) per (source size, output size, filter, device)


@functools.lru_cache(maxsize=8)
def _span_table(in_size: int, out_size: int, name: str, device: torch.device) -> Optional[tuple]:
    """:func:`_resize_taps` of every span ``[start, start + length)`` of an ``in_size`` line,
    made once: a batch then looks its spans up (row ``start * (in_size + 1) + length``) instead
    of computing them, which on small images (the embedded MNIST digits) costs more than the
    resampling itself. None when the table would be large (big sources): computed per batch."""
    taps = _taps(in_size, out_size, name)
    if in_size * (in_size + 1) * out_size * taps > _TABLE_ENTRIES:
        return None
    start = torch.arange(in_size, dtype=torch.float64, device=device).repeat_interleave(in_size + 1)
    length = torch.arange(in_size + 1, dtype=torch.float64, device=device).repeat(in_size)
    index, coefficients = _resize_taps(start, length, torch.full_like(start, in_size), out_size, name, taps)
    return index.int(), coefficients


def _spans(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int, name: str, taps: int,
           device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_resize_taps` of the spans of a batch (``start``, ``length``: B on the host), on ``device``."""
    table = _span_table(in_size, out_size, name, device)
    if table is None:
        start, length = start.to(device, non_blocking=True).double(), length.to(device, non_blocking=True).double()
        return _resize_taps(start, length, torch.full_like(start, in_size), out_size, name, taps)
    rows = (start * (in_size + 1) + length).to(device, non_blocking=True)
    return table[0][rows, :, :taps], table[1][rows, :, :taps]


def _nearest_rows(start: torch.Tensor, length: torch.Tensor, out_size: int) -> torch.Tensor:
    """B x out_size source indices of Pillow's nearest resize, whose positions are a running sum
    (``x += step``, rounding included): a sequential cumulative sum, on the host."""
    step = length.double().cpu().numpy()[:, None] / out_size
    steps = np.concatenate([start.double().cpu().numpy()[:, None] + step * 0.5,
                            np.broadcast_to(step, (len(step), out_size - 1))], axis=1)
    return torch.from_numpy(np.floor(np.cumsum(steps, axis=1))).long()


def _fixed_point_pass(x: torch.Tensor, index: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """One pass of Pillow's resize along dim 1 of a batch ``B x N x ...`` (uint8 or int32 values):
    each output line the fixed-point sum of its taps (``index``, ``coefficients``: B x out x
    taps), summed in int32 as Pillow sums them, rounded and clipped as Pillow does. A tap is a
    whole line of the batch: one row-wise ``index_select`` per tap, no B x out x taps x ... temporary."""
    b, n = x.shape[:2]
    out, taps = index.shape[1:]
    lines = x.reshape(b * n, -1).int()
    index = (index + (torch.arange(b, device=x.device) * n).view(b, 1, 1)).permute(2, 0, 1).reshape(taps, -1)
    coefficients = coefficients.permute(2, 0, 1).reshape(taps, -1, 1)
    acc = torch.full((b * out, lines.shape[1]), 1 << 21, dtype=torch.int32, device=x.device)
    for k in range(taps):
        acc.addcmul_(lines.index_select(0, index[k]), coefficients[k])
    return (acc >> 22).clamp_(0, 255).view(b, out, *x.shape[2:])


def resize_boxes(images: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int,
                 interpolation: str = "bilinear") -> torch.Tensor:
    """Each image's box (B x 4 on the host: top, left, height, width) resized to ``size`` x
    ``size`` and mirrored where ``flip``: PIL's ``img.resize((size, size), filter, box=...)``
    then ``transpose(FLIP_LEFT_RIGHT)``, to the bit. ``images``: B x C x H x W uint8 on any
    device; returns float32 0..255 on that device. Only the boxes travel to the device."""
    b, c, h, w = images.shape
    device = images.device
    if b == 0:
        return images.new_zeros((0, c, size, size), dtype=torch.float32)
    top, left, bh, bw = boxes.unbind(1)
    if interpolation == "nearest":
        rows = _nearest_rows(top, bh, size).to(device, non_blocking=True)
        cols = _nearest_rows(left, bw, size)
        cols = torch.where(flip.unsqueeze(1), cols.flip(1), cols).to(device, non_blocking=True)
        x = images.gather(2, rows.view(b, 1, size, 1).expand(b, c, size, w))
        return x.gather(3, cols.view(b, 1, 1, size).expand(b, c, size, size)).float()
    cols, across = _spans(left, bw, w, size, interpolation, _taps(float(bw.max()), size, interpolation), device)
    rows, down = _spans(top, bh, h, size, interpolation, _taps(float(bh.max()), size, interpolation), device)
    flip = flip.to(device, non_blocking=True).view(b, 1, 1)
    cols, across = torch.where(flip, cols.flip(1), cols), torch.where(flip, across.flip(1), across)
    x = _fixed_point_pass(images.permute(0, 3, 1, 2), cols, across)        # horizontal: B x size x C x H
    x = _fixed_point_pass(x.permute(0, 3, 2, 1), rows, down)                   # vertical: B x size x C x size
    return x.permute(0, 2, 1, 3).float().contiguous()
