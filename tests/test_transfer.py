"""Transfer settings: the backbone's lr scale, frozen stages, cached views of a frozen backbone."""
import json

import pytest
import timm
import torch

from dpl_zoo.cli import main
from dpl_zoo.config import ConfigError, load_config
from dpl_zoo.freeze import FreezeError, freeze, frozen_parameter_names, split_for_cache
from dpl_zoo.optim import build_optimization
from dpl_zoo.progress import Reporter
from dpl_zoo.run import build_run
from dpl_zoo.train import fit

from conftest import as_bmp, make_start_folder, repaint, tiny_overrides


def cached_config(tiny_config, **extra):
    base = {"freeze": "backbone", "data.cached_views": 2, "epochs": 2, "steps_per_epoch": 3}
    base.update(extra)
    return tiny_config(**base)


def test_backbone_lr_scale_reaches_timm_param_groups_and_the_schedule():
    model = timm.create_model("test_resnet", num_classes=3)
    cfg = load_config(None, ["backbone_lr_scale=0.1", "lr=0.05", "weight_decay=0.0001", "sched=cosine", "epochs=2"])
    opt, sched = build_optimization(cfg, model, steps_per_epoch=10)
    head = {id(p) for p in model.fc.parameters()}
    for group in opt.param_groups:
        in_head = [id(p) in head for p in group["params"]]
        assert all(in_head) or not any(in_head)           # a group is head or backbone, never both
        # the first step already runs at the scaled lr (the schedule is applied at update 0)
        assert group["lr"] == pytest.approx(0.05 if in_head[0] else 0.005)
        assert group["weight_decay"] == (0.0 if group["params"][0].ndim <= 1 else 0.0001)
    sched.step_update(10)                                  # half way through the cosine
    for group in opt.param_groups:
        base = 0.05 if id(group["params"][0]) in head else 0.005
        assert group["lr"] == pytest.approx(base * 0.5, rel=1e-6)
    # composes with layer_decay: the head keeps scale 1, every other layer is scaled by 0.1 on top
    vit = timm.create_model("test_vit", num_classes=3)
    cfg = load_config(None, ["backbone_lr_scale=0.1", "layer_decay=0.5", "lr=0.1", "opt=adamw"])
    opt, _ = build_optimization(cfg, vit, steps_per_epoch=10)
    head = {id(p) for p in vit.head.parameters()}
    scales = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    assert {scales[i] for i in head} == {1.0}
    assert max(s for i, s in scales.items() if i not in head) == pytest.approx(0.1 * 0.5)


def test_bad_transfer_settings_are_config_errors():
    for overrides, message in ((["freeze=backbon"], "freeze must be backbone"),
                               (["freeze=-1"], "freeze must be backbone"),
                               (["backbone_lr_scale=0"], "backbone_lr_scale must be > 0"),
                               (["data.cached_views=4"], "set freeze"),
                               (["freeze=backbone", "data.cached_views=0"], "cached_views must be >= 1")):
        with pytest.raises(ConfigError, match=message):
            load_config(None, overrides)
    model = timm.create_model("test_resnet", num_classes=3)
    with pytest.raises(FreezeError, match="0..5"):
        frozen_parameter_names(model, 6)
    with pytest.raises(FreezeError, match="not VisionTransformer"):
        split_for_cache(timm.create_model("test_vit", num_classes=3), 2)


def test_freeze_counts_timm_groups_and_fixes_batchnorm():
    model = timm.create_model("test_resnet", num_classes=3)
    names = frozen_parameter_names(model, 2)
    assert names and all(n.startswith(("conv1", "bn1", "layer1.")) for n in names)
    frozen = freeze(model, 2)
    assert frozen and all(not p.requires_grad for n, p in model.named_parameters() if n in names)
    assert all(p.requires_grad for n, p in model.named_parameters() if n not in names)
    from torchvision.ops.misc import FrozenBatchNorm2d
    assert isinstance(model.layer1[0].bn1, FrozenBatchNorm2d) and not isinstance(model.layer2[0].bn1,
                                                                                 FrozenBatchNorm2d)


def test_freeze_backbone_freezes_the_parameters_a_vit_holds_itself():
    """A ViT's cls_token and pos_embed are parameters of the model itself, beside its head."""
    model = timm.create_model("test_vit", num_classes=3)
    freeze(model, "backbone")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}


@pytest.mark.parametrize("arch,spec", [("test_resnet", "backbone"), ("test_resnet", 3),
                                       ("test_efficientnet", "backbone"), ("test_efficientnet", 4),
                                       ("test_vit", "backbone")])
