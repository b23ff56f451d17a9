"""CUDA paths: mixed precision, channels_last, compile, the EMAN teacher, checkpoints, NCCL.

Marked ``gpu`` and skipped without CUDA (``python -m pytest -m gpu``); the GPU check
(``benchmarks/gpu_check.py``) runs them on a lent GPU machine.
"""
import os

import pytest
import torch

from dpl_zoo.config import load_config
from dpl_zoo.inputs import epoch_loaders, step_inputs
from dpl_zoo.run import build_run
from dpl_zoo.train import fit, train_step

from conftest import tiny_overrides

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture
def cuda_config(image_data, tmp_path):
    def make(**extra):
        return load_config(None, tiny_overrides(image_data, tmp_path / "runs", device="cuda", **extra))
    return make


def _one_step(run, step=0):
    lab, unl = epoch_loaders(run, 0)
    run.task.train()
    return train_step(run, step_inputs(run, next(iter(lab)), next(iter(unl)) if unl is not None else None), step)


def test_fp16_amp_step_with_grad_scaler_and_a_skipped_overflow_step(cuda_config):
    run = build_run(cuda_config(amp=True, amp_dtype="float16"))
    assert run.scaler is not None
    _one_step(run)
    before = [p.detach().clone() for p in run.model.parameters()]
    scaler = run.scaler._scaler
    scaler.update(2.0 ** 60)  # the next backward overflows in float16
    scale = scaler.get_scale()
    _one_step(run, 1)
    assert all(torch.equal(a, b) for a, b in zip(before, run.model.parameters()))  # the step was skipped
    assert scaler.get_scale() < scale
    out = _one_step(run, 2)
    assert torch.isfinite(out["loss"]) and out["result"].qhat.dtype == torch.float32


def test_bf16_step_without_scaler_and_float32_prior(cuda_config):
    run = build_run(cuda_config(amp=True, amp_dtype="bfloat16"))
    assert run.scaler is None
    out = _one_step(run)
    assert torch.isfinite(out["loss"]) and run.task.criterion.prior.qhat.dtype == torch.float32
    assert out["output"].dtype == torch.bfloat16 and out["result"].loss_u.dtype == torch.float32


def test_eman_teacher_under_autocast_stays_float32_and_eval(cuda_config):
    run = build_run(cuda_config(amp=True, **{"dpl.ema_teacher": True}))
    _one_step(run)
    teacher = run.task.teacher()
    assert not teacher.training and all(p.dtype == torch.float32 for p in teacher.parameters())
    assert all(b.dtype == torch.float32 for n, b in teacher.named_buffers() if b.is_floating_point())


def test_compiled_student(cuda_config):
    summary = fit(cuda_config(compile=True, epochs=1), quiet=True)
    assert summary["steps"] == 2


@pytest.mark.parametrize("views", [1, 2])
def test_compiled_criterion_matches_eager_on_cuda(views):
    from dpl_zoo.method import DebiasPLLoss
    eager, compiled = DebiasPLLoss(10, tau=0.4).cuda(), DebiasPLLoss(10, tau=0.4).cuda()
    compiled.compile()
    for step in range(3):
        g = torch.Generator(device="cuda").manual_seed(step)
        weak = [torch.randn(40, 10, device="cuda", generator=g) * 4 for _ in range(views)]
        strong = [torch.randn(40, 10, device="cuda", generator=g, requires_grad=True) for _ in range(views)]
        lx, y = torch.randn(8, 10, device="cuda", generator=g), torch.randint(0, 10, (8,), device="cuda", generator=g)
        a, b = eager(weak, strong, lx, y), compiled(weak, strong, lx, y)
        assert torch.allclose(a.loss, b.loss, rtol=1e-5, atol=1e-6) and torch.equal(a.targets, b.targets)
        assert torch.equal(a.mask, b.mask) and torch.allclose(a.qhat, b.qhat, rtol=1e-6, atol=1e-7)
        ga, gb = torch.autograd.grad(a.loss, strong), torch.autograd.grad(b.loss, strong)
        assert all(torch.allclose(u, v, rtol=1e-4, atol=1e-7) for u, v in zip(ga, gb))


def test_deterministic_run_on_cuda(cuda_config):
    a = fit(cuda_config(deterministic=True, epochs=1, experiment="a"), quiet=True)
    b = fit(cuda_config(deterministic=True, epochs=1, experiment="b"), quiet=True)
    assert a["qhat"] == b["qhat"] and a["top1"] == b["top1"]
    assert not torch.are_deterministic_algorithms_enabled()


def test_nccl_process_group_at_world_size_one(monkeypatch):
    import torch.distributed as dist
    from dpl_zoo import distributed as dist_utils
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533", "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    dist.init_process_group("nccl")
    try:
        t = torch.ones(3, device="cuda")
        dist.all_reduce(t)
        assert t.tolist() == [1.0, 1.0, 1.0]
        from dpl_zoo.method import ClassPrior
        prior = ClassPrior(3, momentum=0.5).cuda()
        prior.update(torch.tensor([[1.0, 0.0, 0.0]], device="cuda"))
        assert torch.allclose(prior.qhat.cpu(), torch.tensor([[2 / 3, 1 / 6, 1 / 6]]))
    finally:
        dist.destroy_process_group()
    assert os.environ["WORLD_SIZE"] == "1" and not dist_utils.is_distributed()


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
def test_batched_crops_on_cuda_are_the_cpu_crops(interpolation):
    # PIL's resize arithmetic in integers (dpl_zoo.augment.resize_boxes): the same pixels on any device
    from dpl_zoo.augment import BatchViews, RandAugmentSpec, plan_size, plan_uniforms
    n, spec = 64, RandAugmentSpec.parse("rand-m10-n2")
    g = torch.Generator().manual_seed(0)
    for source in (96, 28):
        imgs = torch.randint(0, 256, (n, 3, source, source), generator=g, dtype=torch.uint8)
        u = plan_uniforms(0, 0, torch.arange(n), 0, plan_size(spec))
        bv = BatchViews(32, (0.08, 1.0), (3 / 4, 4 / 3), 0.5, spec, (0.5,) * 3, (0.5,) * 3, interpolation)
        cpu = bv(imgs, u, augment=False, normalize=False)
        assert torch.equal(bv(imgs.cuda(), u, augment=False, normalize=False).cpu(), cpu)
