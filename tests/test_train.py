"""End-to-end runs of the loop on a tiny generated ImageFolder (CPU, seconds each)."""
import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from dpl_zoo.checkpoint import CheckpointError
from dpl_zoo.cli import main
from dpl_zoo.config import load_config, recipe_dir
from dpl_zoo.data import DataError
from dpl_zoo.progress import Reporter
from dpl_zoo.dry_run import dry_run
from dpl_zoo.train import TrainingDiverged, fit

from conftest import make_start_folder, tiny_overrides


@pytest.mark.parametrize("method", ["debiaspl", "fixmatch", "supervised"])
def test_resnet_run_writes_everything(tiny_config, method, tmp_path):
    cfg = tiny_config(**{"dpl.method": method})
    summary = fit(cfg, quiet=True)
    out = tmp_path / "runs" / "run"
    for name in ("config.yaml", "labeled.csv", "metrics.jsonl", "summary.json", "last.pth.tar", "best.pth.tar",
                 "export/model.safetensors", "export/config.json"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4]
    assert sum(r["kind"] == "epoch" for r in rows) == 2
    assert summary["method"] == method and 0 <= summary["top1"] <= 100
    if method != "supervised":
        assert summary["pl_kl_uniform"] is not None and len(summary["qhat"]) == 3
    # the export loads with plain timm and reproduces the run's student
    model = timm.create_model(f"local-dir:{out / 'export'}").eval()
    assert model.pretrained_cfg["label_names"] == ["cat", "dog", "emu"]
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)
    state = torch.load(out / "last.pth.tar", weights_only=True)
    assert all(torch.equal(v, state["state_dict"][k]) for k, v in load_file(out / "export/model.safetensors").items())


def test_vit_run(tiny_config):
    cfg = tiny_config(model="test_vit", epochs=1, **{"model_kwargs": "{patch_size: 8}"})
    summary = fit(cfg, quiet=True)
    assert summary["model"] == "test_vit" and summary["steps"] == 2


def test_multiviews_and_cld_run(tiny_config):
    summary = fit(tiny_config(**{"dpl.multiviews": True, "dpl.lambda_cld": 0.3, "dpl.masked_qhat": True,
                                 "epochs": 1}), quiet=True)
    assert summary["steps"] == 2