def test_cached_prefix_and_tail_compute_the_model(arch, spec):
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=5, drop_rate=0.5)
    for m in model.modules():   # BatchNorm statistics of a trained model, not the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    freeze(model, spec)
    model.eval()
    prefix, tail = split_for_cache(model, spec)
    x = torch.randn(4, *(model.pretrained_cfg["input_size"] if arch == "test_vit" else (3, 32, 32)))
    with torch.no_grad():
        torch.testing.assert_close(tail(prefix(x)), model(x))
        features = prefix(x)                 # as the cache computes them: in eval mode, once
        # in training the tail applies the head's dropout (drop_rate) at every step, as the model's
        # own forward does: the same mask from the same seed (the frozen prefix draws nothing)
        model.train()
        torch.manual_seed(1)
        want = model(x)
        torch.manual_seed(1)
        torch.testing.assert_close(tail(features), want)
    # the tail trains exactly the model's trainable parameters, shared, not copied
    assert {id(p) for p in tail.parameters() if p.requires_grad} == {id(p) for p in model.parameters()
                                                                      if p.requires_grad}


def test_cached_views_refuse_stochastic_depth_in_the_frozen_part():
    """Without a cache the frozen blocks' stochastic depth draws anew at every step; cached
    features cannot, so the combination is refused rather than trained without it."""
    model = timm.create_model("test_resnet", num_classes=3, drop_path_rate=0.2)
    freeze(model, "backbone")
    with pytest.raises(FreezeError, match="drop_path_rate"):
        split_for_cache(model, "backbone")
    # timm gives the first block no stochastic depth: the stem and layer1 frozen, the rest keeps it
    model = timm.create_model("test_resnet", num_classes=3, drop_path_rate=0.2)
    freeze(model, 2)
    split_for_cache(model, 2)


@pytest.mark.parametrize("cached", [False, True])
def test_frozen_parameters_are_unchanged_by_training(tiny_config, tmp_path, cached):
    extra = {"data.cached_views": 2} if cached else {}
    cfg = tiny_config(freeze=3, **extra, epochs=1, steps_per_epoch=4, **{"dpl.threshold": 0.0})
    run = build_run(cfg)
    before = {n: t.clone() for n, t in run.model.state_dict().items()}
    frozen = set(frozen_parameter_names(timm.create_model("test_resnet", num_classes=3), 3))
    fit(cfg, quiet=True)
    state = torch.load(tmp_path / "runs" / "run" / "last.pth.tar", weights_only=True)["state_dict"]
    frozen_modules = {n.rsplit(".", 1)[0] for n in frozen}
    checked = [n for n in before if n.rsplit(".", 1)[0] in frozen_modules]   # weights and BN statistics
    assert len(checked) > len(frozen)
    for name in checked:
        assert torch.equal(state[name], before[name]), name
    assert any(not torch.equal(state[n], before[n]) for n in before if n.startswith("fc."))   # the head learned
    assert any(not torch.equal(state[n], before[n]) for n in before if n.startswith("layer4."))


def _count_fills(monkeypatch) -> list:
    """``(store kind, rows computed)`` of every view-cache fill from now on."""
    from dpl_zoo import view_cache
    computed = []
    real_fill = view_cache.FeatureStore.fill

    def counting_fill(self, rows, compute, *args, **kwargs):
        n = real_fill(self, rows, compute, *args, **kwargs)
        computed.append((self.record["kind"], n))
        return n
    monkeypatch.setattr(view_cache.FeatureStore, "fill", counting_fill)
    return computed


class Interrupt(Reporter):
    """Stops a run (as Ctrl-C does) when it starts epoch ``at``."""

    def __init__(self, at, **kwargs):
        super().__init__(**kwargs)
        self.at = at

    def start_epoch(self, epoch, steps):
        if epoch == self.at:
            raise KeyboardInterrupt
        super().start_epoch(epoch, steps)


