"""Seeded views: the plan, the PIL path and the batched path agree; randomness is per sample."""
import math
import random
from collections import defaultdict

import numpy as np
import pytest
import torch
from PIL import Image

from dpl_zoo.augment import (
    BatchViews, PILViews, RAND_OPS, RandAugmentSpec, crop_boxes, op_argument, pil_to_uint8, plan_size,
    plan_uniforms,
)

SPEC = RandAugmentSpec.parse("rand-m10-n2")


def _smooth_images(n, size=32, seed=0):
    """Smooth colour images: small interpolation differences stay small."""
    rng = np.random.default_rng(seed)
    base = torch.from_numpy(rng.integers(0, 255, (n, 3, 8, 8)).astype(np.float32))
    return torch.nn.functional.interpolate(base, size=size, mode="bilinear").round().clamp(0, 255).to(torch.uint8)


def test_plan_is_a_pure_function_of_the_draw():
    a = plan_uniforms(3, 1, torch.arange(10), view=0, size=31)
    b = plan_uniforms(3, 1, torch.tensor([7, 2, 9]), view=0, size=31)
    assert torch.equal(a[[7, 2, 9]], b)  # the same draw gives the same row in any batch
    assert (a >= 0).all() and (a < 1).all()
    for other in (plan_uniforms(4, 1, torch.arange(10), 0, 31), plan_uniforms(3, 2, torch.arange(10), 0, 31),
                  plan_uniforms(3, 1, torch.arange(10), 1, 31)):
        assert not torch.equal(a, other)  # seed, epoch and view each change the plan
    big = plan_uniforms(0, 0, torch.arange(20000), 0, 4)
    assert abs(big.mean().item() - 0.5) < 0.01 and abs(big.std().item() - math.sqrt(1 / 12)) < 0.01
    assert abs(np.corrcoef(big[:, 0], big[:, 1])[0, 1]) < 0.03


def test_no_global_rng_is_touched():
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    imgs = _smooth_images(4)
    u = plan_uniforms(0, 0, torch.arange(4), 1, plan_size(SPEC))
    BatchViews(32, (0.5, 1), (0.75, 1.33), 0.5, SPEC, (0.5,) * 3, (0.5,) * 3)(imgs, u)
    pv = PILViews(32, (0.5, 1), (0.75, 1.33), 0.5, SPEC)
    pil = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in imgs]
    plan = pv.plans(u, pil)
    [pv.apply(im, plan, k) for k, im in enumerate(pil)]
    assert random.getstate() == states[0] and np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])


def test_crop_boxes_follow_random_resized_crop():
    n = 4000
    u = plan_uniforms(0, 0, torch.arange(n), 0, 32)
    h, w = torch.full((n,), 40), torch.full((n,), 60)
    boxes = crop_boxes(u, h, w, (0.2, 1.0), (3 / 4, 4 / 3))
    top, left, bh, bw = boxes.double().unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + bh <= 40).all() and (left + bw <= 60).all()
    area = bh * bw / 2400
    assert area.min() >= 0.19 and area.max() <= 1.0
    assert ((bw / bh) > 3 / 4 - 0.1).all() and ((bw / bh) < 4 / 3 + 0.1).all()
    # an impossible ratio falls back to the centred crop of the whole image, as torchvision does
    fallback = crop_boxes(u[:3], torch.full((3,), 10), torch.full((3,), 100), (0.9, 1.0), (1.0, 1.0))
    assert fallback.tolist() == [[0, 45, 10, 10]] * 3


def test_op_arguments_match_timm_levels():
    from timm.data.auto_augment import LEVEL_TO_ARG, _HPARAMS_DEFAULT
    for name in RAND_OPS + ("PosterizeIncreasing", "SolarizeIncreasing", "ColorIncreasing"):
        fn = LEVEL_TO_ARG[name]
        for m in (3, 7, 10):
            ours = op_argument(name, m, negate=False)
            if fn is None:
                assert ours is None
                continue
            random.seed(0)
            values = {round(abs(fn(m, dict(_HPARAMS_DEFAULT))[0] - (1.0 if name == "ColorIncreasing" else 0.0)), 9)
                      for _ in range(20)}
            assert len(values) == 1
            assert abs(ours - (1.0 if name == "ColorIncreasing" else 0.0)) == pytest.approx(values.pop()), (name, m)


def test_parse_refuses_what_it_cannot_seed():
    assert RandAugmentSpec.parse("rand-m9-n3-p0.7").num_layers == 3
    assert RandAugmentSpec.parse("rand-m10-n2-inc1").ops[4] == "PosterizeIncreasing"
    with pytest.raises(ValueError, match="mstd"):
        RandAugmentSpec.parse("rand-m9-mstd0.5")
    with pytest.raises(ValueError, match="only timm's RandAugment"):
        RandAugmentSpec.parse("augmix-m5")


def test_pil_and_batched_paths_agree_op_by_op():
    n = 600
    imgs = _smooth_images(n)
    u = plan_uniforms(0, 0, torch.arange(n), 1, plan_size(SPEC))
    pv = PILViews(32, (0.7, 1.0), (0.85, 1.18), 0.5, SPEC, "bilinear", (0.5,) * 3)
    bv = BatchViews(32, (0.7, 1.0), (0.85, 1.18), 0.5, SPEC, (0.5,) * 3, (0.5,) * 3, "bilinear")
    pil = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in imgs]
    plan = pv.plans(u, pil, crop=False)
    ours = torch.stack([pil_to_uint8(pv.apply(im, plan, k, crop=False)) for k, im in enumerate(pil)]).float()
    batched = bv(imgs, u, crop=False, normalize=False)
    diff = (ours - batched).abs().mean(dim=(1, 2, 3))
    per_op = defaultdict(list)
    for k in range(n):
        ops = [SPEC.ops[o] for o in plan.ops[k].tolist() if o >= 0]
        per_op[ops[0] if len(ops) == 1 else ("none" if not ops else "two")].append(diff[k].item())
    assert max(per_op["none"]) == 0  # flip only: identical
    for name in RAND_OPS:
        assert per_op[name], f"{name} never drawn in {n} samples"
        limit = 1.5 if name in ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel") else 0.5
        assert np.mean(per_op[name]) < limit, (name, np.mean(per_op[name]))  # gray levels, of 255