def test_resume_after_interruption_matches_uninterrupted(tiny_config, tmp_path):
    straight = fit(tiny_config(experiment="straight", epochs=3), quiet=True)

    class Interrupt(Reporter):
        def start_epoch(self, epoch, steps):
            if epoch == 2:
                raise KeyboardInterrupt
            super().start_epoch(epoch, steps)

    cfg = tiny_config(experiment="broken", epochs=3)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, reporter=Interrupt(quiet=True))
    resumed = fit(cfg, resume=str(tmp_path / "runs" / "broken" / "last.pth.tar"), quiet=True)
    a = torch.load(tmp_path / "runs" / "straight" / "last.pth.tar", weights_only=True)
    b = torch.load(tmp_path / "runs" / "broken" / "last.pth.tar", weights_only=True)
    for key in ("state_dict", "state_dict_ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    assert torch.equal(a["task_state"]["qhat"], b["task_state"]["qhat"])
    assert resumed["top1"] == straight["top1"] and resumed["resumed"]


def test_resume_with_another_recipe_is_refused(tiny_config, tmp_path):
    fit(tiny_config(epochs=1), quiet=True)
    other = tiny_config(epochs=1, **{"dpl.tau": 0.9})
    with pytest.raises(CheckpointError, match="different recipe.*dpl"):
        fit(other, resume=str(tmp_path / "runs" / "run" / "last.pth.tar"))


def test_nan_loss_stops_and_keeps_last_checkpoint(tiny_config, tmp_path, monkeypatch):
    cfg = tiny_config(epochs=3)
    import dpl_zoo.task as task_mod
    original = task_mod.DebiasPLTask.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 4:  # first step of the second epoch
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(task_mod.DebiasPLTask, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match="at step 3 .*last good checkpoint"):
        fit(cfg, quiet=True)
    state = torch.load(tmp_path / "runs" / "run" / "last.pth.tar", weights_only=True)
    assert state["epoch"] == 0  # epoch 0 intact, nothing half-written
    assert not (tmp_path / "runs" / "run" / "summary.json").exists()


def test_num_classes_mismatch_and_budget_errors(tiny_config):
    with pytest.raises(DataError, match="num_classes is 5 but the data has 3"):
        fit(tiny_config(num_classes=5), quiet=True)
    with pytest.raises(DataError, match="fewer than the 20 labels"):
        fit(tiny_config(**{"data.labels_per_class": 20}), quiet=True)


def test_finished_run_is_not_overwritten(tiny_config):
    fit(tiny_config(epochs=1), quiet=True)
    with pytest.raises(FileExistsError, match="already holds a finished run"):
        fit(tiny_config(epochs=1), quiet=True)
    # --resume auto answers with the finished run only for the recipe that made it
    assert fit(tiny_config(epochs=1), resume="auto", quiet=True)["steps"] == 2
    with pytest.raises(CheckpointError, match="differs in: lr"):
        fit(tiny_config(epochs=1, lr=0.5), resume="auto", quiet=True)


@pytest.mark.parametrize("augment_on", ["workers", "device"])
def test_channels_last_run_on_cpu(tiny_config, tmp_path, augment_on):
    summary = fit(tiny_config(channels_last=True, epochs=1, **{"data.augment_on": augment_on}), quiet=True)
    state = torch.load(tmp_path / "runs" / "run" / "last.pth.tar", weights_only=True)
    assert summary["steps"] == 2 and state["config"]["channels_last"] is True


def test_eval_of_a_checkpoint_uses_the_preprocessing_it_trained_with(tiny_config, tmp_path):
    from dpl_zoo.evaluate import load_for_eval
    # a start point with a preprocessing of its own (as EfficientNet-PyTorch weights or a pretraining's
    # export bring): not in the recipe, and not test_resnet's default
    start = make_start_folder(tmp_path / "start", mean=(0.25, 0.5, 0.75), std=(0.2, 0.3, 0.4))
    fit(tiny_config(epochs=1, initial_checkpoint=str(start)), quiet=True)
    path = tmp_path / "runs" / "run" / "last.pth.tar"
    assert torch.load(path, weights_only=True)["data_config"]["mean"] == [0.25, 0.5, 0.75]
    model, classes = load_for_eval(str(path))            # rebuilt without the start point
    config = timm.data.resolve_data_config(model=model)   # what eval's transforms are made from
    assert config["mean"] == (0.25, 0.5, 0.75) and config["std"] == (0.2, 0.3, 0.4) and len(classes) == 3


def test_unfinished_run_is_not_restarted_over(tiny_config, tmp_path):
    cfg = tiny_config(epochs=2)
    fit(cfg, quiet=True)
    run = tmp_path / "runs" / "run"
    (run / "summary.json").unlink()  # as if killed after its last checkpoint
    before = (run / "last.pth.tar").read_bytes()
    with pytest.raises(FileExistsError, match="holds an unfinished run; continue it with --resume auto"):
        fit(cfg, quiet=True)
    assert (run / "last.pth.tar").read_bytes() == before


def test_fresh_start_drops_rows_of_a_run_that_left_no_checkpoint(tiny_config, tmp_path):
    cfg = tiny_config(epochs=1)
    run = tmp_path / "runs" / "run"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')  # died before its first checkpoint
    fit(cfg, quiet=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(r.get("loss") != 9.0 for r in rows)


TRAINING_RECIPES = sorted(p.stem for p in recipe_dir().glob("*.yaml") if not p.stem.startswith("pretrain"))


@pytest.mark.parametrize("name", TRAINING_RECIPES)
def test_dry_run_every_shipped_recipe(name):
    # without autocast: CPU bfloat16 backward is ~10x slower, and test_cli_dry_run covers the recipe as shipped
    result = dry_run(load_config(name, ["amp=false"]))
    assert result["params"] > 0 and result["loss"] == result["loss"]


def test_a_pretraining_recipe_is_not_a_training_recipe():
    from dpl_zoo.config import ConfigError
    with pytest.raises(ConfigError, match="dpl-zoo pretrain pretrain_moco"):
        load_config("pretrain_moco")


def test_cli_train_compare_and_eval(image_data, tmp_path, capsys):
    from conftest import tiny_overrides
    sets = [a for o in tiny_overrides(image_data, tmp_path / "runs", epochs=1) for a in ("--set", o)]
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: test_resnet\n")
    assert main(["train", str(recipe), *sets, "--methods", "debiaspl,fixmatch", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "same data, model and budget" in text and "fixmatch" in text
    comparison = json.loads((tmp_path / "runs" / "run-comparison.json").read_text())
    assert [s["method"] for s in comparison] == ["debiaspl", "fixmatch"]
    figure = tmp_path / "runs" / "run-comparison.png"
    assert figure.stat().st_size > 10_000 and f"figure written to {figure}" in text
    out = tmp_path / "one.png"
    assert main(["plot", str(tmp_path / "runs" / "run-debiaspl"), "--out", str(out)]) == 0 and out.stat().st_size > 10_000
    assert main(["plot", str(tmp_path)]) == 2   # not a run folder: one clear line
    for ref in (tmp_path / "runs" / "run-debiaspl" / "last.pth.tar", tmp_path / "runs" / "run-debiaspl" / "export"):
        out = tmp_path / "eval.json"
        assert main(["eval", str(ref), "--data", str(image_data / "val"), "--out", str(out), "--workers", "0",
                     "--device", "cpu"]) == 0
        result = json.loads(out.read_text())
        assert result["images"] == 12 and len(result["per_class_top1"]) == 3 and result["device"] == "cpu"
    assert main(["train", str(recipe), "--set", "dpl.tua=1"]) == 2
    assert "did you mean 'tau'" in capsys.readouterr().out


def test_cli_dry_run(capsys):
    # the recipe as shipped (CPU bfloat16 autocast included) on a small model: a ResNet-50 bf16
    # backward on a CPU takes half a minute
    assert main(["train", "resnet50_dpl_1pct", "--dry-run", "--set", "model=test_resnet"]) == 0
    assert "dry run ok" in capsys.readouterr().out


@pytest.mark.slow
def test_compiled_student_run(tiny_config, tmp_path):
    summary = fit(tiny_config(epochs=1, compile=True), quiet=True)
    state = torch.load(tmp_path / "runs" / "run" / "last.pth.tar", weights_only=True)
    assert not any(k.startswith("_orig_mod") for k in state["state_dict"]) and summary["steps"] == 2


def test_resume_auto_through_the_cli(image_data, tmp_path, capsys, monkeypatch):
    from conftest import tiny_overrides
    sets = [a for o in tiny_overrides(image_data, tmp_path / "runs", epochs=3, experiment=None) for a in ("--set", o)]
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: test_resnet\n")
    # without a fixed experiment name a restart cannot find its run: an error, not a fresh run
    assert main(["train", str(recipe), *sets, "--methods", "debiaspl", "--resume", "auto"]) == 2
    assert "--resume auto needs a fixed experiment name" in capsys.readouterr().out
    named = sets + ["--set", "experiment=elastic"]

    class Interrupt(Reporter):
        def start_epoch(self, epoch, steps):
            if epoch == 2:
                raise KeyboardInterrupt
            super().start_epoch(epoch, steps)

    import dpl_zoo.cli as cli
    monkeypatch.setattr("dpl_zoo.progress.Reporter", Interrupt)
    with pytest.raises(KeyboardInterrupt):
        main(["train", str(recipe), *named, "--methods", "debiaspl", "--resume", "auto", "--quiet"])
    monkeypatch.undo()
    assert torch.load(tmp_path / "runs" / "elastic" / "last.pth.tar", weights_only=True)["epoch"] == 1
    assert main(["train", str(recipe), *named, "--methods", "debiaspl", "--resume", "auto", "--quiet"]) == 0
    summary = json.loads((tmp_path / "runs" / "elastic" / "summary.json").read_text())
    assert summary["resumed"] and summary["steps"] == 6
    # a restart after the run finished returns its summary instead of failing
    assert main(["train", str(recipe), *named, "--methods", "debiaspl", "--resume", "auto", "--quiet"]) == 0
    assert cli is not None


def test_every_method_takes_the_same_number_of_steps(tiny_config):
    runs = {m: fit(tiny_config(steps_per_epoch=None, epochs=1, experiment=m, **{"dpl.method": m}), quiet=True)
            for m in ("debiaspl", "supervised")}
    # 30 images, 6 labeled: 24 unlabeled // (mu 2 x batch 3) = 4 steps for both (not 6 // 3 = 2)
    assert runs["supervised"]["steps"] == runs["debiaspl"]["steps"] == 4


def test_deterministic_is_scoped_to_the_run(tiny_config):
    before = torch.are_deterministic_algorithms_enabled()
    seen = {}
    import dpl_zoo.train as train_mod
    real = train_mod.train_one_epoch

    def spy(*args, **kwargs):
        seen["inside"] = torch.are_deterministic_algorithms_enabled()
        return real(*args, **kwargs)

    train_mod.train_one_epoch = spy
    try:
        fit(tiny_config(epochs=1, deterministic=True), quiet=True)
    finally:
        train_mod.train_one_epoch = real
    assert seen["inside"] is True and torch.are_deterministic_algorithms_enabled() == before


def test_partly_written_metrics_line_is_dropped_on_resume(tiny_config, tmp_path):
    cfg = tiny_config(epochs=2)
    fit(cfg, quiet=True)
    run = tmp_path / "runs" / "run"
    (run / "summary.json").unlink()
    state = torch.load(run / "last.pth.tar", weights_only=True)
    state["epoch"], state["step"] = 0, 2
    torch.save(state, run / "last.pth.tar")
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "epoch": 1, "st')   # the crash hit mid-line
    fit(cfg, resume=str(run / "last.pth.tar"), quiet=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4]


def test_checkpoints_hold_no_rng_state_and_a_moved_data_folder_resumes(tiny_config, image_data, tmp_path):
    import shutil
    fit(tiny_config(epochs=1), quiet=True)
    state = torch.load(tmp_path / "runs" / "run" / "last.pth.tar", weights_only=True)
    assert "rng" not in state  # epochs re-seed themselves: resumable on any number of GPUs
    (tmp_path / "runs" / "run" / "summary.json").unlink()
    moved = tmp_path / "moved"
    shutil.copytree(image_data, moved)
    summary = fit(tiny_config(epochs=2, **{"data.root": str(moved / "train")}),
                  resume=str(tmp_path / "runs" / "run" / "last.pth.tar"), quiet=True)
    assert summary["resumed"] and summary["steps"] == 4
    # other data under the same path is not the same run
    (tmp_path / "runs" / "run" / "summary.json").unlink()
    for p in list((moved / "train" / "cat").iterdir())[:3]:
        p.unlink()
    with pytest.raises(CheckpointError, match="training data differ"):
        fit(tiny_config(epochs=3, **{"data.root": str(moved / "train")}),
            resume=str(tmp_path / "runs" / "run" / "last.pth.tar"), quiet=True)


def test_the_last_epoch_is_evaluated_once(tiny_config, monkeypatch):
    import dpl_zoo.train as train_mod
    calls = []
    real = train_mod.evaluate
    monkeypatch.setattr(train_mod, "evaluate", lambda run: calls.append(1) or real(run))
    fit(tiny_config(epochs=2, eval_interval=1), quiet=True)
    assert len(calls) == 2


def test_metrics_are_read_on_the_host_only_at_the_log_interval(tiny_config, monkeypatch):
    from dpl_zoo.metrics import StepMetrics
    reads = []
    real = StepMetrics.read
    monkeypatch.setattr(StepMetrics, "read", lambda self: reads.append(self.steps) or real(self))
    fit(tiny_config(epochs=1, steps_per_epoch=6, log_interval=3), quiet=True)
    assert reads == [3, 6]


def test_python_dash_m_entry_point():
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "dpl_zoo", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("dpl-zoo ")


@pytest.mark.parametrize("augment_on", ["workers", "device"])
def test_both_augmentation_paths_train_on_folders_and_arrays(tiny_config, augment_on, tmp_path):
    folder = fit(tiny_config(epochs=1, experiment=f"f-{augment_on}", **{"data.augment_on": augment_on}), quiet=True)
    assert folder["steps"] == 2
    arrays = fit(load_config("mnist_demo", [f"data.augment_on={augment_on}", "epochs=1", "steps_per_epoch=2",
                                            "batch_size=4", f"output={tmp_path / 'runs'}", f"experiment=m-{augment_on}",
                                            "data.eval_unlabeled_max=50"]), quiet=True)
    assert arrays["steps"] == 2 and arrays["top1"] >= 0


def test_labeled_target_prior_is_estimated_saved_and_reported(tmp_path):
    from conftest import make_image_folder
    root = tmp_path / "lt"
    make_image_folder(root / "train", classes=("a",), per_class=12)
    make_image_folder(root / "train", classes=("a", "b"), per_class=6)  # a: 12 images, b: 6 ...
    make_image_folder(root / "train", classes=("a", "b", "c"), per_class=3)  # ... c: 3 (file names overlap)
    make_image_folder(root / "val", per_class=2, classes=("a", "b", "c"))
    sets = tiny_overrides(root, tmp_path / "runs", epochs=1, **{"data.labels_per_class": None,
                                                                "data.label_fraction": 0.5,
                                                                "dpl.target_prior": "labeled", "batch_size": 2})
    summary = fit(load_config(None, sets), quiet=True)
    # labeled per class round(0.5 x [12, 6, 3]) = [6, 3, 2]: the prior is their frequencies
    assert summary["target_prior"] == pytest.approx([6 / 11, 3 / 11, 2 / 11])
    state = torch.load(tmp_path / "runs" / "run" / "last.pth.tar", weights_only=True)
    assert torch.allclose(state["task_state"]["target_prior"], torch.tensor([[6 / 11, 3 / 11, 2 / 11]]))
    assert summary["pl_kl_target"] is not None and 0 <= summary["balanced_top1"] <= 100
    uniform = fit(load_config(None, sets + ["dpl.target_prior=uniform", "experiment=u"]), quiet=True)
    assert uniform["target_prior"] == pytest.approx([1 / 3] * 3)


def test_labeled_prior_does_not_inflate_rare_classes():
    from dpl_zoo.config import load_config as load
    from dpl_zoo.run import target_prior
    cfg = load(None, ["dpl.target_prior=labeled"])
    # long-tailed Fashion-MNIST at IR 100, 1% labeled: [30, 18, 11, 6, 4, 2, 1, 1, 1, 1] labels
    counts = [30, 18, 11, 6, 4, 2, 1, 1, 1, 1]
    prior = target_prior(cfg, [c for c, n in enumerate(counts) for _ in range(n)], 10)
    assert prior[-1] == pytest.approx(1 / 75)            # add-one smoothing made it 2 / 85
    # a class without labels keeps a finite share: a pseudo-count of 1/2
    prior = target_prior(cfg, [0, 0, 0, 1], 3)
    assert prior == pytest.approx([3 / 4.5, 1 / 4.5, 0.5 / 4.5])


def test_balanced_accuracy_is_the_mean_per_class_recall():
    from dpl_zoo.evaluate import accuracy_report
    logits = torch.eye(3)[[0, 0, 0, 0, 1, 0]] * 5       # predictions
    targets = torch.tensor([0, 0, 0, 0, 1, 2])          # class 2 always wrong
    report = accuracy_report(logits, targets, 3)
    assert report["top1"] == pytest.approx(500 / 6) and report["balanced_top1"] == pytest.approx(200 / 3)


def test_prefetched_inputs_are_the_inline_inputs(tiny_config):
    from dpl_zoo.inputs import epoch_loaders, prefetched_inputs, step_inputs
    from dpl_zoo.run import build_run
    for augment_on in ("workers", "device"):
        run = build_run(tiny_config(**{"data.augment_on": augment_on}))
        lab, unl = epoch_loaders(run, 1)
        inline = [step_inputs(run, a, b) for a, b in zip(lab, unl)]
        ahead = list(prefetched_inputs(run, 1))
        assert len(inline) == len(ahead) == 2
        for a, b in zip(inline, ahead):
            assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
            assert all(torch.equal(v, w) for v, w in zip(a.views, b.views))


def test_unnamed_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    """Two unnamed runs within one second (the docs' examples back to back) must not share a name:
    the second would be refused as 'already holds a finished run'."""
    from dpl_zoo.train import stamped_name
    monkeypatch.setattr("time.strftime", lambda fmt, *a: "20260101-000000")
    first = stamped_name(tmp_path, "finetune")
    assert first == "finetune-20260101-000000"
    (tmp_path / first).mkdir()
    second = stamped_name(tmp_path, "finetune")
    assert second == "finetune-20260101-000000-2"
    (tmp_path / second).mkdir()
    assert stamped_name(tmp_path, "finetune") == "finetune-20260101-000000-3"
    # several methods side by side take BASE-METHOD folders: their base is taken too
    assert stamped_name(tmp_path / "other", "x") == "x-20260101-000000"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x-20260101-000000-debiaspl").mkdir()
    assert stamped_name(tmp_path / "other", "x") == "x-20260101-000000-2"


def test_an_unlabeled_csv_gives_the_pool_and_the_labels_come_from_elsewhere(tiny_config, tmp_path):
    """data.unlabeled_csv: the unlabeled images are exactly those positions; a label budget draws
    outside them; an overlap with a labeled_csv is an error; a resume on another pool is refused."""
    from dpl_zoo.data import write_split_csv
    from dpl_zoo.datasets import DataError
    from dpl_zoo.checkpoint import CheckpointError
    from dpl_zoo.run import build_run
    pool = list(range(0, 30, 2))          # 15 of the 30 images
    write_split_csv(tmp_path / "pool.csv", pool)
    run = build_run(tiny_config(**{"data.unlabeled_csv": str(tmp_path / "pool.csv")}))
    assert run.split.unlabeled == pool and not set(run.split.labeled) & set(pool)
    assert len(run.split.labeled) == 2 * len(run.classes)
    write_split_csv(tmp_path / "labeled.csv", [2, 3])
    with pytest.raises(DataError, match="share 1 images"):
        build_run(tiny_config(**{"data.unlabeled_csv": str(tmp_path / "pool.csv"), "data.labels_per_class": None,
                                 "data.labeled_csv": str(tmp_path / "labeled.csv")}))
    write_split_csv(tmp_path / "far.csv", [5, 400])
    with pytest.raises(DataError, match="names position 400"):
        build_run(tiny_config(**{"data.unlabeled_csv": str(tmp_path / "far.csv")}))
    fit(tiny_config(epochs=1, **{"data.unlabeled_csv": str(tmp_path / "pool.csv")}), quiet=True)
    write_split_csv(tmp_path / "pool.csv", pool[:-1])     # same file name, another pool
    with pytest.raises(CheckpointError, match="unlabeled images differ"):
        fit(tiny_config(epochs=2, **{"data.unlabeled_csv": str(tmp_path / "pool.csv")}),
            resume=str(tmp_path / "runs" / "run" / "last.pth.tar"))