class EpochsSeen(Reporter):
    """The epochs a run trains in this process."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.epochs = []

    def start_epoch(self, epoch, steps):
        self.epochs.append(epoch)
        super().start_epoch(epoch, steps)


def test_view_cache_is_reused_on_the_same_key_and_rebuilt_on_a_changed_one(tiny_config, image_data, tmp_path,
                                                                           monkeypatch):
    image = as_bmp(image_data / "train" / "cat" / "000.png")   # its size never changes with its pixels
    computed = _count_fills(monkeypatch)
    start = str(_weights(tmp_path, seed=0))     # a fixed backbone: the run seed then changes only the head

    def fills(**extra):
        computed.clear()
        build_run(cached_config(tiny_config, **{"initial_checkpoint": start, **extra}))
        return dict(computed)

    first = fills()
    assert first["train"] == 30 and first["eval"] == 12        # every training and evaluation image, once
    assert fills() == {"train": 0, "eval": 0}                 # same key: reused, nothing computed
    assert fills(seed=5, **{"data.split_seed": 3}) == {"train": 0, "eval": 0}   # views do not depend on the seed
    assert fills(**{"data.cached_views": 3})["train"] == 30   # views: K
    assert fills(**{"data.scale": "[0.5, 1.0]"})["train"] == 30   # views: crop
    assert fills(**{"data.augment_on": "device"})["train"] == 30   # views: made on the device, not by workers
    assert fills(crop_pct=0.5) == {"train": 30, "eval": 12}   # the evaluation view's preprocessing
    assert fills(amp=True) == {"train": 30, "eval": 12}       # features in bfloat16 (CPU autocast)
    # what the frozen part computes without other weights: timm's model kwargs (here its pooling)
    assert fills(model_kwargs="{global_pool: max}") == {"train": 30, "eval": 12}
    assert fills(model="test_efficientnet", initial_checkpoint=None) == {"train": 30, "eval": 12}   # model
    assert fills(initial_checkpoint=str(_weights(tmp_path, seed=1)))["train"] == 30   # weights
    repaint(image)                                             # data: other pixels, same file size
    assert fills()["train"] == 30
    from PIL import Image
    Image.new("RGB", (20, 16), "white").save(image)           # data: another image size
    assert fills()["train"] == 30


def _weights(tmp_path, seed):
    from safetensors.torch import save_file
    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", num_classes=3)
    path = tmp_path / f"start-{seed}.safetensors"
    save_file(model.state_dict(), str(path))
    return path


def test_resumed_cached_view_run_equals_an_uninterrupted_one(tiny_config, tmp_path):
    straight = fit(cached_config(tiny_config, experiment="straight", epochs=3), quiet=True)
    cfg = cached_config(tiny_config, experiment="cut", epochs=3)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, reporter=Interrupt(2, quiet=True))
    seen = EpochsSeen(quiet=True)
    resumed = fit(cfg, resume="auto", reporter=seen)
    assert seen.epochs == [2]                   # continued from its checkpoint, not trained again from the start
    a = torch.load(tmp_path / "runs" / "straight" / "last.pth.tar", weights_only=True)
    b = torch.load(tmp_path / "runs" / "cut" / "last.pth.tar", weights_only=True)
    for key in ("state_dict", "state_dict_ema"):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), (key, name)
    assert torch.equal(a["task_state"]["qhat"], b["task_state"]["qhat"])
    assert resumed["top1"] == straight["top1"] and resumed["resumed"]


def test_a_resume_continues_on_its_own_backbone_when_the_start_folder_changed(tiny_config, tmp_path, monkeypatch):
    """``dpl-zoo pretrain --resume auto`` with more epochs rewrites ``runs/NAME/export`` in place:
    a fine-tuning run started from it resumes on the weights and preprocessing it trained with
    (as timm's ``--resume`` does), with its own cached views, never the new start's."""
    start = make_start_folder(tmp_path / "export", seed=0, mean=(0.2, 0.3, 0.4))
    copy = make_start_folder(tmp_path / "export-copy", seed=0, mean=(0.2, 0.3, 0.4))
    straight = fit(cached_config(tiny_config, experiment="straight", initial_checkpoint=str(copy)), quiet=True)
    cfg = cached_config(tiny_config, experiment="cut", initial_checkpoint=str(start))
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, reporter=Interrupt(1, quiet=True))
    make_start_folder(start, seed=1, mean=(0.6, 0.6, 0.6))     # other weights and preprocessing, same path
    computed = _count_fills(monkeypatch)
    resumed = fit(cfg, resume="auto", quiet=True)
    assert dict(computed) == {"train": 0, "eval": 0}           # the run's own cached views
    a = torch.load(tmp_path / "runs" / "straight" / "last.pth.tar", weights_only=True)
    b = torch.load(tmp_path / "runs" / "cut" / "last.pth.tar", weights_only=True)
    assert b["data_config"]["mean"] == [0.2, 0.3, 0.4]
    for key in ("state_dict", "state_dict_ema"):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), (key, name)
    assert resumed["top1"] == straight["top1"] and resumed["resumed"]


def test_frozen_backbone_run_through_the_cli_exports_a_plain_timm_model(image_data, tmp_path, capsys):
    start = make_start_folder(tmp_path / "start", seed=0)     # BatchNorm statistics of a trained backbone
    args = ["train", "--quiet", "--methods", "debiaspl"]
    for item in tiny_overrides(image_data, tmp_path / "runs", freeze="backbone", initial_checkpoint=start,
                               **{"data.cached_views": 2, "backbone_lr_scale": 0.1}):
        args += ["--set", item]
    assert main(args) == 0
    out = tmp_path / "runs" / "run"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["freeze"] == "backbone" and summary["trainable_params"] == 96 * 3 + 3
    # plain timm names: ordinary BatchNorm layers (num_batches_tracked included), not frozen ones
    from safetensors.torch import load_file
    exported = load_file(out / "export" / "model.safetensors")
    assert set(exported) == set(timm.create_model("test_resnet", num_classes=3).state_dict())
    # with the exported weights (pretrained=True), plain timm computes what the trained run's model computes
    model = timm.create_model(f"local-dir:{out / 'export'}", pretrained=True).eval()
    from dpl_zoo.evaluate import evaluate_model, load_for_eval
    trained, _ = load_for_eval(str(out / "last.pth.tar"))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), trained(x))
    # the export computes what the run evaluated: top-1 on the evaluation folder from the exported model
    result = evaluate_model(f"local-dir:{out / 'export'}", str(image_data / "val"), batch_size=8, workers=0,
                            device="cpu")
    assert result["top1"] == pytest.approx(summary["top1"])


def test_mlp_head_run_exports_and_evaluates(tiny_config, image_data, tmp_path):
    import dpl_zoo
    from dpl_zoo.evaluate import evaluate_model
    summary = fit(cached_config(tiny_config, head_hidden_size=16), quiet=True)
    out = tmp_path / "runs" / "run"
    config = json.loads((out / "export" / "config.json").read_text())
    assert config["dpl_zoo"]["head_hidden_size"] == 16 and config["dpl_zoo"]["training"]["method"] == "debiaspl"
    assert summary["trainable_params"] == 96 * 16 + 16 + 16 * 3 + 3
    model = dpl_zoo.load(f"local-dir:{out / 'export'}")       # plain timm cannot build the MLP head; dpl_zoo can
    assert isinstance(model.fc, torch.nn.Sequential)
    assert dpl_zoo.load(f"local-dir:{out / 'export'}", num_classes=5).fc[2].out_features == 5
    for ref in (str(out / "last.pth.tar"), f"local-dir:{out / 'export'}"):   # checkpoint and export evaluate alike
        result = evaluate_model(ref, str(image_data / "val"), batch_size=8, workers=0, device="cpu")
        assert result["top1"] == pytest.approx(summary["top1"]), ref


def test_ema_warmup_lets_the_teacher_follow_a_short_run(tiny_config):
    from dpl_zoo.train import train_step
    from dpl_zoo.inputs import epoch_inputs
    gaps = {}
    for warmup in (False, True):
        run = build_run(tiny_config(model_ema_decay=0.999, model_ema_warmup=warmup, epochs=1, steps_per_epoch=3))
        run.task.train()
        for step, inputs in enumerate(epoch_inputs(run, 0)):
            train_step(run, inputs, step)
        teacher = run.task.teacher().fc.weight
        gaps[warmup] = (teacher - run.model.fc.weight).abs().sum().item()
    assert gaps[True] < 0.5 * gaps[False]   # without warm-up the teacher stays near its random new head


def test_freeze_and_lr_scale_in_your_own_loop_with_the_task():
    """The pieces without dpl-zoo's loop: timm model + freeze + param_groups + DebiasPLTask."""
    from timm.optim import create_optimizer_v2
    from dpl_zoo import DebiasPLLoss
    from dpl_zoo.optim import param_groups
    from dpl_zoo.task import DebiasPLTask
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    freeze(model, 2)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    head, layer4 = model.fc.weight.detach().clone(), model.layer4[0].conv1.weight.detach().clone()
    opt = create_optimizer_v2(param_groups(model, weight_decay=1e-4, backbone_lr_scale=0.1), "sgd", lr=0.1)
    task = DebiasPLTask(model, DebiasPLLoss(3, tau=2.0, threshold=0.0), ema_decay=0.99, ema_warmup=True)
    task.train()
    x, y, u = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]), [torch.randn(8, 3, 32, 32)] * 2
    for _ in range(2):
        out = task(x, y, u)
        opt.zero_grad()
        out["loss"].backward()
        for group in opt.param_groups:     # no scheduler here: apply the scale as timm's schedulers do
            group["lr"] = 0.1 * group.get("lr_scale", 1.0)
        opt.step()
        task.update_ema()
    assert frozen and all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert not torch.equal(model.fc.weight, head) and not torch.equal(model.layer4[0].conv1.weight, layer4)