def _photo_crops(n, size, seed=0):
    """Real-looking sources: ``n`` square crops of a photograph (matplotlib's sample image), ``size`` px."""
    import matplotlib.cbook
    photo = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(n):
        s = int(rng.integers(150, min(photo.size)))
        left, top = int(rng.integers(0, photo.width - s + 1)), int(rng.integers(0, photo.height - s + 1))
        crops.append(photo.resize((size, size), Image.Resampling.LANCZOS, box=(left, top, left + s, top + s)))
    return crops


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "lanczos", "box", "hamming", "nearest"])
@pytest.mark.parametrize("source, grey", [(96, False), (28, False), (28, True)])
def test_pil_and_batched_crops_agree(interpolation, source, grey):
    # RandomResizedCrop + flip: downscaling 96 -> 32 px (where PIL's resize antialiases: plain
    # bilinear sampling was up to 125 grey levels off on this photo) and upscaling 28 -> 32 (the
    # embedded default's MNIST digits, grey)
    n = 48
    pil = [im.convert("L") if grey else im for im in _photo_crops(n, source)]
    imgs = torch.stack([pil_to_uint8(im) for im in pil])
    u = plan_uniforms(0, 0, torch.arange(n), 0, plan_size(None))
    pv = PILViews(32, (0.08, 1.0), (3 / 4, 4 / 3), 0.5, None, interpolation, (0.5,) * 3)
    bv = BatchViews(32, (0.08, 1.0), (3 / 4, 4 / 3), 0.5, None, (0.5,) * 3, (0.5,) * 3, interpolation)
    plan = pv.plans(u, pil)
    assert plan.flip.any() and ((plan.boxes[:, 2:] > 32) if source > 32 else (plan.boxes[:, 2:] < 32)).any()
    ours = torch.stack([pil_to_uint8(pv.apply(im, plan, k)) for k, im in enumerate(pil)]).float()
    batched = bv(imgs, u, normalize=False)[:, :ours.shape[1]]
    diff = (ours - batched).abs()
    assert diff.max().item() == 0, (diff.max().item(), diff.mean().item())   # PIL's own arithmetic, bit for bit


def test_randomness_is_per_sample_and_batch_independent():
    n = 64
    imgs = _smooth_images(n)
    u = plan_uniforms(5, 0, torch.arange(n), 1, plan_size(SPEC))
    bv = BatchViews(32, (0.5, 1.0), (0.75, 1.33), 0.5, SPEC, (0.5,) * 3, (0.25,) * 3)
    whole = bv(imgs, u)
    halves = torch.cat([bv(imgs[:n // 2], u[:n // 2]), bv(imgs[n // 2:], u[n // 2:])])
    assert torch.equal(whole, halves)  # what 1 process and 2 processes compute
    same = bv(imgs[:1].expand(n, -1, -1, -1).contiguous(), u)
    distinct = {tuple(x.flatten()[:64].tolist()) for x in same}
    assert len(distinct) > n * 0.9  # one image, n different views: ops and magnitudes drawn per sample


def test_grey_images_stay_grey_and_expand_to_rgb():
    g = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (8, 1, 28, 28)).astype(np.uint8))
    u = plan_uniforms(0, 0, torch.arange(8), 1, plan_size(SPEC))
    out = BatchViews(32, (0.7, 1), (0.85, 1.18), 0.0, SPEC, (0.5,) * 3, (0.5,) * 3)(g, u)
    assert out.shape == (8, 3, 32, 32) and torch.equal(out[:, 0], out[:, 2])


def test_batched_views_make_their_constants_once(monkeypatch):
    # on a GPU every constant built per call is a blocking host-to-device copy (a host sync per
    # view per step); after the first batch, BatchViews builds none
    from dpl_zoo import augment
    n = 32
    imgs = _smooth_images(n)
    bv = BatchViews(32, (0.5, 1.0), (0.75, 1.33), 0.5, SPEC, (0.5,) * 3, (0.25,) * 3)
    first = bv(imgs, plan_uniforms(1, 0, torch.arange(n), 1, plan_size(SPEC)))
    made = []   # constants built on the images' device: torch.tensor(..., device=...) or x.new_tensor(...)
    real_tensor, real_new = torch.tensor, torch.Tensor.new_tensor
    monkeypatch.setattr(augment.torch, "tensor",
                        lambda *a, **k: (k.get("device") is not None and made.append(a)) or real_tensor(*a, **k))
    monkeypatch.setattr(torch.Tensor, "new_tensor", lambda self, *a, **k: made.append(a) or real_new(self, *a, **k))
    misses = augment._constant.cache_info().misses
    again = bv(imgs, plan_uniforms(1, 0, torch.arange(n), 1, plan_size(SPEC)))
    monkeypatch.undo()
    assert torch.equal(first, again)
    assert made == [] and augment._constant.cache_info().misses == misses
