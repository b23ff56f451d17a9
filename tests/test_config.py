"""Recipes -> one typed, validated config."""
import pytest
import yaml

from dpl_zoo.config import (ConfigError, PretrainConfig, TrainConfig, config_from_dict, load_config,
                            load_pretrain_config, pretrain_config_from_dict, recipe_dir, save_config)

SHIPPED = sorted(p.stem for p in recipe_dir().glob("*.yaml"))
PRETRAINING = sorted(p.stem for p in recipe_dir().glob("*.yaml") if "moco" in yaml.safe_load(p.read_text()))
TRAINING = [name for name in SHIPPED if name not in PRETRAINING]


def test_shipped_recipes_exist():
    assert {"mnist_demo", "resnet50_dpl_0.2pct", "resnet50_dpl_1pct", "vit_small_dpl_1pct",
            "vit_base_dpl_1pct"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_resolves(name, tmp_path):
    load, kind, from_dict = ((load_pretrain_config, PretrainConfig, pretrain_config_from_dict) if name in PRETRAINING
                             else (load_config, TrainConfig, config_from_dict))
    cfg = load(name)
    assert isinstance(cfg, kind)
    save_config(cfg, tmp_path / "c.yaml")
    assert from_dict(yaml.safe_load((tmp_path / "c.yaml").read_text())) == cfg


def test_the_shipped_recipes_hold_both_kinds():
    assert PRETRAINING == ["pretrain_moco"] and "finetune" in TRAINING


def test_reference_settings_of_the_imagenet_recipes():
    one = load_config("resnet50_dpl_1pct")
    assert (one.dpl.threshold, one.dpl.tau, one.dpl.qhat_momentum, one.dpl.lambda_cld) == (0.8, 0.4, 0.999, 0.3)
    assert (one.lr, one.weight_decay, one.epochs, one.warmup_epochs, one.dpl.lambda_u) == (0.003, 1e-4, 50, 5, 10.0)
    assert one.dpl.multiviews and one.dpl.ema_teacher and one.model_ema_decay == 0.999 and one.amp
    low = load_config("resnet50_dpl_0.2pct")
    assert (low.dpl.qhat_momentum, low.dpl.lambda_cld, low.data.label_fraction) == (0.99, 0.1, 0.002)


def test_overrides_are_typed_yaml():
    cfg = load_config("mnist_demo", ["dpl.tau=0.25", "epochs=3", "data.scale=[0.5, 1.0]", "dpl.masked_qhat=true"])
    assert cfg.dpl.tau == 0.25 and cfg.epochs == 3 and cfg.data.scale == (0.5, 1.0) and cfg.dpl.masked_qhat is True


@pytest.mark.parametrize("override, message", [
    ("dpl.tua=0.5", "did you mean 'tau'"),
    ("learning_rate=0.1", "unknown recipe key 'learning_rate'"),
    ("dpl.tau=high", "dpl.tau must be float"),
    ("epochs=2.5", "epochs must be int"),
    ("dpl.multiviews=3", "dpl.multiviews must be bool"),
    ("dpl.method=fixmatc", "did you mean 'fixmatch'"),
    ("dpl.threshold=1.5", "dpl.threshold is out of range"),
    ("dpl.qhat_momentum=1.0", "dpl.qhat_momentum is out of range"),
    ("data.label_fraction=0.5", "not several"),
    ("dpl=3", "dpl must be a mapping"),
    ("tau", "key=value"),
])
def test_bad_recipe_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("mnist_demo", [override])


def test_unknown_recipe_name_suggests(tmp_path):
    with pytest.raises(ConfigError, match="mnist_demo"):
        load_config("mnist_dem")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


def test_exponent_floats_as_timm_recipes_write_them():
    assert load_config("mnist_demo", ["lr=1e-4", "weight_decay=5e-5"]).lr == 1e-4


def test_fixmatch_is_tau_zero():
    cfg = load_config("mnist_demo", ["dpl.method=fixmatch"])
    assert cfg.dpl.tau == 0.0


def test_self_supervised_start_is_required_unless_from_scratch():
    cfg = load_config("resnet50_dpl_1pct")
    assert cfg.initial_checkpoint.startswith("https://eman-cvpr.s3.amazonaws.com/") and cfg.initial_checkpoint_required
    with pytest.raises(ConfigError, match="res50_moco_eman_800ep.pth.tar.*module.encoder_q.*from_scratch=true"):
        load_config("resnet50_dpl_1pct", ["initial_checkpoint=null"])
    assert load_config("resnet50_dpl_1pct", ["initial_checkpoint=null", "from_scratch=true"]).from_scratch
    assert load_config("resnet50_dpl_1pct", ["initial_checkpoint=moco.pth.tar"]).initial_checkpoint == "moco.pth.tar"


@pytest.mark.parametrize("name", [n for n in SHIPPED if n.startswith("resnet50")])
def test_resnet50_recipes_evaluate_and_decay_as_the_authors(name):
    import timm
    from dpl_zoo.models import resolve_data_config
    cfg = load_config(name)
    model = timm.create_model(cfg.model, num_classes=10)
    dc = resolve_data_config(cfg, model)   # timm's resnet50 default would be crop 0.95, bicubic
    assert (dc["crop_pct"], dc["interpolation"], dc["input_size"]) == (0.875, "bilinear", (3, 224, 224))
    assert dc["mean"] == (0.485, 0.456, 0.406) and dc["std"] == (0.229, 0.224, 0.225)
    assert cfg.filter_bias_and_bn is False  # the authors' SGD decays BatchNorm weights and biases too


def test_layer_decay_and_bias_filter_reach_the_optimizer():
    import timm
    from dpl_zoo.optim import build_optimization
    vit = load_config("vit_small_dpl_1pct")
    assert vit.layer_decay == 0.75
    model = timm.create_model("test_vit", num_classes=3)
    opt, _ = build_optimization(load_config(None, ["opt=adamw", "lr=0.001", "weight_decay=0.05",
                                                   "layer_decay=0.75"]), model, 10)
    scales = sorted({g["lr_scale"] for g in opt.param_groups})
    assert len(scales) > 2 and scales[-1] == 1.0 and scales[0] < 0.75
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 0.05}
    resnet = timm.create_model("test_resnet", num_classes=3)
    opt, _ = build_optimization(load_config(None, ["filter_bias_and_bn=false", "weight_decay=0.0001"]), resnet, 10)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 0.0001
    opt, _ = build_optimization(load_config(None, ["weight_decay=0.0001"]), resnet, 10)
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, 0.0001}


def test_new_keys_are_validated():
    for bad, message in (("data.augment_on=gpu", "augment_on must be one of"), ("layer_decay=1.5", "layer_decay"),
                         ("crop_pct=0", "crop_pct"), ("interpolation=cubic", "interpolation must be"),
                         ("dpl.target_prior=[1, 0, 2]", "positive number"),
                         ("dpl.target_prior=nofile.txt", "neither uniform, labeled, estimated nor an existing file")):
        with pytest.raises(ConfigError, match=message):
            load_config(None, [bad])
