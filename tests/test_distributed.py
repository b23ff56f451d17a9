"""torchrun on CPU: 2 gloo processes on loopback against 1 process, and an elastic restart."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from dpl_zoo.config import load_config
from dpl_zoo.train import fit

from conftest import tiny_overrides

# test_vit has no BatchNorm, so per-process batches give the same gradients as one process
DDP_SETTINGS = {"model": "test_vit", "model_kwargs": "{patch_size: 8}", "batch_size": 4, "steps_per_epoch": 3,
                "epochs": 2, "eval_interval": 1}


def _recipe(image_data, out, path, **extra):
    tree = {}
    for item in tiny_overrides(image_data, out, **{**DDP_SETTINGS, **extra}):
        key, value = item.split("=", 1)
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    path.write_text(yaml.safe_dump(tree))
    return path


def _torchrun(recipe, *args, nproc=2, extra=()):
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: restarted workers must not read the killed attempt's
    # addresses from torchrun's rendezvous store (pytorch/pytorch#135712); the README says so too
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           *extra, "-m", "dpl_zoo", "train", str(recipe), "--quiet", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _two_processes_then_one(recipe, runs):
    """``recipe`` under torchrun (experiment ``ddp``) and in one process (``single``), which end
    with the same weights and EMA teacher; returns their summaries and last checkpoints."""
    proc = _torchrun(recipe)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    single = fit(load_config(str(recipe), ["experiment=single"]), quiet=True)
    a = torch.load(runs / "ddp" / "last.pth.tar", weights_only=True)
    b = torch.load(runs / "single" / "last.pth.tar", weights_only=True)
    for key in ("state_dict", "state_dict_ema"):
        for k in b[key]:
            assert torch.allclose(a[key][k], b[key][k], atol=1e-5, rtol=1e-4), (key, k)
    return json.loads((runs / "ddp" / "summary.json").read_text()), single, a, b


def test_two_processes_match_one_process(image_data, tmp_path):
    recipe = _recipe(image_data, tmp_path / "runs", tmp_path / "r.yaml", experiment="ddp")
    ddp, single, a, b = _two_processes_then_one(recipe, tmp_path / "runs")
    assert torch.allclose(a["task_state"]["qhat"], b["task_state"]["qhat"], atol=1e-6)
    # sharded evaluation: exact global counts (12 validation images, no double counting)
    assert ddp["top1"] == pytest.approx(single["top1"]) and ddp["steps"] == single["steps"]
    rows = (tmp_path / "runs" / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 3 * 2 + 2  # one writer (rank 0): 6 step rows + 2 epoch rows


def test_two_processes_estimate_the_prior_as_one_process(image_data, tmp_path):
    """dpl.target_prior: estimated under torchrun: the probe's gradients and the EM and histogram
    statistics are summed over ranks, so the estimate (and the model) equal one process's."""
    recipe = _recipe(image_data, tmp_path / "runs", tmp_path / "r.yaml", experiment="ddp",
                     **{"dpl.target_prior": "estimated", "dpl.estimate_warmup": 1, "dpl.estimate_min_accepted": 0,
                        "dpl.threshold": 0.0})
    ddp, single, a, b = _two_processes_then_one(recipe, tmp_path / "runs")
    est_a, est_b = a["task_state"]["prior_estimate"], b["task_state"]["prior_estimate"]
    assert int(est_a["steps"]) == int(est_b["steps"]) == 6
    for k in est_b:
        assert torch.allclose(est_a[k].float(), est_b[k].float(), atol=1e-5, rtol=1e-4), k
    assert ddp["prior_estimate"] == pytest.approx(single["prior_estimate"], abs=1e-5)


def test_cached_views_on_a_cold_cache_under_torchrun(image_data, tmp_path):
    """Rank 0 fills the empty view cache while rank 1, which opened the store before, waits; both
    then train on what rank 0 wrote, as one process does on the same cache."""
    # test_resnet: its frozen BatchNorm layers are in the cached part, the trained head has none
    recipe = _recipe(image_data, tmp_path / "runs", tmp_path / "r.yaml", experiment="ddp", model="test_resnet",
                     model_kwargs="{}", freeze="backbone", **{"data.cached_views": 2})
    ddp, single, _, _ = _two_processes_then_one(recipe, tmp_path / "runs")
    assert ddp["top1"] == pytest.approx(single["top1"]) and ddp["cached_views"] == 2


def _children(pid):
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def test_killed_rank_is_restarted_and_resumes(image_data, tmp_path):
    recipe = _recipe(image_data, tmp_path / "runs", tmp_path / "r.yaml", experiment="elastic", epochs=4,
                     steps_per_epoch=20)
    proc = _torchrun(recipe, "--resume", "auto", extra=("--max-restarts=1",))
    last = tmp_path / "runs" / "elastic" / "last.pth.tar"
    deadline = time.time() + 240
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    workers = _children(proc.pid)
    assert last.exists() and len(workers) == 2, "the run should be mid-way with two workers"
    os.kill(max(workers), signal.SIGKILL)  # one rank dies mid-run
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    summary = json.loads((tmp_path / "runs" / "elastic" / "summary.json").read_text())
    assert summary["resumed"] is True and summary["steps"] == 80
    state = torch.load(last, weights_only=True)
    assert state["epoch"] == 3
    # the restarted run ends where an uninterrupted one does
    fit(load_config(str(recipe), ["experiment=straight"]), quiet=True)
    straight = torch.load(tmp_path / "runs" / "straight" / "last.pth.tar", weights_only=True)
    for k, v in straight["state_dict"].items():
        assert torch.allclose(state["state_dict"][k], v, atol=1e-5, rtol=1e-4), k
