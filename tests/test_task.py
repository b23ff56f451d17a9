"""The timm TrainingTask: teacher handling and task state."""
import pytest
import timm
import torch

from dpl_zoo.method import DebiasPLLoss
from dpl_zoo.task import DebiasPLTask


def _task(ema=0.9, **kw):
    model = timm.create_model("test_resnet", num_classes=3)
    return DebiasPLTask(model, DebiasPLLoss(3, tau=0.4, threshold=0.0), ema_decay=ema, **kw)


def test_eman_teacher_stays_in_eval_mode_and_gets_no_gradient():
    task = _task().train()
    teacher = task.teacher()
    assert not teacher.training and task.trainable_module.training
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    out = task(x, y, [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)])
    out["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None for p in task.trainable_module.parameters())


def test_ema_update_averages_batchnorm_statistics():
    task = _task(ema=0.5).train()
    task.update_ema(step=0)  # timm: first update copies
    task(torch.randn(2, 3, 32, 32) * 5 + 3, torch.tensor([0, 1]),
         [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)])["loss"].backward()
    before = task.teacher().state_dict()["bn1.running_mean"].clone()
    task.update_ema(step=5)
    student = task.trainable_module.state_dict()["bn1.running_mean"]
    assert torch.allclose(task.teacher().state_dict()["bn1.running_mean"], 0.5 * before + 0.5 * student)


def test_without_eman_the_student_makes_pseudo_labels():
    task = _task(ema=None).train()
    assert not task.has_ema() and task.teacher() is task.trainable_module
    out = task(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]), [torch.randn(4, 3, 32, 32)] * 2)
    assert out["result"].targets.shape == (4,)


def test_an_ema_kept_for_evaluation_only_leaves_the_pseudo_labels_to_the_student(tiny_config):
    """ema_pseudo_labels=False (FixMatch's and USB's way): the step is the no-EMA step bit for bit, and
    the average is still there to evaluate; through a run, model_ema_eval reports its top-1."""
    from dpl_zoo.train import fit
    torch.manual_seed(0)
    plain = _task(ema=None).train()
    kept = _task(ema=0.5, ema_pseudo_labels=False).train()
    kept.trainable_module.load_state_dict(plain.trainable_module.state_dict())
    kept.averaged().load_state_dict({k: torch.zeros_like(v) if v.is_floating_point() else v
                                     for k, v in plain.trainable_module.state_dict().items()})   # a useless average
    x, y, views = torch.randn(2, 3, 32, 32), torch.tensor([0, 1]), [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    a, b = plain(x, y, views), kept(x, y, views)
    assert torch.equal(a["loss"], b["loss"]) and torch.equal(a["result"].targets, b["result"].targets)
    assert kept.teacher() is kept.trainable_module and kept.averaged() is not None and plain.averaged() is None
    student = fit(tiny_config(experiment="s", **{"dpl.ema_teacher": False}), quiet=True)
    averaged = fit(tiny_config(experiment="a", **{"dpl.ema_teacher": False, "model_ema_eval": True}), quiet=True)
    assert student["teacher_top1"] is None and averaged["teacher_top1"] is not None
    assert averaged["top1"] == student["top1"]    # the same training: the average only watches


def test_task_state_holds_qhat_and_checks_class_count():
    task = _task()
    task.criterion.prior.qhat.copy_(torch.tensor([[0.5, 0.3, 0.2]]))
    state = task.get_task_state()
    fresh = _task()
    fresh.load_task_state(state)
    assert torch.equal(fresh.criterion.prior.qhat, state["qhat"])
    other = DebiasPLTask(timm.create_model("test_resnet", num_classes=4), DebiasPLLoss(4), ema_decay=None)
    with pytest.raises(ValueError, match="another class count"):
        other.load_task_state(state)


def test_wrong_number_of_views():
    with pytest.raises(ValueError, match="1 weak and 1 strong"):
        _task()(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]), [torch.randn(4, 3, 32, 32)])


def test_criterion_state_follows_the_task_device():
    # a loop that builds the task with device=cuda gets qhat and the target prior on that device
    # (the meta device stands in for a GPU here: no memory, same placement rules)
    model = timm.create_model("test_resnet", num_classes=3).to("meta")
    crit = DebiasPLLoss(3, tau=0.4, threshold=0.0, target_prior=[0.5, 0.3, 0.2])
    task = DebiasPLTask(model, crit, ema_decay=None, device=torch.device("meta"))
    assert {b.device.type for b in task.criterion.buffers()} == {"meta"}
    assert {b.device.type for b in _task(ema=None).criterion.buffers()} == {"cpu"}


def test_ema_update_equals_timm_model_ema_v3_bit_for_bit():
    # the task's update finds its tensor pairs once; it must give timm's ModelEmaV3.update exactly,
    # with the warm-up decay, integer buffers, and after .to()-style swaps of the student's tensors
    import copy
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    ours = DebiasPLTask(copy.deepcopy(model), DebiasPLLoss(3), ema_decay=0.9, ema_warmup=True)
    ref = DebiasPLTask(copy.deepcopy(model), DebiasPLLoss(3), ema_decay=0.9, ema_warmup=True)
    x, y, unl = torch.randn(2, 3, 32, 32), torch.tensor([0, 1]), [torch.randn(4, 3, 32, 32)] * 2
    for step in range(6):
        if step == 3:
            for task in (ours, ref):   # new tensor objects for every parameter's data and buffer
                task.trainable_module._apply(lambda t: t.clone())
        for task in (ours, ref):
            torch.manual_seed(step)
            task.train()(x, y, unl)["loss"].backward()
            with torch.no_grad():
                for p in task.trainable_module.parameters():
                    p.sub_(0.1 * p.grad)
                    p.grad = None
        ours.update_ema(step=step)
        ref.get_trainable_module(ema=True).update(ref.trainable_module, step=step)
        a, b = ours.teacher().state_dict(), ref.teacher().state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b), step
    assert int(a["bn1.num_batches_tracked"]) == 6
